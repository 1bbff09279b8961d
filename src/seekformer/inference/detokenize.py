"""Incremental detokenisation: the text of a growing token sequence, released piece by piece.

Decoding the whole sequence after every token costs O(n) per token, and decoding each token alone
is wrong twice over: a byte-level token may hold part of a multi-byte UTF-8 character (it decodes
to U+FFFD), and some decoders (SentencePiece's leading space) render a token differently depending
on the token before it. `IncrementalDetokenizer` decodes a short window instead: the tokens since
the last released text plus the few before them as context, and releases the difference. The window
stays a few tokens long, so each token costs O(1) amortised.

Stop strings may span tokens: text that could still become a stop string is held back until it
either completes one (generation stops, the stop string and everything after it are dropped) or
cannot any more (it is released).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

REPLACEMENT = "\ufffd"
# a window whose text still ends in U+FFFD after this many tokens is a real U+FFFD, not a split character
MAX_PENDING_TOKENS = 8


class IncrementalDetokenizer:
    """Feed token ids with `push`, get the new text; `flush` at the end releases what was held back.

    `stop` strings end the text at their first occurrence (`stopped` then names the one found).
    """

    def __init__(self, tokenizer, skip_special_tokens: bool = True, stop: Sequence[str] = ()) -> None:
        self.tokenizer, self.skip_special_tokens = tokenizer, skip_special_tokens
        self.ids: list[int] = []
        self._context = 0  # start of the decode window (tokens before `_read` give context)
        self._read = 0  # tokens up to here have had their text released or held
        self.stop = tuple(s for s in stop if s)
        self._longest_stop = max((len(s) for s in self.stop), default=0)
        self._held = ""  # decoded text not released yet (it may begin a stop string)
        self.stopped: str | None = None

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, ids: Iterable[int]) -> str:
        """Append tokens; return the text that became final (possibly empty)."""
        return "".join(self._push_one(int(i)) for i in ids)

    def _push_one(self, token: int) -> str:
        # one token at a time: a window then waits only on a character still being completed
        if self.stopped is not None:
            return ""
        self.ids.append(token)
        before = self._decode(self.ids[self._context:self._read])
        window = self._decode(self.ids[self._context:])
        if window.endswith(REPLACEMENT) and len(self.ids) - self._read < MAX_PENDING_TOKENS:
            return ""  # an incomplete UTF-8 character: wait for its next bytes
        if not window.startswith(before):  # the context decoded differently in the window; keep it all
            before = window[: len(before)]
        self._context, self._read = self._read, len(self.ids)
        return self._release(window[len(before):])

    def flush(self) -> str:
        """The text still held back (call once the sequence ended without a stop string)."""
        if self.stopped is not None:
            return ""
        tail = self._decode(self.ids[self._context:])
        before = self._decode(self.ids[self._context:self._read])
        text = self._held + tail[len(before):]
        self._held, self._context, self._read = "", len(self.ids), len(self.ids)
        return text

    def _release(self, new: str) -> str:
        if not self.stop:
            return new
        text = self._held + new
        first, found = len(text), None
        for s in self.stop:
            at = text.find(s)
            if 0 <= at < first:
                first, found = at, s
        if found is not None:
            self.stopped, self._held = found, ""
            return text[:first]
        keep = self._stop_prefix_length(text)
        self._held = text[len(text) - keep:] if keep else ""
        return text[: len(text) - keep]

    def _stop_prefix_length(self, text: str) -> int:
        """Length of the longest suffix of `text` that begins some stop string."""
        for k in range(min(self._longest_stop - 1, len(text)), 0, -1):
            tail = text[-k:]
            if any(s.startswith(tail) for s in self.stop):
                return k
        return 0
