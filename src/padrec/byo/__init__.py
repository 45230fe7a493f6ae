"""Bring your own trained recommender: a Hugging Face checkpoint whose tokenizer holds the SID strings as added
tokens (LC-Rec, MiniOneRec style), used as it is, through every padrec decoder.

How it fits the engine: padrec's decoders work in a *dense* vocabulary (PAD, BOS, EOS, SEP, then the SID tokens).
An imported model keeps its own vocabulary; padrec numbers it differently, by a permutation of the tokenizer's ids
(`vocab_map.py`): dense 0..3 are the checkpoint's pad/bos/eos tokens and the token that ends an item, dense 4.. its
SID tokens level by level, and every other token (the prompt's text, unused and padded rows) follows. The model's
embedding and LM-head rows are permuted in memory at load (`checkpoint.py`), so it computes the same logits, over its
full vocabulary, under other names. Prompts are the checkpoint's own template, rendered and tokenised by its own
tokenizer (`prompt.py`), then renamed. Nothing on disk is changed or copied.
"""
