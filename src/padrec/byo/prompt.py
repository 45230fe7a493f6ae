"""Prompts in the checkpoint's own words: its template around the history, tokenised by its own tokenizer, then
renamed into padrec's dense ids."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from padrec import PadrecError
from padrec.byo.manifest import ModelManifest


class PromptRenderer:
    def __init__(self, manifest: ModelManifest, tokenizer, item_strings: list[list[str]], titles: list[str],
                 dense_of_hf: np.ndarray):
        self.m, self.tok = manifest, tokenizer
        self.item_strings, self.titles = item_strings, titles
        self.dense_of_hf = dense_of_hf
        if manifest.chat is not None and not getattr(tokenizer, "chat_template", None):
            raise PadrecError("the manifest gives chat messages but the tokenizer has no chat template; "
                              "give 'prompt' instead, or a tokenizer with its chat_template")

    def history_text(self, history: Sequence[int]) -> str:
        m = self.m
        return m.history_join.join(
            m.history_item.replace("{sid}", "".join(self.item_strings[i])).replace("{title}", self.titles[i])
            for i in list(history)[-m.max_history:])

    def text(self, history: Sequence[int]) -> str:
        """The whole prompt as text (for a chat, after the tokenizer's template), response prefix included."""
        m, h = self.m, self.history_text(history)
        if m.prompt is not None:
            return m.prompt.replace("{history}", h) + m.response_prefix
        messages = [{**msg, "content": msg.get("content", "").replace("{history}", h)} for msg in m.chat]
        rendered = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return rendered + m.response_prefix

    def _encode(self, text: str) -> list[int]:
        special = self.m.add_special_tokens if self.m.prompt is not None else False  # a chat template has its own
        return self.tok.encode(text, add_special_tokens=special)

    def hf_ids(self, history: Sequence[int]) -> list[int]:
        return self._encode(self.text(history))

    def dense_ids(self, history: Sequence[int]) -> list[int]:
        return self.dense_of_hf[np.asarray(self.hf_ids(history), dtype=np.int64)].tolist()

    def check_boundary(self, history: Sequence[int], items: Sequence[int], item_hf_ids) -> None:
        """The prompt's tokens are a strict prefix of the tokens of prompt + item, the rest being exactly the item's
        SID tokens: the model was trained on that text, and padrec feeds the prompt and then the item's tokens."""
        text = self.text(history)
        base = self._encode(text)
        for i in items:
            whole = self._encode(text + "".join(self.item_strings[i]))
            if whole[: len(base)] != base or whole[len(base):] != list(item_hf_ids(i)):
                raise PadrecError(
                    f"the prompt and item {i}'s SID merge into other tokens at their boundary: encode(prompt) = "
                    f"...{base[-3:]}, encode(prompt + item) = ...{whole[len(base) - 3:]}; end the prompt or "
                    "response_prefix with text that tokenises on its own (e.g. a newline), as at training")
