"""Stop strings matched on streamed text: one implementation for the CLI client and the HTTP front end.

Pure Python (no torch, no tokenizer), so both the client process and the torch-free front end use it.
"""

from __future__ import annotations

from typing import Iterable


class StopStrings:
    """Cuts streamed text at the first stop string to appear; the stop string itself is not returned.

    "First to appear" means the one that ends earliest in the text: generation stops as soon as
    any stop string is complete, so a longer stop string that began earlier but would only end
    later never gets the chance. Among stop strings ending at the same place, the one starting
    earliest wins. The result is the same however the text is split into pieces.

    Text that could still turn out to be the start of a stop string is held back until a later
    piece decides it, so nothing already returned ever has to be taken back."""

    def __init__(self, stops: Iterable[str]):
        self._stops = [s for s in dict.fromkeys(stops) if s]
        self._held = ""
        self.matched: str | None = None

    def push(self, piece: str) -> str:
        """Add text; return the part that is safe to emit. After a match, `matched` is set and
        every later push returns ''."""
        if self.matched is not None:
            return ""
        buf = self._held + piece
        if not self._stops:
            self._held = ""
            return buf
        # str.find gives each stop string's first occurrence, which is also its earliest end.
        # No stop string can end inside the held text itself: it would have matched on an
        # earlier push. Every one that starts in emitted text's tail was held back (see below).
        hits = [(pos + len(s), pos, s) for s in self._stops if (pos := buf.find(s)) >= 0]
        if hits:
            _, pos, self.matched = min(hits)
            self._held = ""
            return buf[:pos]
        keep = self._longest_stop_prefix_suffix(buf)
        self._held = buf[len(buf) - keep:]
        return buf[:len(buf) - keep]

    def flush(self) -> str:
        """The end of generation: what was held back is not a stop string after all."""
        if self.matched is not None:
            return ""
        out, self._held = self._held, ""
        return out

    def _longest_stop_prefix_suffix(self, buf: str) -> int:
        """Length of the longest suffix of buf that is a proper prefix of some stop string: every
        place where a stop string may have begun lies inside it."""
        longest = max(len(s) for s in self._stops) - 1
        for k in range(min(len(buf), longest), 0, -1):
            tail = buf[-k:]
            if any(s.startswith(tail) for s in self._stops):
                return k
        return 0
