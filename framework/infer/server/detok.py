"""Incremental detokenization for streaming: the text a sequence gained with its last token.

Decoding token by token is wrong in two ways: a character can span several byte-level tokens (the partial
decode ends in U+FFFD until the last byte arrives), and some decoders change a token's text by what precedes it
(a leading space). So each step decodes a short window twice, from a few tokens back (``prefix``) to the last
token read and to the new end, and the difference is the new text. The cost per token is constant.

Stop strings: text that could still become the start of a stop string is held back; once the engine cuts the
sequence at a stop string (``finish``), the held text is either released or dropped.
"""

from __future__ import annotations


class IncrementalText:
    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self.tok, self.stop = tokenizer, stop
        self.ids: list[int] = []
        self.prefix = 0  # start of the decode window
        self.read = 0  # tokens whose text is already in self.text
        self.text = ""  # text of ids[:read]
        self.sent = 0  # characters of self.text handed out

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def push(self, token: int) -> str:
        """Add a token; returns the text that can be sent now (possibly empty)."""
        self.ids.append(token)
        before = self._decode(self.ids[self.prefix: self.read])
        after = self._decode(self.ids[self.prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before):]
            self.prefix, self.read = self.read, len(self.ids)
        return self._release()

    def _held(self) -> int:
        """Characters at the end of the text that could begin a stop string."""
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:k]):
                    best = k
                    break
        return best

    def _release(self) -> str:
        end = len(self.text) - self._held()
        if end <= self.sent:
            return ""
        out = self.text[self.sent: end]
        self.sent = end
        return out

    def finish(self, final_text: str) -> str:
        """The rest of the sequence's final text (the engine's full decode, cut at a stop string)."""
        out = final_text[self.sent:]
        self.sent = len(final_text)
        return out
