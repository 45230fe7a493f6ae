"""Build a trained checkpoint in the LC-Rec / MiniOneRec format, as such a project would hand it over: a Hugging
Face causal LM (LLaMA or Qwen2) whose tokenizer has the SID strings as added tokens, an item index JSON
{item id: [SID token strings]}, an Alpaca-style or chat prompt, weights in safetensors, and a padrec manifest.

It stands in for a user's own training code (nothing here is padrec's): the tests build tiny ones, and
`python benchmarks/lcrec_style.py --run zoo:beauty --out DIR` builds the speed figure's model on Beauty with the zoo
run's semantic IDs. Loss is on the response (the item's SID tokens and the end token), as in those projects.

    python benchmarks/lcrec_style.py --run zoo:beauty --out runs/lcrec-beauty --arch llama --layers 12 --hidden 256
    padrec import-model --manifest runs/lcrec-beauty/manifest.json --dataset beauty --run runs/beauty-imported
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

ALPACA = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
          "request.\n\n### Instruction:\nThe user has interacted with items {history} in chronological order. "
          "Can you predict the next possible item that the user may expect?\n\n### Response:\n")
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CHAT = [{"role": "system", "content": "You are a recommender."},
        {"role": "user", "content": "Items bought so far: {history}. Which item comes next?"}]
LEVEL_NAMES = "abcdefgh"


def sid_strings(codes) -> list[list[str]]:
    return [[f"<{LEVEL_NAMES[lv]}_{c}>" for lv, c in enumerate(row)] for row in codes]


def build_tokenizer(out: Path, texts: list[str], sids: list[list[str]], style: str, vocab_size: int = 400,
                    sid_lstrip: bool = False):
    """`sid_lstrip`: the SID tokens swallow the whitespace before them (AddedToken(lstrip=True)), a tokenizer that
    merges across the prompt/item boundary when the prompt ends with a space."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"] + (["<|im_start|>", "<|im_end|>"] if style == "chat" else [])
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if style == "alpaca":  # LLaMA-style: the tokenizer puts BOS in front
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                 unk_token="<unk>")
    if style == "chat":
        hf.chat_template = CHAT_TEMPLATE
    hf.add_tokens([AddedToken(s, lstrip=sid_lstrip) for s in sorted({s for item in sids for s in item})])
    hf.save_pretrained(out)
    return hf


def build_model(arch: str, vocab: int, layers: int, hidden: int, heads: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    kw = dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
              num_key_value_heads=heads, intermediate_size=3 * hidden, max_position_embeddings=2048)
    torch.manual_seed(seed)
    if arch == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**kw, tie_word_embeddings=True))
    return LlamaForCausalLM(LlamaConfig(**kw, tie_word_embeddings=False))


def render(tokenizer, style: str, history_sids: list[str]) -> list[int]:
    history = ", ".join(history_sids)
    if style == "chat":
        msgs = [{**m, "content": m["content"].replace("{history}", history)} for m in CHAT]
        return tokenizer.encode(tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True),
                                add_special_tokens=False)
    return tokenizer.encode(ALPACA.replace("{history}", history))


def examples(tokenizer, style: str, sequences, sids: list[list[str]], max_history: int, end_id: int):
    out = []
    for seq in sequences:
        for t in range(1, len(seq)):
            prompt = render(tokenizer, style, ["".join(sids[i]) for i in seq[max(0, t - max_history):t]])
            response = tokenizer.convert_tokens_to_ids(sids[seq[t]]) + [end_id]
            out.append((prompt + response, len(prompt)))
    return out


def train(model, data, epochs: int, batch: int, lr: float, seed: int, pad_id: int, minutes: float | None = None,
          log=print) -> dict:
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    model.train()
    start, steps, last = time.time(), 0, float("nan")
    for epoch in range(epochs):
        order = list(range(len(data)))
        rng.shuffle(order)
        total = 0.0
        for b in range(0, len(order), batch):
            part = [data[i] for i in order[b:b + batch]]
            n = max(len(ids) for ids, _ in part)
            ids = torch.full((len(part), n), pad_id)
            labels = torch.full((len(part), n), -100)
            mask = torch.zeros((len(part), n), dtype=torch.long)
            for r, (seq, p) in enumerate(part):
                ids[r, :len(seq)] = torch.tensor(seq)
                labels[r, p:len(seq)] = torch.tensor(seq[p:])
                mask[r, :len(seq)] = 1
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(part)
            steps += 1
            if minutes is not None and time.time() - start > 60 * minutes:
                break
        last = total / max(1, len(data))
        log(f"epoch {epoch + 1}: loss {last:.4f} ({time.time() - start:.0f} s)")
        if minutes is not None and time.time() - start > 60 * minutes:
            break
    model.eval()
    return {"epochs": epoch + 1, "steps": steps, "loss": last, "seconds": round(time.time() - start, 1)}


def build_checkpoint(out: Path, dataset, codes, style: str = "alpaca", arch: str = "llama", layers: int = 2,
                     hidden: int = 32, heads: int = 2, epochs: int = 3, batch: int = 16, lr: float = 3e-3,
                     max_history: int = 10, seed: int = 0, minutes: float | None = None, log=print) -> dict:
    """Tokenizer, trained model, item index and manifest in `out`; returns the manifest's path and training stats."""
    out = Path(out)
    model_dir = out / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    sids = sid_strings(codes)
    template = ALPACA if style == "alpaca" else " ".join(m["content"] for m in CHAT)
    texts = [template] + [it.title or "" for it in dataset.items]
    tok = build_tokenizer(model_dir, texts, sids, style)
    model = build_model(arch, len(tok), layers, hidden, heads, seed)
    data = examples(tok, style, dataset.train_sequences(), sids, max_history, tok.eos_token_id)
    stats = train(model, data, epochs, batch, lr, seed, tok.pad_token_id, minutes, log)
    model.save_pretrained(model_dir)
    index = {str(it.raw_id): s for it, s in zip(dataset.items, sids)}
    (out / "index.json").write_text(json.dumps(index))
    manifest = {"model_dir": "model", "item_index": "index.json", "item_end": tok.eos_token,
                "history_item": "{sid}", "history_join": ", ", "max_history": max_history}
    if style == "chat":
        manifest["chat"] = CHAT
    else:
        manifest["prompt"] = ALPACA
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return {"manifest": str(out / "manifest.json"), "examples": len(data),
            "params": sum(p.numel() for p in model.parameters()), **stats}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="a padrec run (or zoo:NAME) whose dataset and SIDs to use")
    ap.add_argument("--out", required=True)
    ap.add_argument("--style", choices=["alpaca", "chat"], default="alpaca")
    ap.add_argument("--arch", choices=["llama", "qwen2"], default="llama")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--minutes", type=float, default=None, help="stop training after this long")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--max-history", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from padrec.run import Run

    run = Run(a.run)
    res = build_checkpoint(Path(a.out), run.dataset, run.sids.codes.tolist(), a.style, a.arch, a.layers, a.hidden,
                           a.heads, a.epochs, a.batch, a.lr, a.max_history, minutes=a.minutes)
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
