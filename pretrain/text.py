"""Turning a growing list of token ids into text that can be sent or printed piece by piece.

A byte-level token can end in the middle of a multi-byte UTF-8 character, so the text of the ids
so far may end in a replacement character that the next token would complete. The detokenizer
here never emits half a character, at a cost per token independent of the output's length; the
server and ``pretrain generate`` both use it.
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
