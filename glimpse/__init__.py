"""glimpse: fast, exact inference for vision-language models.

The data path, one file per step (see docs/architecture.md):
media/ -> processing/ -> engine/scheduler.py -> models/<family>.py (vision) -> engine/model_runner.py
(merge) -> models/mrope.py -> models/<family>.py (decoder) -> engine/sampler.py -> engine/detokenizer.py
"""

from glimpse.engine.llm_engine import CompletionOutput, RequestOutput
from glimpse.engine.sampling_params import SamplingParams
from glimpse.llm import LLM
from glimpse.loader import load_model
from glimpse.processing.processor import load_processor

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "load_model", "load_processor"]
