"""Plain-torch inference pieces of a Llama-style decoder layer, shared by the fused target path
(models/fast_target.py) and the EAGLE draft's fused path (drafts/fast_layer.py).

* q/k/v as one matrix; matrices stay in nn.Linear's (out, in) layout and go through `F.linear`. A transposed copy
  multiplied with `torch.mm` is much faster in isolation but only ~3% inside a whole draft step, and for 1-4 rows it
  accumulates each output sequentially over the input dimension: twice the rounding error of the module path;
* cos/sin come from a table built once with the rotary module's own inverse frequencies (position * inv_freq is the
  same float32 product either way, so the table holds exactly the numbers the module computes per call);
* keys/values live in preallocated buffers (`KVBuffer`): appending is a copy into place and dropping speculative
  entries is moving an integer, never a reallocation.

RMSNorm uses `torch.rms_norm` for float32 (bit-identical to LlamaRMSNorm there) and Hugging Face's float32 round
trip for other dtypes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["KVBuffer", "LayerWeights", "RopeTable", "layer_sources", "layer_support", "rms_norm", "stamp_of"]

ROPE_TABLE_MIN = 2048


def layer_support(layer, rotary, qkv_bias: bool = False) -> str | None:
    """None when a Llama-style decoder `layer` (self_attn + mlp) with RoPE module `rotary` can run on `LayerWeights`;
    otherwise why not. `qkv_bias`: accept biases on the q/k/v projections (Qwen2)."""
    attn = getattr(layer, "self_attn", None)
    mlp = getattr(layer, "mlp", None)
    if attn is None or mlp is None or rotary is None:
        return "no Llama-style decoder layer"
    names = ("q_proj", "k_proj", "v_proj", "o_proj")
    if not all(hasattr(attn, n) for n in names) or not all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")):
        return f"{type(layer).__name__} lacks Llama's q/k/v/o and gate/up/down projections"
    cfg = attn.config
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"activation {cfg.hidden_act!r} (the fused path implements SiLU)"
    qkv = (attn.q_proj, attn.k_proj, attn.v_proj)
    if any(lin.bias is not None for lin in qkv) and not (qkv_bias and all(lin.bias is not None for lin in qkv)):
        return "biased q/k/v projections" if not qkv_bias else "biases on some of the q/k/v projections only"
    for lin in (attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj):
        if lin.bias is not None:
            return "biased output/MLP projections"
    extra = [n for n in ("q_norm", "k_norm", "sliding_window") if getattr(attn, n, None) is not None]
    if extra:
        return f"attention with {', '.join(extra)}"
    if getattr(rotary, "rope_type", "default") != "default":
        return f"rope type {rotary.rope_type!r} (the fused path implements the default RoPE)"
    return None


def layer_sources(layer) -> list[torch.Tensor]:
    a, m = layer.self_attn, layer.mlp
    biases = [lin.bias for lin in (a.q_proj, a.k_proj, a.v_proj) if lin.bias is not None]
    return [a.q_proj.weight, a.k_proj.weight, a.v_proj.weight, *biases, a.o_proj.weight, m.gate_proj.weight,
            m.up_proj.weight, m.down_proj.weight, layer.input_layernorm.weight, layer.post_attention_layernorm.weight]


def stamp_of(tensors) -> tuple:
    # data_ptr catches replaced tensors (load_state_dict(assign=True), .to()), _version catches in-place updates
    # (optimizer steps, copy_): a cached copy is never used after its source changed. Inference tensors (a model
    # built under inference_mode) have no version counter; they cannot be trained, so their pointer must do.
    return tuple((t.data_ptr(), -1 if t.is_inference() else t._version, t.dtype, t.device) for t in tensors)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm: `torch.rms_norm` for float32 (bit-identical there), Hugging Face's float32 round trip else."""
    if x.dtype == torch.float32:
        return torch.rms_norm(x, (x.shape[-1],), weight, eps)
    x32 = x.to(torch.float32)
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


