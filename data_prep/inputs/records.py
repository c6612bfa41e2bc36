"""One input record -> one document (text + subset name), or the reason it is not one.

The validation policy for a single record lives here and nowhere else, for
every input format: a JSON line (``parse_json_line``) or a row of a parquet
file / Hugging Face dataset (``check_row_text``). Readers deliver records,
workers call these functions, ``SkipLog`` counts what they reject.

A document is kept only if its text is a non-blank string that encodes to
UTF-8 (a JSON ``"\\ud800"`` escape gives a lone surrogate that does not) and is
at most ``max_bytes`` big.
"""

from __future__ import annotations

import json
from typing import Any, Optional

from data_prep.inputs.skips import SkipReason

#: Default bound on one document (its JSON line, or its text for columnar
#: inputs). The Pile's largest documents are a few MB; 64 MiB keeps any
#: sane document and stops a missing newline from making a gigabyte "line".
DEFAULT_MAX_DOCUMENT_BYTES = 64 << 20

#: A record's outcome: (text, text as UTF-8, subset name, None) for a document,
#: (None, None, None, (reason, detail)) for a skipped record.
Outcome = tuple[Optional[str], Optional[bytes], Optional[str], Optional[tuple[str, str]]]


def get_field(record: Any, key: str) -> tuple[bool, Any]:
    """``record[key]``, where a dotted key walks nested objects ("meta.pile_set_name").

    An exact top-level match wins, so keys that contain dots still work.
    Returns (found, value).
    """
    if isinstance(record, dict) and key in record:
        return True, record[key]
    if "." not in key:
        return False, None
    value = record
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return False, None
        value = value[part]
    return True, value


def set_name_of(value: Any) -> Optional[str]:
    """A subset name from whatever the set field held (None when absent or not a name)."""
    if isinstance(value, str) and value:
        return value
    return None


def check_text(value: Any, found: bool, text_key: str, max_bytes: int) -> tuple[Optional[str], Optional[bytes], Optional[tuple[str, str]]]:
    """Validate a text field's value: (text, utf8, None) or (None, None, (reason, detail))."""
    if not found or value is None:
        return None, None, (SkipReason.MISSING_TEXT, f"no {text_key!r} field")
    if isinstance(value, (bytes, bytearray)):
        # Binary parquet columns: text only if it is UTF-8.
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError as err:
            return None, None, (SkipReason.INVALID_UTF8, str(err))
    if not isinstance(value, str):
        return None, None, (SkipReason.TEXT_NOT_STRING, f"{text_key!r} is a {type(value).__name__}")
    try:
        utf8 = value.encode("utf-8")
    except UnicodeEncodeError as err:
        return None, None, (SkipReason.INVALID_UTF8, f"lone surrogate in text ({err.reason} at {err.start})")
    if len(utf8) > max_bytes:
        return None, None, (SkipReason.DOCUMENT_TOO_LARGE, f"{len(utf8):,} bytes of text > limit {max_bytes:,}")
    if not value.strip():
        return None, None, (SkipReason.EMPTY_TEXT, "empty" if not value else "whitespace only")
    return value, utf8, None


def parse_json_line(line: bytes, text_key: str, set_key: str, max_bytes: int) -> Outcome:
    """One line of a JSON-lines file (without its newline) -> Outcome.

    ``max_bytes`` bounds the whole line: it is what a reader must hold in
    memory, and a line is never smaller than the text it carries.
    """
    if len(line) > max_bytes:
        return None, None, None, (SkipReason.DOCUMENT_TOO_LARGE, f"{len(line):,} byte line > limit {max_bytes:,}")
    if not line.strip():
        return None, None, None, (SkipReason.BLANK_LINE, "")
    try:
        decoded = line.decode("utf-8")
    except UnicodeDecodeError as err:
        return None, None, None, (SkipReason.INVALID_UTF8, str(err))
    try:
        record = json.loads(decoded)
    except json.JSONDecodeError as err:
        return None, None, None, (SkipReason.MALFORMED_JSON, str(err))
    if not isinstance(record, dict):
        return None, None, None, (SkipReason.NOT_AN_OBJECT, f"a JSON {type(record).__name__}")
    found, value = get_field(record, text_key)
    text, utf8, problem = check_text(value, found, text_key, max_bytes)
    if problem is not None:
        return None, None, None, problem
    return text, utf8, set_name_of(get_field(record, set_key)[1]), None


def check_row_text(value: Any, found: bool, set_name: Any, text_key: str, max_bytes: int) -> Outcome:
    """One row of a columnar input (parquet, Hugging Face dataset) -> Outcome."""
    text, utf8, problem = check_text(value, found, text_key, max_bytes)
    if problem is not None:
        return None, None, None, problem
    return text, utf8, set_name_of(set_name), None
