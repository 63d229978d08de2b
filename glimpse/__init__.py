"""glimpse: fast, exact inference for vision-language models.

The data path, one file per step (see docs/architecture.md):
media/ -> processing/ -> engine/scheduler.py -> models/<family>.py (vision) -> engine/model_runner.py
(merge) -> models/mrope.py -> models/<family>.py (decoder) -> engine/sampler.py -> engine/detokenizer.py
"""

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the names for type checkers and editors; at run time __getattr__ below imports them
    from glimpse.engine.llm_engine import CompletionOutput, RequestOutput
    from glimpse.engine.sampling_params import SamplingParams, StructuredOutputsParams
    from glimpse.llm import LLM
    from glimpse.loader import load_model
    from glimpse.processing.processor import load_processor

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "StructuredOutputsParams", "RequestOutput", "CompletionOutput", "load_model", "load_processor"]

# Imported on first use, so that `import glimpse` (the CLI's --help, --version) does not import torch.
_LAZY = {"LLM": "glimpse.llm", "SamplingParams": "glimpse.engine.sampling_params",
         "StructuredOutputsParams": "glimpse.engine.sampling_params",
         "RequestOutput": "glimpse.engine.llm_engine", "CompletionOutput": "glimpse.engine.llm_engine",
         "load_model": "glimpse.loader", "load_processor": "glimpse.processing.processor"}  # fmt: skip


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'glimpse' has no attribute {name!r}")
