"""Token ids -> text as it is produced: incremental detokenisation and stop strings.

Decoding the whole reply again after every token costs time that grows with the reply; decoding only the new
token breaks multi-byte characters (a Chinese character or an emoji is often 2-3 byte-level tokens) and loses the
leading spaces some tokenizers add only between tokens. `TextStream` does what text-generation-inference and vLLM
do: decode a short window (the previous piece plus the new tokens) and emit what it adds beyond the previous piece,
unless it ends in U+FFFD (an incomplete character), in which case it waits for the next token.

Stop strings are found on the text, not on tokens (a stop string may span tokens, or end mid-token). Text that
might be the start of a stop string is held back until the next tokens show it is not, so a client never sees a
piece of a stop string.
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"


class TextStream:
    """Feed token ids with `add`; each call returns the text that is now safe to show ('' when nothing is)."""

    def __init__(self, tokenizer, stop: list[str] | tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.text = ""  # all text decoded so far (before any stop-string cut)
        self.sent = 0  # characters of `text` already returned
        self.stopped = False  # a stop string was found; `text` now ends before it
        self._prefix = 0  # ids[_prefix:_read] is the piece decoded last time
        self._read = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self._decode(self.ids[self._prefix:self._read])
        after = self._decode(self.ids[self._prefix:])
        if len(after) > len(before) and not after.endswith(REPLACEMENT):
            self.text += after[len(before):]
            self._prefix, self._read = self._read, len(self.ids)
        return self._release()

    def _release(self) -> str:
        if self.stop:
            cut = self._first_stop()
            if cut is not None:
                self.text, self.stopped = self.text[:cut], True
                return self._take(len(self.text))
            return self._take(len(self.text) - self._possible_stop_start())
        return self._take(len(self.text))

    def _first_stop(self) -> int | None:
        found = [p for s in self.stop if (p := self.text.find(s, self.sent)) >= 0]
        return min(found) if found else None

    def _possible_stop_start(self) -> int:
        """Length of the longest unsent suffix of the text that is a proper prefix of a stop string."""
        unsent = self.text[self.sent:]
        for n in range(min(len(unsent), max(len(s) for s in self.stop) - 1), 0, -1):
            tail = unsent[-n:]
            if any(s.startswith(tail) for s in self.stop):
                return n
        return 0

    def _take(self, end: int) -> str:
        piece, self.sent = self.text[self.sent:end], max(self.sent, end)
        return piece

    def flush(self) -> str:
        """At the end of the reply: whatever was held back (an incomplete character is decoded as it stands, as
        `tokenizer.decode` would). A stop string may still be completed by this text, so it is checked again."""
        if not self.stopped:
            rest = self._decode(self.ids[self._prefix:])[len(self._decode(self.ids[self._prefix:self._read])):]
            self.text += rest
            self._prefix = self._read = len(self.ids)
            cut = self._first_stop() if self.stop else None
            if cut is not None:
                self.text, self.stopped = self.text[:cut], True
        return self._take(len(self.text))
