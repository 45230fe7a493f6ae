"""What an import did to the user's rows: how many were read and kept, and each row dropped, changed or added, with why.

The importer fills one `ImportReport`; `padrec data import` prints it and the dataset folder keeps it as
`import_report.json`, so nothing is dropped silently and the counts can be checked later.
"""

from __future__ import annotations

from dataclasses import dataclass, field

EXAMPLES = 5  # rows named per reason; the count is always complete


@dataclass
class Tally:
    """Rows of one kind (items, interactions, users): counts by reason, with the first few rows as examples."""

    read: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    changed: dict[str, int] = field(default_factory=dict)  # kept, but not as given (e.g. text from other fields)
    added: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def note(self, bucket: str, reason: str, example: str | None = None) -> None:
        counts = getattr(self, bucket)
        counts[reason] = counts.get(reason, 0) + 1
        if example is not None:
            ex = self.examples.setdefault(reason, [])
            if len(ex) < EXAMPLES:
                ex.append(example)

    def drop(self, reason: str, example: str | None = None) -> None:
        self.note("dropped", reason, example)

    def change(self, reason: str, example: str | None = None) -> None:
        self.note("changed", reason, example)

    def add(self, reason: str, example: str | None = None) -> None:
        self.note("added", reason, example)

    @property
    def kept(self) -> int:
        return self.read - sum(self.dropped.values()) + sum(self.added.values())

    def to_dict(self) -> dict:
        return {"read": self.read, "kept": self.kept, "dropped": dict(self.dropped), "changed": dict(self.changed),
                "added": dict(self.added), "examples": {k: list(v) for k, v in self.examples.items()}}


@dataclass
class ImportReport:
    dataset: str
    files: dict[str, dict] = field(default_factory=dict)  # per file: path, format, encoding, columns used / ignored
    items: Tally = field(default_factory=Tally)
    interactions: Tally = field(default_factory=Tally)
    users: Tally = field(default_factory=Tally)
    notes: list[str] = field(default_factory=list)  # facts worth knowing that changed no row
    options: dict = field(default_factory=dict)

    def tallies(self) -> dict[str, Tally]:
        return {"items": self.items, "interactions": self.interactions, "users": self.users}

    def to_dict(self) -> dict:
        return {"dataset": self.dataset, "files": self.files, **{k: t.to_dict() for k, t in self.tallies().items()},
                "notes": list(self.notes), "options": dict(self.options)}

    def summary_rows(self) -> list[dict]:
        """One row per (kind, what happened, reason), for a printed table."""
        rows = []
        for kind, t in self.tallies().items():
            rows.append({"rows": kind, "what": "read", "count": t.read, "reason": ""})
            for bucket in ("dropped", "changed", "added"):
                for reason, n in getattr(t, bucket).items():
                    ex = "; ".join(t.examples.get(reason, [])[:2])
                    rows.append({"rows": kind, "what": bucket, "count": n,
                                 "reason": reason + (f" (e.g. {ex})" if ex else "")})
            rows.append({"rows": kind, "what": "kept", "count": t.kept, "reason": ""})
        return rows
