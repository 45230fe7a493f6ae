"""The one interface every draft implements (independent LM, EAGLE, HASS, PAD-Rec).

A speculative round looks like this (`padrec.speculative`):

    session = draft.new_session()
    session.commit(tokens, features)        # the committed context grows (prompt, then each round's accepted tokens)
    logits = session.propose(parents, tokens, depths)   # score children of a set of tree nodes, depth by depth
    ...                                     # the target verifies the tree in one forward
    session.rollback()                      # forget every speculative node, keep the committed context
    session.commit(accepted_tokens, their_features)

Feature convention (EAGLE family). `features[i]` is the target's last hidden state (after the final norm, the input
of the LM head) at the position *before* `tokens[i]`, i.e. the state that predicted `tokens[i]`. A feature-level
draft consumes the pair (embed(tokens[i]), features[i]) and predicts the next feature. Drafts that do not use
features (`uses_target_features = False`) ignore them; callers may pass None.

Speculative nodes: `propose(parents, tokens, depths)` appends one speculative node per entry: node j has token
`tokens[j]`, sits at tree depth `depths[j]` (1 = child of the last committed token) and hangs below node
`parents[j]`, where -1 is the last committed token and k >= 0 is the k-th node appended since the last
commit/rollback (in call order across propose calls). It returns next-token logits [len(tokens), V] for the
new nodes, each computed from the committed context plus the node's own ancestor path only (tree attention).
A feature-level draft uses its own predicted feature of the parent as the feature of a speculative node.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch


class DraftSession(ABC):
    """Per-request state of a draft (its KV cache over the committed context plus speculative nodes)."""

    @abstractmethod
    def commit(self, tokens: Sequence[int], features: torch.Tensor | None) -> torch.Tensor:
        """Append committed tokens (features: [len(tokens), d_target] or None). Returns next-token logits [V] after
        the last committed token (the draft's prediction for depth 1)."""

    @abstractmethod
    def propose(self, parents: Sequence[int], tokens: Sequence[int], depths: Sequence[int]) -> torch.Tensor:
        """Append speculative nodes; returns their next-token logits [len(tokens), V]."""

    @abstractmethod
    def rollback(self) -> None:
        """Drop all speculative nodes appended since the last commit/rollback."""


class Draft(ABC):
    """A trained draft model bound to one target (same vocabulary)."""

    uses_target_features: bool = False
    name: str = "draft"
    # the draft's `AcceptanceModel` (speculative/calibration.py) when one was fitted: calibrated trees need it
    acceptance = None

    @abstractmethod
    def new_session(self) -> DraftSession:
        ...

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        ...
