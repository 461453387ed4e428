"""Text a client can be sent piece by piece: whole characters, and nothing that may begin a stop.

A stop string may arrive split over several tokens, so text that could be the start of one must
be held back until it is known not to be (:class:`StopStringFilter`). Characters split over
tokens are handled by :class:`pretrain.text.IncrementalDetokenizer`, re-exported here. Both run
per request, on the engine thread.
"""

from __future__ import annotations

from pretrain.text import REPLACEMENT, IncrementalDetokenizer

__all__ = ["REPLACEMENT", "IncrementalDetokenizer", "StopStringFilter"]


class StopStringFilter:
    """Holds back text that might begin a stop string; cuts the output where one appears."""

    def __init__(self, stop: list[str]):
        self.stop = [s for s in stop if s]
        self.text = ""  # everything decoded so far
        self.sent = 0  # characters of ``text`` already released
        self.stopped = False

    def _held_back(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop string."""
        longest = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self.text) - self.sent), longest, -1):
                if self.text.endswith(s[:n]):
                    longest = n
                    break
        return longest

    def feed(self, new_text: str) -> str:
        """Add decoded text; return what can be released now. Sets ``stopped`` on a match."""
        if self.stopped:
            return ""
        self.text += new_text
        # Released text never holds the start of a stop string, so a match begins at ``sent`` or later.
        matches = [i for i in (self.text.find(s, self.sent) for s in self.stop) if i >= 0]
        cut = min(matches, default=-1)
        if cut >= 0:
            self.stopped = True
            out, self.sent = self.text[self.sent : cut], cut
            self.text = self.text[:cut]
            return out
        end = len(self.text) - self._held_back()
        out = self.text[self.sent : end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return out

    def flush(self) -> str:
        """At the end of generation nothing more can complete a stop string: release the rest."""
        out = self.text[self.sent :]
        self.sent = len(self.text)
        return out
