"""Turning a growing list of token ids into text a client can be sent piece by piece.

Two problems: a byte-level token can end in the middle of a multi-byte UTF-8 character, so the
text of the ids so far may end in a replacement character that the next token would complete;
and a stop string may arrive split over several tokens, so text that could be the start of one
must be held back until it is known not to be. Both are solved here, per request, on the engine
thread.
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Decodes new tokens against a short window of earlier ones, never emitting half a character.

    Decoding ``ids[prefix:]`` and subtracting the text of ``ids[prefix:read]`` keeps whatever the
    tokenizer does at token boundaries (leading spaces, merged bytes) the same as decoding the
    whole list, at a cost independent of the output length.
    """

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special = skip_special_tokens
        self.ids: list[int] = []
        self.prefix = 0
        self.read = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special)

    def push(self, token_id: int) -> str:
        """Text completed by this token ("" while a character is still incomplete)."""
        self.ids.append(token_id)
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        if len(after) > len(before) and not after.endswith(REPLACEMENT):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before) :]
        return ""

    def flush(self) -> str:
        """Whatever is left at the end, incomplete characters included."""
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return after[len(before) :]


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
