"""Step 9 of the data path, after detokenization: GLM output -> `reasoning_content`, clean `content`, boxes.

`GlmReasoningParser.feed(text_delta) -> ParsedDelta(content, reasoning, boxes)` and `finish()`
turn the detokenized output text into the three OpenAI fields. A tag split across deltas is
held back until it is complete, so the concatenated deltas are the same however the text was
chunked, and the streamed split equals the non-streamed one (which feeds the whole text once).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
BOX_OPEN, BOX_CLOSE = "<|begin_of_box|>", "<|end_of_box|>"
_TAGS = (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE, BOX_OPEN, BOX_CLOSE)
_TAG_RE = re.compile("|".join(re.escape(t) for t in _TAGS))
_NUMBER = r"-?\d+(?:\.\d+)?"
# A bracketed list of 2 (point) or 4 (box) numbers separated by commas and/or whitespace.
_COORDS_RE = re.compile(rf"\[\s*({_NUMBER}(?:\s*[,\s]\s*{_NUMBER}){{1,3}})\s*\]")

# Families whose output uses GLM's tags; others get no parser (their text is all content).
GLM_FAMILIES = ("glm4v", "glm46v", "glmga")


@dataclass
class ParsedDelta:
    """Text routed to `content` and `reasoning_content`, plus boxes closed in this delta."""

    content: str = ""
    reasoning: str = ""
    boxes: list[dict] = field(default_factory=list)


def parse_box(text: str) -> dict:
    """One box's inner text -> {"text", "coordinates"}: every [x1, y1, x2, y2] (or [x, y]) list found.

    Coordinates are left on the model's own scale (GLM: 0-1000 per mille of the image's width
    and height); integers stay integers.
    """
    coords = []
    for match in _COORDS_RE.finditer(text):
        nums = re.findall(_NUMBER, match.group(1))
        if len(nums) in (2, 4):
            coords.append([float(n) if "." in n else int(n) for n in nums])
    return {"text": text, "coordinates": coords}


class GlmReasoningParser:
    """Incremental splitter for GLM output: `<think>…</think>` is reasoning; `<answer>` tags and
    box markers are dropped from the text; each `<|begin_of_box|>…<|end_of_box|>` becomes a box.

    `in_reasoning=True` when the prompt already opened `<think>` (some templates put it there),
    so the output starts inside the reasoning. A stray `</think>` in content, or a nested
    `<think>` in reasoning, is dropped rather than shown. Box markers inside reasoning are dropped
    without making a box; a box still open at the end is returned with the text it has.
    """

    def __init__(self, in_reasoning: bool = False) -> None:
        self.in_reasoning = in_reasoning
        self._pending = ""  # text that may be the start of a tag
        self._box: list[str] | None = None  # inner text of the open box, if any

    @staticmethod
    def prompt_opens_thinking(prompt_text: str | None) -> bool:
        """True if the rendered prompt ends inside an open `<think>` block."""
        if not prompt_text:
            return False
        return prompt_text.rfind(THINK_OPEN) > prompt_text.rfind(THINK_CLOSE)

    def feed(self, text: str) -> ParsedDelta:
        out = ParsedDelta()
        buf = self._pending + text
        pos = 0
        for match in _TAG_RE.finditer(buf):
            self._emit(out, buf[pos : match.start()])
            self._tag(out, match.group())
            pos = match.end()
        rest = buf[pos:]
        hold = _partial_tag_len(rest)
        self._emit(out, rest[: len(rest) - hold])
        self._pending = rest[len(rest) - hold :]
        return out

    def finish(self) -> ParsedDelta:
        """Release held-back text (an unfinished tag is plain text) and close an open box."""
        out = ParsedDelta()
        self._emit(out, self._pending)
        self._pending = ""
        if self._box is not None:
            out.boxes.append(parse_box("".join(self._box)))
            self._box = None
        return out

    def parse(self, text: str) -> ParsedDelta:
        """The whole output at once (non-streaming): exactly the concatenation of feed()+finish()."""
        a, b = self.feed(text), self.finish()
        return ParsedDelta(a.content + b.content, a.reasoning + b.reasoning, a.boxes + b.boxes)

    def _emit(self, out: ParsedDelta, text: str) -> None:
        if not text:
            return
        if self.in_reasoning:
            out.reasoning += text
        else:
            out.content += text
            if self._box is not None:
                self._box.append(text)

    def _tag(self, out: ParsedDelta, tag: str) -> None:
        if tag == THINK_OPEN:
            self.in_reasoning = True
        elif tag == THINK_CLOSE:
            self.in_reasoning = False
        elif tag == BOX_OPEN and not self.in_reasoning:
            if self._box is not None:  # an unclosed box before a new one: keep what it had
                out.boxes.append(parse_box("".join(self._box)))
            self._box = []
        elif tag == BOX_CLOSE and self._box is not None and not self.in_reasoning:
            out.boxes.append(parse_box("".join(self._box)))
            self._box = None
        # <answer>, </answer> and unmatched box markers carry no text of their own.


def _partial_tag_len(text: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some tag (0 if none).

    Every tag holds exactly one "<", at its start, so only the suffix from the last "<" can be one.
    """
    tail = text[text.rfind("<") :] if "<" in text else ""
    return len(tail) if tail and any(t.startswith(tail) and t != tail for t in _TAGS) else 0
