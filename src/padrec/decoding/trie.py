"""Exact prefix trie over the catalogue's semantic IDs, and the per-list decoding constraint.

`ItemTrie` is built once per catalogue. Nodes are numbered in DFS order with node 0 the root; a node at depth
d stands for one d-token prefix that at least one catalogue item has. For each node it precomputes:
  * the allowed child tokens, sorted ascending, as a tuple (`child_tokens`) and as a LongTensor (`child_tensor`),
  * the child node ids (`child_nodes`, aligned with `child_tokens`) and a token -> child dict (`child_of`),
  * the number of items below it (`item_count`) and, since items are numbered below in DFS order, the items below
    it as a contiguous slice of `items_sorted` (`items_below(node)`).
Leaves sit at depth L and map to exactly one item.

`ListConstraint` is the state of one generated list (shared by the autoregressive, beam and speculative decoders).
Inside an item the allowed tokens are the children of the current node that still lead to a non-banned item;
after the L-th token exactly [SEP] is allowed; after SEP the next item starts again at the root. Banned items are
the user's history (when excluded) and, with `no_duplicates`, the items already generated in this list. Banning
is incremental: each ban adds one to a sparse per-node count of banned leaves below the node along the item's
path, so a node is live iff `item_count[node] > banned_below[node]`. `copy()` is cheap (a few small containers).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from padrec import PadrecError
from padrec.tokenizer.vocab import NUM_SPECIAL, SEP

__all__ = ["ItemTrie", "ListConstraint"]

_SEP_TUPLE = (SEP,)


class ItemTrie:
    """Prefix trie over the items' SID token tuples (all of the same length L, unique, no special tokens)."""

    def __init__(self, item_tokens: Sequence[Sequence[int]]):
        items = [tuple(int(t) for t in toks) for toks in item_tokens]
        if not items:
            raise PadrecError("cannot build an item trie over an empty catalogue")
        levels = len(items[0])
        if levels < 1:
            raise PadrecError("items need at least one semantic-ID token")
        for i, toks in enumerate(items):
            if len(toks) != levels:
                raise PadrecError(f"item {i} has {len(toks)} SID tokens, expected {levels} like item 0")
            if min(toks) < NUM_SPECIAL:
                raise PadrecError(f"item {i} uses a special token id in its SID {toks}")
        if len(set(items)) != len(items):
            raise PadrecError("catalogue SIDs are not unique: a trie cannot tell duplicate items apart")
        self.levels: int = levels
        self.item_tokens: list[tuple[int, ...]] = items
        self.num_items: int = len(items)
        self.sep: int = SEP

        # Items in lexicographic SID order; DFS numbering makes the items below any node a contiguous range.
        order = sorted(range(len(items)), key=items.__getitem__)
        self.items_sorted: tuple[int, ...] = tuple(order)

        parent: list[int] = [-1]
        depth: list[int] = [0]
        children: list[dict[int, int]] = [{}]
        first: list[int] = [0]  # first index into items_sorted of the items below each node
        count: list[int] = [0]
        leaf_item: dict[int, int] = {}
        item_leaf = [0] * len(items)
        for rank, item in enumerate(order):
            node = 0
            count[0] += 1
            for d, tok in enumerate(items[item]):
                nxt = children[node].get(tok)
                if nxt is None:
                    nxt = len(parent)
                    children[node][tok] = nxt
                    parent.append(node)
                    depth.append(d + 1)
                    children.append({})
                    first.append(rank)
                    count.append(0)
                node = nxt
                count[node] += 1
            leaf_item[node] = item
            item_leaf[item] = node

        self.num_nodes: int = len(parent)
        self.parent: list[int] = parent
        self.depth: list[int] = depth
        self.item_count: list[int] = count
        self._first = first
        self.leaf_item: dict[int, int] = leaf_item
        self.item_leaf: list[int] = item_leaf
        self.child_of: list[dict[int, int]] = children
        self.child_tokens: list[tuple[int, ...]] = []
        self.child_nodes: list[tuple[int, ...]] = []
        for ch in children:
            toks = tuple(sorted(ch))
            self.child_tokens.append(toks)
            self.child_nodes.append(tuple(ch[t] for t in toks))
        # One flat buffer; the per-node tensors are views into it (cheap to build even for large catalogues).
        flat = torch.tensor([t for toks in self.child_tokens for t in toks] or [0], dtype=torch.long)
        self.child_tensor: list[torch.Tensor] = []
        off = 0
        for toks in self.child_tokens:
            self.child_tensor.append(flat[off : off + len(toks)])
            off += len(toks)
        self.sep_tensor = torch.tensor([SEP], dtype=torch.long)
        # path (root excluded, leaf included) of every item, for incremental banning
        self.item_path: list[tuple[int, ...]] = []
        for item in range(len(items)):
            node, path = item_leaf[item], []
            while node > 0:
                path.append(node)
                node = parent[node]
            self.item_path.append(tuple(reversed(path)))

    def items_below(self, node: int) -> tuple[int, ...]:
        """Item ids whose SID starts with the prefix of `node` (in lexicographic SID order)."""
        lo = self._first[node]
        return self.items_sorted[lo : lo + self.item_count[node]]

    def node_of(self, prefix: Sequence[int]) -> int | None:
        """Node of a token prefix (no SEP), or None when no catalogue item starts with it."""
        node = 0
        for tok in prefix:
            node = self.child_of[node].get(int(tok))
            if node is None:
                return None
        return node

    def item_of(self, tokens: Sequence[int]) -> int | None:
        node = self.node_of(tokens)
        return None if node is None else self.leaf_item.get(node)

    def constraint(self, banned_items: Iterable[int] = (), no_duplicates: bool = True) -> "ListConstraint":
        return ListConstraint(self, banned_items, no_duplicates)

    def parse_items(self, tokens: Sequence[int]) -> list[int]:
        """Item ids of a `[BOS]? (L tokens SEP)*` sequence, e.g. a prompt; chunks that are no catalogue item are skipped."""
        out, chunk = [], []
        for tok in tokens:
            tok = int(tok)
            if tok == SEP:
                item = self.item_of(chunk) if len(chunk) == self.levels else None
                if item is not None:
                    out.append(item)
                chunk = []
            elif tok >= NUM_SPECIAL:
                chunk.append(tok)
        return out


