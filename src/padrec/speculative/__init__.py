"""Lossless speculative decoding for list-wise generation (draft trees, one-pass tree verification, greedy and
rejection-sampling acceptance). See `decoder.speculative_generate`."""

from padrec.speculative.decoder import SpecConfig, SpecResult, speculative_generate
from padrec.drafts.lm_draft_session import ModelDraft, ModelDraftSession
from padrec.speculative.tree import DraftTree, TreeConfig, build_tree
from padrec.speculative.verify import TargetSession, accept_greedy, accept_sampling, accept_tree

__all__ = [
    "DraftTree",
    "ModelDraft",
    "ModelDraftSession",
    "SpecConfig",
    "SpecResult",
    "TargetSession",
    "TreeConfig",
    "accept_greedy",
    "accept_sampling",
    "accept_tree",
    "build_tree",
    "speculative_generate",
]
