"""Output shared by the CLI and the benchmark scripts: one rich console, tables from lists of dicts (rich, or
markdown for notes and the README), and PNG figures."""

from __future__ import annotations

import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

# logs and pipes get rich's 80-column default otherwise, which truncates every wide table into "…"
console = Console(highlight=False, width=None if sys.stdout.isatty() else 180)


def table(rows: list[dict], title: str | None = None, floats: str = "{:.4f}") -> Table:
    t = Table(title=title)
    if not rows:
        return t
    cols = list(rows[0].keys())
    for c in cols:
        t.add_column(str(c), justify="right" if isinstance(rows[0][c], (int, float)) else "left")
    for r in rows:
        t.add_row(*(floats.format(v) if isinstance(v, float) else f"{v:,}" if isinstance(v, int) else str(v) for v in (r.get(c, "") for c in cols)))
    return t


def markdown(rows: list[dict]) -> str:
    """The same rows as a markdown table ("" for none); values as `str` gives them."""
    if not rows:
        return ""
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def pyplot():
    """matplotlib.pyplot drawing to files only (the Agg backend: servers and CI have no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, out) -> Path:
    """Lay out, write as PNG and free the figure (pyplot keeps every open figure alive otherwise)."""
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    pyplot().close(fig)
    return Path(out)
