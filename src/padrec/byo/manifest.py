"""The manifest of an imported checkpoint: where its parts are and how it writes prompts and items.

A JSON file, paths relative to it:

    {"model_dir": "model", "tokenizer_dir": "model", "item_index": "index.json",
     "prompt": "### Instruction:\\nThe user bought {history}. What next?\\n### Response:\\n",
     "history_item": "{sid}", "history_join": ", ", "item_end": "</s>", "max_history": 20, "dtype": "float32"}

`prompt` holds one `{history}` slot; or `chat` holds chat messages (one of them with `{history}`), rendered by the
tokenizer's chat template with the generation prompt, then `response_prefix`. `history_item` writes one history item
(`{sid}`: its SID token strings concatenated; `{title}`: its title). `item_end` is the one token the model writes
after an item's SID tokens (its EOS for models that answer one item); list-wise decoding writes it between items.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from padrec import PadrecError

DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class ModelManifest:
    model_dir: str
    item_index: str
    item_end: str
    tokenizer_dir: str | None = None  # default: model_dir
    prompt: str | None = None
    chat: tuple[dict, ...] | None = None
    response_prefix: str = ""
    history_item: str = "{sid}"
    history_join: str = ""
    add_special_tokens: bool = True  # the tokenizer's own BOS etc. when encoding a plain prompt
    max_history: int = 20
    dtype: str = "float32"  # what padrec computes in; parity with your own generate needs the same
    collisions: str = "refuse"

    def __post_init__(self):
        if (self.prompt is None) == (self.chat is None):
            raise PadrecError("the manifest needs exactly one of 'prompt' (a template with {history}) "
                              "and 'chat' (messages rendered by the tokenizer's chat template)")
        texts = [self.prompt] if self.prompt is not None else [m.get("content", "") for m in self.chat]
        if sum(t.count("{history}") for t in texts) != 1:
            raise PadrecError("the prompt (or exactly one chat message) must hold one {history} slot")
        if "{sid}" not in self.history_item:
            raise PadrecError("'history_item' must contain {sid}: how a history item's SID is written")
        if self.dtype not in DTYPES:
            raise PadrecError(f"unknown dtype {self.dtype!r}: expected one of {DTYPES}")
        if self.max_history < 1:
            raise PadrecError("max_history must be at least 1")
        if self.collisions != "refuse":
            raise PadrecError(f"unknown collision policy {self.collisions!r}: only 'refuse' exists (items that "
                              "share a SID cannot be told apart by a constrained decoder; deduplicate the index "
                              "with one more level, as LC-Rec and MiniOneRec do)")

    @property
    def tokenizer_path(self) -> str:
        return self.tokenizer_dir or self.model_dir

    def to_dict(self) -> dict:
        d = asdict(self)
        d["chat"] = list(self.chat) if self.chat is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict, base: Path | None = None) -> "ModelManifest":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise PadrecError(f"unknown manifest field(s) {unknown}; known: {sorted(known)}")
        missing = [k for k in ("model_dir", "item_index", "item_end") if k not in d]
        if missing:
            raise PadrecError(f"the manifest lacks {missing}")
        d = dict(d)
        if d.get("chat") is not None:
            d["chat"] = tuple(dict(m) for m in d["chat"])
        if base is not None:  # paths are relative to the manifest's folder
            for key in ("model_dir", "tokenizer_dir", "item_index"):
                if d.get(key) is not None:
                    d[key] = str((base / d[key]).resolve())
        try:
            return cls(**d)
        except TypeError as e:
            raise PadrecError(f"bad manifest: {e}") from e

    @classmethod
    def load(cls, path: Path | str) -> "ModelManifest":
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise PadrecError(f"cannot read the model manifest {path}: {e}") from e
        if not isinstance(raw, dict):
            raise PadrecError(f"{path} must hold a JSON object")
        return cls.from_dict(raw, base=path.resolve().parent)
