"""glimpse: fast, exact inference for vision-language models.

Data path (one file per step, in order): media/ -> processing/ -> models/{mrope,base,<family>}.py.
See docs/architecture.md.
"""

from glimpse.loader import load_model

__version__ = "0.1.0"
__all__ = ["load_model"]
