"""The tokenization progress bar: input read (with ETA), documents/s and tokens/s.

Progress is measured in input bytes (compressed bytes for .zst/.gz), the one
quantity known for every file before it is read, so the ETA is meaningful
from the first chunk. Rates are for this session only (a resumed run does not
count the work of the session before it).
"""

from __future__ import annotations

import sys
import time


class TokenizeProgress:
    def __init__(self, total_bytes: int, done_bytes: int, enabled: bool) -> None:
        from tqdm import tqdm

        self._bar = tqdm(
            total=total_bytes or None, initial=done_bytes, unit="B", unit_scale=True, unit_divisor=1024,
            desc="tokenizing", disable=not enabled, mininterval=1.0, dynamic_ncols=True, file=sys.stderr,
            smoothing=0.05,
        )
        self._started = time.monotonic()
        self.documents = 0
        self.tokens = 0

    def update(self, bytes_done: int, documents: int, tokens: int) -> None:
        self.documents += documents
        self.tokens += tokens
        if bytes_done > self._bar.n:
            self._bar.update(bytes_done - self._bar.n)
        elapsed = max(time.monotonic() - self._started, 1e-9)
        self._bar.set_postfix_str(
            f"{self.documents / elapsed:,.0f} doc/s, {self.tokens / elapsed:,.0f} tok/s", refresh=False
        )

    def write(self, message: str) -> None:
        """Print a line without breaking the bar."""
        self._bar.write(message, file=sys.stderr)

    def close(self) -> None:
        self._bar.close()