class RopeTable:
    """cos/sin for every position, built once (and grown on demand) with the rotary module's own inverse
    frequencies: position * inv_freq is the same float32 product either way, so the table holds exactly the numbers
    the module computes per call."""

    def __init__(self, rotary, head_dim: int, dtype, device, length: int = ROPE_TABLE_MIN):
        self.head_dim, self.dtype, self.device = head_dim, dtype, device
        self.inv_freq = rotary.inv_freq.detach().to(device, torch.float32)
        self.scaling = float(rotary.attention_scaling)
        self.cos = self.sin = torch.empty(0)
        self._grow(max(ROPE_TABLE_MIN, int(length)))

    def _grow(self, n: int) -> None:
        # cast to the model dtype; sin carries rotate_half's sign so that rotate_half(x) * sin == roll(x) * sin_signed
        pos = torch.arange(n, dtype=torch.float32, device=self.device)
        freqs = pos[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * self.scaling).to(self.dtype)
        sin = (emb.sin() * self.scaling).to(self.dtype)
        sin[:, : self.head_dim // 2].neg_()
        self.cos, self.sin = cos, sin

    def rows(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [stop - start, 1, head_dim] for consecutive positions start..stop-1."""
        if stop > self.cos.shape[0]:
            self._grow(max(stop, 2 * self.cos.shape[0]))
        return self.cos[start:stop, None], self.sin[start:stop, None]

    def at(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [len(positions), 1, head_dim] for arbitrary positions (a LongTensor)."""
        top = int(positions.max()) + 1
        if top > self.cos.shape[0]:
            self._grow(max(top, 2 * self.cos.shape[0]))
        return self.cos.index_select(0, positions)[:, None], self.sin.index_select(0, positions)[:, None]


class LayerWeights:
    """One Llama-style decoder layer's weights in inference layout (q/k/v as one matrix) and the pieces of its
    forward: the EAGLE draft's single layer and every layer of the fused target path."""

    def __init__(self, layer, hidden_size: int, heads: int, kv_heads: int, head_dim: int):
        attn, mlp = layer.self_attn, layer.mlp
        self.d = hidden_size
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.q_width = heads * head_dim
        self.kv_width = kv_heads * head_dim
        self.scale = attn.scaling
        self.eps1 = float(layer.input_layernorm.variance_epsilon)
        self.eps2 = float(layer.post_attention_layernorm.variance_epsilon)
        with torch.no_grad():
            self.qkv_w = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight], 0).detach()
            self.qkv_b = (torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias], 0).detach()
                          if attn.q_proj.bias is not None else None)
            self.o_w = attn.o_proj.weight.detach().clone()
            # gate and up stay two products: one [2I, d] product measured no faster at batch 1
            self.gate_w = mlp.gate_proj.weight.detach().clone()
            self.up_w = mlp.up_proj.weight.detach().clone()
            self.down_w = mlp.down_proj.weight.detach().clone()
            self.ln1 = layer.input_layernorm.weight.detach().clone()
            self.ln2 = layer.post_attention_layernorm.weight.detach().clone()
        self.q_w = self.qkv_w[: self.q_width]
        self.kv_w = self.qkv_w[self.q_width :]

    def rms(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return rms_norm(x, weight, eps)

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x * cos + rotate_half(x) * sin for x [n, heads, head_dim] (the same products and sum)."""
        return x * cos + x.roll(self.head_dim // 2, -1) * sin

    def qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Rotated queries [n, heads, hd], rotated keys and values [n, kv_heads, hd] of the normed input x."""
        n = x.shape[0]
        qkv = F.linear(x, self.qkv_w, self.qkv_b)
        qk_width = self.q_width + self.kv_width
        qk = self.rotate(qkv[:, :qk_width].view(n, self.heads + self.kv_heads, self.head_dim), cos, sin)
        return qk[:, : self.heads], qk[:, self.heads :], qkv[:, qk_width:].view(n, self.kv_heads, self.head_dim)

    def attend(self, q: torch.Tensor, cache: "KVBuffer", length: int, mask: torch.Tensor | None) -> torch.Tensor:
        """q [n, heads, head_dim] over the first `length` cached keys -> attention output [n, heads * head_dim]."""
        n = q.shape[0]
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1)[None], cache.keys[None, :, :length], cache.values[None, :, :length],
            attn_mask=mask, scale=self.scale, enable_gqa=self.kv_heads != self.heads,
        )
        return out[0].transpose(0, 1).reshape(n, self.q_width)

    def finish(self, h: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """Residual + o_proj, then the MLP block: the layer's output for each row."""
        h = h + F.linear(attn, self.o_w)
        x = self.rms(h, self.ln2, self.eps2)
        return h + F.linear(F.silu(F.linear(x, self.gate_w)) * F.linear(x, self.up_w), self.down_w)


class KVBuffer:
    """Keys and values of one layer, [kv_heads, capacity, head_dim] each, filled up to `length`. Growing doubles
    the capacity (a copy); shrinking only moves `length`."""

    def __init__(self, kv_heads: int, head_dim: int, dtype, device, capacity: int = 256):
        self.keys = torch.empty(kv_heads, capacity, head_dim, dtype=dtype, device=device)
        self.values = torch.empty_like(self.keys)
        self.length = 0

    @property
    def capacity(self) -> int:
        return self.keys.shape[1]

    def get_seq_length(self) -> int:  # the DynamicCache name, so callers can read either
        return self.length

    def reserve(self, n: int) -> None:
        if n <= self.capacity:
            return
        cap = max(n, 2 * self.capacity)
        keys = self.keys.new_empty(self.keys.shape[0], cap, self.keys.shape[2])
        values = torch.empty_like(keys)
        keys[:, : self.length] = self.keys[:, : self.length]
        values[:, : self.length] = self.values[:, : self.length]
        self.keys, self.values = keys, values

    def write(self, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v [n, kv_heads, head_dim] at slots start..start+n-1; the buffer then ends there."""
        n = k.shape[0]
        self.reserve(start + n)
        self.keys[:, start : start + n] = k.transpose(0, 1)
        self.values[:, start : start + n] = v.transpose(0, 1)
        self.length = start + n

    def truncate(self, n: int) -> None:
        self.length = min(self.length, n)
