"""Step 9: incremental detokenization and stop strings.

Text is released only once it is stable: a token that ends inside a multi-byte character
decodes to U+FFFD and is held until the character completes; while a request runs, the last
`max(len(stop)) - 1` characters are held back too, since they may still become a stop string.
The concatenated deltas therefore equal the final text exactly.
"""

from __future__ import annotations


class IncrementalDetokenizer:
    def __init__(self, tokenizer, skip_special_tokens: bool, stop: tuple[str, ...] = (),
                 include_stop_str_in_output: bool = False) -> None:  # fmt: skip
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stop = stop
        self.include_stop = include_stop_str_in_output
        self.holdback = max((len(s) for s in stop), default=1) - 1
        self.token_ids: list[int] = []
        self.text = ""  # all stable text so far (possibly cut at a stop string)
        self._prefix = 0  # token index where the last decode window starts
        self._read = 0  # tokens already turned into text
        self.emitted = 0  # characters of `text` already handed out

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_id: int, check_stop: bool = True) -> str | None:
        """Append a token; returns the stop string if the text now contains one (text is cut there)."""
        self.token_ids.append(token_id)
        prefix_text = self._decode(self.token_ids[self._prefix : self._read])
        new_text = self._decode(self.token_ids[self._prefix :])
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return None  # incomplete character (or a token with no text): wait for more
        old_len = len(self.text)
        self.text += new_text[len(prefix_text) :]
        self._prefix, self._read = self._read, len(self.token_ids)
        return self._find_stop(old_len) if check_stop else None

    def _find_stop(self, old_len: int) -> str | None:
        if not self.stop:
            return None
        search_from = max(0, old_len - self.holdback)
        best = None
        for s in self.stop:
            i = self.text.find(s, search_from)
            if i != -1 and (best is None or i < best[0]):
                best = (i, s)
        if best is None:
            return None
        i, s = best
        self.text = self.text[: i + len(s) if self.include_stop else i]
        return s

    def flush(self) -> None:
        """At the end: release bytes held back for an incomplete character (as U+FFFD, like a full decode)."""
        if self._read < len(self.token_ids):
            prefix_text = self._decode(self.token_ids[self._prefix : self._read])
            new_text = self._decode(self.token_ids[self._prefix :])
            self.text += new_text[len(prefix_text) :]
            self._prefix = self._read = len(self.token_ids)

    def delta(self, finished: bool) -> str:
        """New text to hand out now (holding back a possible stop-string prefix unless finished)."""
        end = len(self.text) if finished else max(self.emitted, len(self.text) - self.holdback)
        out = self.text[self.emitted : end]
        self.emitted = end
        return out
