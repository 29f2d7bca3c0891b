"""Incremental detokenization: the text a sequence gained with its last token, in constant time per token.

Decoding token by token is wrong in two ways: a character can span several byte-level tokens (the partial
decode ends in U+FFFD until the last byte arrives), and some decoders change a token's text by what precedes it
(a leading space). ``TextStream`` gets it right either way:
- a fast tokenizer (``tokenizers``) decodes with ``tokenizers.decoders.DecodeStream``, which keeps the few
  tokens of context it needs in Rust and returns a piece only once it is whole UTF-8;
- any other tokenizer (or one whose ``decode`` cleans up spaces, which the stream would not) decodes a short
  window twice, from a few tokens back (``prefix``) to the last token read and to the new end: the difference is
  the new text.

``StopScanner`` (the engine's, for sequences with stop strings) searches only the tail that a new piece can
complete, and remembers where each token's text ends, so a stop string cuts the token ids as well as the text.
``IncrementalText`` (the server's, for streaming) holds back text that could still become a stop string.
"""

from __future__ import annotations

from bisect import bisect_right


class TextStream:
    """The text of a growing token sequence, one token at a time (special tokens skipped)."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
        if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", False):
            from tokenizers.decoders import DecodeStream

            self._backend, self._stream = backend, DecodeStream(skip_special_tokens=True)
        else:
            self._backend, self._stream = None, None
        self.ids: list[int] = []  # window method: the tokens so far
        self.prefix = 0  # window method: start of the decode window
        self.read = 0  # window method: tokens whose text has been returned

    def push(self, token: int) -> str:
        """The text that ``token`` completes (empty while a character is still partial)."""
        if self._stream is not None:
            try:
                return self._stream.step(self._backend, int(token)) or ""
            except Exception:  # noqa: BLE001 - an id the tokenizer lacks (a padded vocabulary) has no text
                return ""
        self.ids.append(token)
        before = self.tok.decode(self.ids[self.prefix: self.read], skip_special_tokens=True)
        after = self.tok.decode(self.ids[self.prefix:], skip_special_tokens=True)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before):]
        return ""


class StopScanner:
    """Finds the first stop string in a sequence's text as tokens arrive; ``cut`` is then (tokens before it,
    text before it).

    A token's text "lies before" the stop string when it ends at or before the stop string's first character,
    so the kept tokens decode to a prefix of the kept text: at most a token that straddles the stop string's
    start contributes characters to the text but not its id (OpenAI's text is everything before the stop)."""

    def __init__(self, tokenizer, stop: tuple[str, ...]):
        self.stream, self.stop = TextStream(tokenizer), stop
        self.longest = max(len(s) for s in stop)
        self.text = ""
        self.ends: list[int] = []  # where each token's text ends (a partial character's tokens: where it ends)
        self.pending = 0  # tokens whose text has not come out yet
        self.cut: tuple[int, str] | None = None

    def push(self, token: int) -> bool:
        """Add a token; True once a stop string has appeared (``cut`` says where)."""
        piece = self.stream.push(token)
        self.pending += 1
        if not piece:
            return False
        start = max(0, len(self.text) - self.longest + 1)  # a new match must end in the new piece
        self.text += piece
        self.ends.extend([len(self.text)] * self.pending)
        self.pending = 0
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if not hits:
            return False
        at = min(hits)
        self.cut = (bisect_right(self.ends, at), self.text[:at])
        return True


class IncrementalText:
    """Streaming text of one choice: pieces that can be sent now, holding back what may begin a stop string."""

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self.stream = TextStream(tokenizer)
        self.text = ""  # text of the tokens pushed so far
        self.sent = 0  # characters of self.text handed out
        # for each stop string, the lengths k (longest first) whose prefix s[:k] ends in a given character
        self._ends_in: list[dict[str, list[int]]] = []
        for s in stop:
            table: dict[str, list[int]] = {}
            for k in range(len(s) - 1, 0, -1):
                table.setdefault(s[k - 1], []).append(k)
            self._ends_in.append(table)
        self._stop = stop

    def push(self, token: int) -> str:
        """Add a token; returns the text that can be sent now (possibly empty)."""
        self.text += self.stream.push(token)
        return self._release()

    def _held(self) -> int:
        """Characters at the end of the text that could begin a stop string."""
        if not self.text:
            return 0
        best, last = 0, self.text[-1]
        for s, table in zip(self._stop, self._ends_in):
            for k in table.get(last, ()):
                if k <= best:
                    break
                if k <= len(self.text) and self.text.endswith(s[:k]):
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
