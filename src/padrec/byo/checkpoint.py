"""The user's checkpoint as it is on disk: what is refused before loading, and the load that renames its rows."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from padrec import PadrecError
from padrec.files import sha256_file
from padrec.tokenizer.vocab import BOS, EOS, PAD

WEIGHT_SUFFIXES = (".safetensors", ".bin")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise PadrecError(f"cannot read {path}: {e}") from e


def _refuse_adapter(path: Path) -> None:
    cfg = _read_json(path / "adapter_config.json")
    saved = set(cfg.get("modules_to_save") or ()) | set(cfg.get("target_modules") or ())
    rows = "" if {"embed_tokens", "lm_head"} <= saved else (
        " This adapter does not save the embedding and LM-head rows (modules_to_save lacks embed_tokens/lm_head), so "
        "the SID tokens added to the tokenizer have no trained rows in it: the base model plus this adapter cannot "
        "write SIDs as it did at training. Save them with the adapter (modules_to_save) or merge before saving.")
    raise PadrecError(f"{path} is a LoRA adapter (adapter_config.json, base {cfg.get('base_model_name_or_path')!r}), "
                      "not a whole model: merge it into its base with peft (PeftModel.from_pretrained(base, path)"
                      ".merge_and_unload().save_pretrained(out)) and import the merged folder." + rows)


def inspect_model_dir(path: Path | str) -> dict:
    """config.json and the sha256 of every weight file; refuses adapters and quantised weights with how to fix it."""
    path = Path(path)
    if not path.is_dir():
        raise PadrecError(f"model_dir {path} is not a folder")
    if (path / "adapter_config.json").is_file():
        _refuse_adapter(path)
    if not (path / "config.json").is_file():
        raise PadrecError(f"{path} has no config.json: it is not a Hugging Face model folder")
    config = _read_json(path / "config.json")
    quant = config.get("quantization_config")
    if quant:
        raise PadrecError(f"{path} holds {quant.get('quant_method', 'quantised')} weights "
                          f"({quant.get('bits', '?')}-bit): speculative decoding here is lossless against the model "
                          "it runs, and padrec has no quantised path. Import the bf16/fp32 checkpoint instead")
    files = {p.name: sha256_file(p) for p in sorted(path.iterdir()) if p.name.endswith(WEIGHT_SUFFIXES)}
    if not files:
        raise PadrecError(f"{path} has no weight files (*.safetensors or *.bin)")
    text = config.get("text_config", config)
    return {"config": config, "files": files, "vocab_size": int(text["vocab_size"]),
            "hidden_size": int(text["hidden_size"])}


def verify_weights(path: Path, files: dict[str, str]) -> None:
    for name, digest in files.items():
        p = Path(path) / name
        if not p.is_file() or sha256_file(p) != digest:
            raise PadrecError(f"{p} changed since `padrec import-model` (sha256 differs or file gone): drafts and "
                              "calibration were made for the old weights; import it again into a new run")


def load_renamed(path: Path, dtype: str, hf_of_dense: list[int]):
    """The checkpoint with its embedding and LM-head rows reordered into padrec's dense ids: row j of each is the
    checkpoint's row hf_of_dense[j]. Its logits are the checkpoint's, permuted; nothing else changes."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=getattr(torch, dtype),
                                                     attn_implementation="sdpa")
    except (OSError, ValueError) as e:
        raise PadrecError(f"cannot load a causal LM from {path}: {e}") from e
    perm = torch.as_tensor(hf_of_dense, dtype=torch.long)
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if emb.weight.shape[0] != len(perm):
        raise PadrecError(f"{path} has {emb.weight.shape[0]} embedding rows, the import recorded {len(perm)}")
    tied = head is not None and head.weight.data_ptr() == emb.weight.data_ptr()
    with torch.no_grad():
        emb.weight.copy_(emb.weight[perm])
        if head is not None and not tied:
            head.weight.copy_(head.weight[perm])
        if head is not None and getattr(head, "bias", None) is not None:
            head.bias.copy_(head.bias[perm])
    model.config.pad_token_id, model.config.bos_token_id, model.config.eos_token_id = PAD, BOS, EOS
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.pad_token_id, gen.bos_token_id, gen.eos_token_id = PAD, BOS, EOS
    return model.eval()
