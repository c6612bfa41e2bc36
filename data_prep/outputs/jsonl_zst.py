"""Writing Pile-style zstd-compressed JSON-lines files, atomically.

The counterpart of ``inputs.chunk_readers``. A file is written under a
temporary name and renamed into place only when complete, so a crash or Ctrl-C
never leaves a truncated ``.jsonl.zst`` that looks finished.
"""

from __future__ import annotations

import json
import os
from typing import Any

#: zstd level 3 is zstd's default: fast, and the demo corpus is small anyway.
#: The level is fixed (not left to the library default) so output bytes are
#: reproducible across zstandard versions that might change their default.
ZSTD_LEVEL = 3


def pile_record(text: str, pile_set_name: str, **extra_meta: Any) -> dict:
    """The Pile's record layout: the text plus a ``meta`` dict naming its subset."""
    return {"text": text, "meta": {"pile_set_name": pile_set_name, **extra_meta}}


class JsonlZstWriter:
    """Context manager that writes records as zstd-compressed JSON lines.

    ::

        with JsonlZstWriter("train.jsonl.zst") as out:
            out.write(pile_record("hello", "Demo"))

    The file appears under its final name only if the ``with`` block exits
    without an exception; otherwise the temporary file is removed.
    """

    def __init__(self, path: str | os.PathLike, level: int = ZSTD_LEVEL) -> None:
        self.path = os.fspath(path)
        self.tmp_path = f"{self.path}.tmp-{os.getpid()}"
        self.level = level
        self.records = 0
        self.text_bytes = 0
        self._raw = None
        self._stream = None

    def __enter__(self) -> "JsonlZstWriter":
        import zstandard

        self._raw = open(self.tmp_path, "wb")
        # write_content_size is unknown for a stream; closefd=False because we
        # close the raw file ourselves after the frame is finished.
        compressor = zstandard.ZstdCompressor(level=self.level)
        self._stream = compressor.stream_writer(self._raw, closefd=False)
        return self

    def write(self, record: dict) -> None:
        # ensure_ascii=False keeps non-ASCII text readable and smaller; sorted
        # keys are not used so "text" stays first as in the Pile.
        line = json.dumps(record, ensure_ascii=False) + "\n"
        self._stream.write(line.encode("utf-8"))
        self.records += 1
        text = record.get("text")
        if isinstance(text, str):
            self.text_bytes += len(text.encode("utf-8"))

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self._stream.close()  # flushes and ends the zstd frame
            self._raw.close()
        finally:
            if exc_type is None:
                os.replace(self.tmp_path, self.path)
            elif os.path.exists(self.tmp_path):
                os.remove(self.tmp_path)
