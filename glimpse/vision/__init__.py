"""Step 5, the vision encoder at full speed: token-budget batching, captured graphs, eager fallback.

`EncoderRunner(model, budgets, max_num_batched_tokens).encode([VisionItem])` -> one
[t*h*w / m^2, hidden] tensor per item. Packing lives in batching.py, graphs in runner.py, the
segment attention op in attention.py.
"""

from glimpse.vision.batching import Batch, Piece, VisionItem, default_budgets, plan_batches
from glimpse.vision.runner import EncoderRunner

__all__ = ["Batch", "EncoderRunner", "Piece", "VisionItem", "default_budgets", "plan_batches"]
