"""Test tooling that ships with glimpse: the checkpoint factory."""

from glimpse.testing.checkpoints import FAMILIES, SIZES, make_checkpoint, set_demo_sampling

__all__ = ["FAMILIES", "SIZES", "make_checkpoint", "set_demo_sampling"]
