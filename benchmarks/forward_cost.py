"""What a speculative round costs on this machine, by target shape: one fused forward over q new tokens (after a
100-token context) against a single-token step, for random-weight Llama targets and a one-layer draft-sized model.

    .venv/bin/python benchmarks/forward_cost.py [--threads 2] [--q 9] [--out benchmarks/results/forward_cost.json]

Speculative decoding pays off when a forward over the pending token and the drafted ones costs about what one
autoregressive step costs. Weights are random: timings do not depend on them. `bound` is the speedup a free draft
could reach with τ committed tokens per round: τ · step / forward(q) (forced tokens aside).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from padrec.models.fast_target import fast_target
from padrec.provenance import machine_description
from padrec.ui import console, table

SHAPES = {  # name: (layers, hidden, heads, intermediate)
    "small 4x256": (4, 256, 4, 768),
    "deep 12x256": (12, 256, 4, 768),
    "deeper 24x256": (24, 256, 4, 768),
    "wide 8x512": (8, 512, 8, 2048),
    "wide 12x512": (12, 512, 8, 1536),
    "narrow 16x128": (16, 128, 4, 384),
    "narrow 24x128": (24, 128, 4, 384),
    "narrow 24x192": (24, 192, 4, 576),
    "draft 1x256": (1, 256, 4, 768),
    "draft 1x128": (1, 128, 4, 384),
}


def _model(layers: int, hidden: int, heads: int, inter: int, vocab: int = 785) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=heads, intermediate_size=inter, max_position_embeddings=512)
    return LlamaForCausalLM(cfg).eval()


def _ms(ft, q: int, context: int = 100, reps: int = 30) -> float:
    bufs = ft.new_cache()
    ft.forward(bufs, [4 + i % 700 for i in range(context)], 0)
    toks = [5 + i for i in range(q)]
    for _ in range(5):
        ft.forward(bufs, toks, context)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        ft.forward(bufs, toks, context)
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--q", type=int, default=9, help="tokens of one verification (pending + drafted)")
    ap.add_argument("--tau", type=float, default=6.0, help="committed tokens per round, for the bound column")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "forward_cost.json"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    rows = []
    with torch.inference_mode():
        for name, shape in SHAPES.items():
            model = _model(*shape)
            ft = fast_target(model)
            one, many = _ms(ft, 1), _ms(ft, a.q)
            rows.append({"shape": name, "params M": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
                         "1-token ms": round(one, 2), f"{a.q}-token ms": round(many, 2),
                         "ratio": round(many / one, 2), "bound": round(a.tau * one / many, 2)})
    console.print(table(rows, title=f"fused forward cost, {a.threads} thread(s), 100-token context"))
    out = Path(a.out)
    out.write_text(json.dumps({"command": " ".join(["benchmarks/forward_cost.py", *sys.argv[1:]]),
                               "machine": machine_description(), "rows": rows}, indent=2))
    console.print(f"written {out}")


if __name__ == "__main__":
    main()
