"""Why records were not turned into documents: counts per reason, first locations.

Bad input never stops a run and is never dropped silently: every record that
does not become a document is counted here under one reason, and the first
few locations of each reason are kept (and logged) so a user can look at the
offending lines. The same ``SkipLog`` is filled per chunk by the workers and
merged by the parent in plan order, so "the first few" are the first few in
input order, whatever the worker count.
"""

from __future__ import annotations

from collections import Counter
from typing import Callable

#: Locations kept per reason (in the manifest, and logged as they are found).
MAX_EXAMPLES = 5
#: Longest detail string kept for an example (error messages can quote data).
MAX_DETAIL_CHARS = 160


class SkipReason:
    """Reasons a record is skipped. Plain strings, so counts serialise to JSON."""

    BLANK_LINE = "blank_line"
    INVALID_UTF8 = "invalid_utf8"
    MALFORMED_JSON = "malformed_json"
    NOT_AN_OBJECT = "not_an_object"
    MISSING_TEXT = "missing_text"
    TEXT_NOT_STRING = "text_not_string"
    EMPTY_TEXT = "empty_text"
    DOCUMENT_TOO_LARGE = "document_too_large"
    #: The incomplete last line of a truncated or corrupt compressed file.
    TRUNCATED_RECORD = "truncated_record"


class SkipLog:
    """Skip counts per reason plus the first ``MAX_EXAMPLES`` locations of each."""

    def __init__(self) -> None:
        self.counts: Counter = Counter()
        self.examples: dict[str, list[dict]] = {}

    def add(self, reason: str, file: str, location: str, detail: str = "") -> None:
        self.counts[reason] += 1
        kept = self.examples.setdefault(reason, [])
        if len(kept) < MAX_EXAMPLES:
            kept.append({"file": file, "at": location, "detail": detail[:MAX_DETAIL_CHARS]})

    def merge(self, other: "SkipLog", on_new_example: Callable[[str, dict], None] | None = None) -> None:
        """Add ``other`` (a later part of the input) to this log.

        ``on_new_example`` is called for each example that makes it into the
        first ``MAX_EXAMPLES`` here, which is how they get logged exactly once.
        """
        self.counts.update(other.counts)
        for reason, examples in other.examples.items():
            kept = self.examples.setdefault(reason, [])
            for example in examples:
                if len(kept) >= MAX_EXAMPLES:
                    break
                kept.append(example)
                if on_new_example is not None:
                    on_new_example(reason, example)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> dict:
        return {
            "total": self.total,
            "by_reason": dict(sorted(self.counts.items())),
            "examples": {reason: self.examples[reason] for reason in sorted(self.examples)},
        }

    @classmethod
    def from_dict(cls, data: dict) -> "SkipLog":
        log = cls()
        log.counts.update(data.get("by_reason", {}))
        log.examples = {reason: list(examples) for reason, examples in data.get("examples", {}).items()}
        return log

    def __getstate__(self) -> dict:
        return self.as_dict()

    def __setstate__(self, state: dict) -> None:
        restored = SkipLog.from_dict(state)
        self.counts, self.examples = restored.counts, restored.examples
