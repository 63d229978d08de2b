"""The devices an engine may be asked to run on, by name, without importing torch: the command line
checks `--device` with this while it parses its arguments. Whether the device exists is asked of
torch later, as the engine starts (`glimpse.platform.resolve_device`). With glimpse/platform.py and
glimpse/backends/, the only code that names a device (tests/test_platform_seam.py).
"""

from __future__ import annotations

DEVICE_HELP = "auto (a CUDA GPU where torch sees one, else the CPU), cpu, cuda or cuda:N"


def parse_device_name(text: str) -> str | None:
    """"auto", "cpu", "cuda" or "cuda:N" (any case, spaces around), normalized; None for anything else."""
    name = str(text).strip().lower()
    kind, colon, index = name.partition(":")
    if name in ("auto", "cpu", "cuda") or (kind == "cuda" and colon and index.isdigit()):
        return name
    return None


def is_gpu(name: str) -> bool:
    """Whether a parsed device name is a GPU."""
    return name.partition(":")[0] == "cuda"