class ListConstraint:
    """Which tokens may come next in one generated list. See the module docstring."""

    __slots__ = ("trie", "node", "no_duplicates", "banned", "_banned_below", "completed_items", "_filtered")

    def __init__(self, trie: ItemTrie, banned_items: Iterable[int] = (), no_duplicates: bool = True):
        self.trie = trie
        self.node = 0  # current trie node; a leaf (depth L) means the item is complete and SEP is due
        self.no_duplicates = bool(no_duplicates)
        self.banned: set[int] = set()
        self._banned_below: dict[int, int] = {}
        self.completed_items: list[int] = []
        self._filtered: dict[int, tuple[tuple[int, ...], torch.Tensor]] = {}
        for item in banned_items:
            self.ban(int(item))

    # -- state -------------------------------------------------------------------------------------------
    @property
    def position(self) -> int:
        """Tokens of the current item emitted so far (0..L); L means the next token is SEP."""
        return self.trie.depth[self.node]

    @property
    def at_item_start(self) -> bool:
        return self.node == 0

    @property
    def remaining_items(self) -> int:
        """Items not banned (the most further distinct items this list could still hold with no_duplicates)."""
        return self.trie.num_items - len(self.banned)

    def copy(self) -> "ListConstraint":
        new = object.__new__(ListConstraint)
        new.trie = self.trie
        new.node = self.node
        new.no_duplicates = self.no_duplicates
        new.banned = set(self.banned)
        new._banned_below = dict(self._banned_below)
        new.completed_items = list(self.completed_items)
        new._filtered = dict(self._filtered)  # values are immutable
        return new

    def ban(self, item: int) -> None:
        """Exclude `item` from the rest of this list (no-op when already banned)."""
        trie = self.trie
        if not 0 <= item < trie.num_items:
            raise PadrecError(f"cannot ban unknown item {item} (catalogue has {trie.num_items} items)")
        if item in self.banned:
            return
        self.banned.add(item)
        bb, filt = self._banned_below, self._filtered
        bb[0] = bb.get(0, 0) + 1
        filt.pop(0, None)
        for node in trie.item_path[item]:
            bb[node] = bb.get(node, 0) + 1
            filt.pop(node, None)

    def is_live(self, node: int) -> bool:
        """Whether at least one non-banned item lies below `node`."""
        return self.trie.item_count[node] > self._banned_below.get(node, 0)

    # -- allowed tokens -----------------------------------------------------------------------------------
    def children_allowed(self, node: int) -> tuple[tuple[int, ...], torch.Tensor]:
        """(tokens, LongTensor) of the children of a non-leaf `node` that lead to a non-banned item.

        Precomputed tuples/tensors when nothing below `node` is banned; otherwise filtered once and cached until the
        next ban touches this node. May be empty (every item below is banned).
        """
        trie = self.trie
        nb = self._banned_below.get(node)
        if not nb:
            return trie.child_tokens[node], trie.child_tensor[node]
        hit = self._filtered.get(node)
        if hit is not None:
            return hit
        bb, count = self._banned_below, trie.item_count
        toks = tuple(
            t for t, ch in zip(trie.child_tokens[node], trie.child_nodes[node]) if count[ch] > bb.get(ch, 0)
        )
        hit = (toks, torch.tensor(toks, dtype=torch.long))
        self._filtered[node] = hit
        return hit

    def allowed_with_tensor(self) -> tuple[tuple[int, ...], torch.Tensor]:
        """The allowed next tokens as (sorted tuple, LongTensor). Raises PadrecError when nothing is allowed."""
        node = self.node
        trie = self.trie
        if trie.depth[node] == trie.levels:
            return _SEP_TUPLE, trie.sep_tensor
        res = self.children_allowed(node)
        if not res[0]:
            raise PadrecError(
                f"no item can be generated: all {trie.num_items} catalogue items are banned "
                f"(history excluded and/or already in the list)"
            )
        return res

    def allowed(self) -> tuple[int, ...]:
        return self.allowed_with_tensor()[0]

    def is_forced(self) -> bool:
        """Exactly one token is allowed (SEP after the last level, or a node with a single live child)."""
        return len(self.allowed_with_tensor()[0]) == 1

    def is_allowed(self, token: int) -> bool:
        trie = self.trie
        node = self.node
        if trie.depth[node] == trie.levels:
            return token == SEP
        child = trie.child_of[node].get(token)
        return child is not None and self.is_live(child)

    # -- transitions --------------------------------------------------------------------------------------
    def advance(self, token: int) -> int | None:
        """Consume one token. Returns the item id when this token completes an item's L SID tokens, else None.

        The item counts as generated (and, with no_duplicates, is banned) as soon as its last SID token is
        consumed; the following SEP only moves back to the root.
        """
        trie = self.trie
        node = self.node
        if trie.depth[node] == trie.levels:
            if token != SEP:
                raise PadrecError(f"token {token} not allowed: an item is complete and SEP ({SEP}) must follow")
            self.node = 0
            return None
        child = trie.child_of[node].get(token)
        if child is None or not self.is_live(child):
            raise PadrecError(f"token {token} not allowed here (allowed: {self.children_allowed(node)[0]})")
        self.node = child
        if trie.depth[child] == trie.levels:
            item = trie.leaf_item[child]
            self.completed_items.append(item)
            if self.no_duplicates:
                self.ban(item)
            return item
        return None
