"""Reading the rows of a `padrec bench` result. Kept apart from `bench.py` so that the scripts that only read
committed bench JSON do not import torch."""

from __future__ import annotations

SPECULATIVE = "sd "  # the prefix of a speculative decoder's row name: `sd <tree label>`


def speculative_rows(rows: list[dict]) -> list[dict]:
    """The rows of a bench result that time a speculative decoder (the AR baselines left out)."""
    return [r for r in rows if r["decoder"].startswith(SPECULATIVE)]
