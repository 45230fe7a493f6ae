"""A draft's acceptance table: P(the target takes the draft's rank-r candidate | item slot, draft margin bucket),
as fitted by `padrec calibrate` (speculative/calibration.py says how and why) and saved next to the draft as
acceptance.json; calibrated trees (speculative/tree.py) score candidates by it.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from padrec import PadrecError
from padrec.files import atomic_write_text

ACCEPTANCE_FILE = "acceptance.json"
RANKS = 4  # ranks 0..RANKS-1 are modelled one by one; a deeper rank gets the leftover mass spread thinly
_FLOOR = 1e-4


@dataclass(frozen=True)
class AcceptanceModel:
    levels: int  # SID levels L; slots 0..L-1 (SEP is always forced, never scored)
    edges: list[list[float]]  # per slot: ascending margin cut points between buckets (B - 1 of them)
    probs: list[list[list[float]]]  # [slot][bucket][rank 0..RANKS-1]: P(target's choice has that draft rank)
    samples: list[int]  # nodes seen per slot
    weights_sha256: str = ""  # of the draft weights the table was fitted for (stale tables are refused)

    def rank_logprobs(self, slot: int, margin: float, n: int) -> list[float]:
        """Log-probabilities that the target's choice is the draft's candidate of rank 0..n-1, at a node whose next
        token fills `slot` and whose draft margin (best minus second-best log-prob) is `margin`."""
        slot = min(max(slot, 0), self.levels - 1)
        bucket = sum(margin > e for e in self.edges[slot])
        p = self.probs[slot][bucket]
        return [math.log(max(p[r] if r < len(p) else _deeper_rank(p, r), _FLOOR)) for r in range(n)]

    def best_logprob(self, slot: int) -> float:
        """The highest log-probability `rank_logprobs` can give at `slot`, over every margin and rank (an upper
        bound before the margin is known: lets a tree skip a draft step whose children could not pass its
        threshold). Not always rank 0's: a draft can be systematically wrong in a way the table records."""
        slot = min(max(slot, 0), self.levels - 1)
        best = max(max(max(p), _deeper_rank(p, len(p))) for p in self.probs[slot])
        return math.log(max(best, _FLOOR))

    def top_accept(self) -> list[float]:
        """Mean probability that the draft's top candidate is taken, per slot (for reports)."""
        out = []
        for s in range(self.levels):
            rows = self.probs[s]
            out.append(sum(r[0] for r in rows) / len(rows))
        return out

    # -- files ----------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "AcceptanceModel":
        try:
            m = cls(levels=int(d["levels"]), edges=[[float(x) for x in e] for e in d["edges"]],
                    probs=[[[float(x) for x in r] for r in b] for b in d["probs"]],
                    samples=[int(x) for x in d["samples"]], weights_sha256=str(d.get("weights_sha256", "")))
        except (KeyError, TypeError, ValueError) as e:
            raise PadrecError(f"malformed acceptance table: {e}") from e
        if len(m.edges) != m.levels or len(m.probs) != m.levels or any(
                len(b) != len(e) + 1 for b, e in zip(m.probs, m.edges)):
            raise PadrecError("malformed acceptance table: slot / bucket counts disagree")
        return m

    def save(self, path: Path) -> None:
        atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: Path, weights_sha256: str | None = None) -> "AcceptanceModel":
        try:
            d = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise PadrecError(f"cannot read acceptance table {path}: {e}") from e
        m = cls.from_dict(d)
        if weights_sha256 is not None and m.weights_sha256 != weights_sha256:
            raise PadrecError(f"acceptance table {path} was fitted for other draft weights (retrained draft?); "
                              f"refit it with `padrec calibrate`")
        return m


def _deeper_rank(p: list[float], r: int) -> float:
    """P(rank r) for a rank beyond the table (r >= len(p)): the leftover mass, spread thinner with depth."""
    return max(1.0 - sum(p), _FLOOR) / (4 * (r - len(p) + 1))
