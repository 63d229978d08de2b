"""Step 4 state: one request's progress through the engine.

Everything per-request the engine and scheduler track lives here, never on modules: token ids
(prompt + output), the M-RoPE positions of the prompt and the decode delta (handed to the model
runner once), the block table, how many tokens have KV computed, the media, sampling settings
and timings. The runner keeps its own copy of what a forward and the sampler need.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from glimpse.engine.sampling_params import SamplingParams
from glimpse.engine.structured import ConstraintSpec
from glimpse.processing.inputs import MediaItem


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Timings:
    """Seconds spent per phase (wall clock, summed over steps)."""

    arrival: float = field(default_factory=time.perf_counter)
    preprocess: float = 0.0
    grammar: float = 0.0  # waiting for the structured-output grammar to compile (part of the TTFT)
    encoder: float = 0.0
    prefill: float = 0.0
    decode: float = 0.0
    first_token: float | None = None  # time of the first output token (perf_counter)
    finished: float | None = None

    def as_dict(self) -> dict[str, float | None]:
        ttft = None if self.first_token is None else self.first_token - self.arrival
        e2e = None if self.finished is None else self.finished - self.arrival
        return {"preprocess_s": self.preprocess, "grammar_s": self.grammar, "encoder_s": self.encoder, "prefill_s": self.prefill,
                "decode_s": self.decode, "ttft_s": ttft, "e2e_s": e2e}  # fmt: skip


@dataclass(eq=False)
class Request:
    """A single sequence being generated (an `n > 1` request fans out into several)."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    media: tuple[MediaItem, ...]
    prompt_positions: torch.Tensor  # [3, num_prompt_tokens] M-RoPE positions
    mrope_delta: int  # decode position of token i is i + mrope_delta (all three axes)
    eos_token_ids: frozenset[int] = frozenset()
    group_id: str = ""  # the user's request id (an `n > 1` request has n sequences in one group)
    index: int = 0  # which of the group's n sequences this is (its CompletionOutput.index)
    seed: int | None = None  # this sequence's sampler seed (params.seed + index; None: the shared stream)
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose KV is in the cache
    block_ids: list[int] = field(default_factory=list)  # the block table
    block_hashes: list[int] = field(default_factory=list)  # hashes of full blocks, in order
    num_cached_prompt_tokens: int = 0  # prompt tokens served from the prefix cache
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    num_preemptions: int = 0
    logprobs: list = field(default_factory=list)
    timings: Timings = field(default_factory=Timings)
    # EVS: span start of each pruned video -> [3, t*h*w/m²] positions of that video unpruned; the
    # runner fills its slots in its copy of `prompt_positions` once the kept tokens are known.
    pruned_video_positions: dict[int, torch.Tensor] = field(default_factory=dict)
    # Structured output / thinking budget (glimpse/engine/structured.py), set once the grammar is compiled.
    constraint: ConstraintSpec | None = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def token_ids(self, start: int, end: int) -> list[int]:
        p = self.num_prompt_tokens
        if end <= p:
            return self.prompt_token_ids[start:end]
        return (self.prompt_token_ids[start:p] if start < p else []) + self.output_token_ids[max(start - p, 0) : end - p]

    def media_in(self, start: int, end: int) -> list[MediaItem]:
        """Media whose embedding slots overlap tokens start..end-1."""
        return [m for m in self.media if m.start < end and m.end > start]

    @property
    def is_finished(self) -> bool:
        return self.status == RequestStatus.FINISHED
