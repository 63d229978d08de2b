"""Weight loading: HF checkpoint folder -> a family model with every tensor accounted for.

Reads a single safetensors file or an indexed set of shards, renames the older HF layout
(`model.*` / `visual.*`) to the current one (`model.language_model.*` / `model.visual.*`),
casts to the requested dtype and assigns into a model built on the meta device. A missing,
unexpected, duplicated, mis-shaped, truncated or corrupt tensor is a `CheckpointError`
that names it; nothing is skipped silently. Optional family hooks: `skip_checkpoint_tensor(name)`
(tensors the model documents as unused, e.g. GLM's MTP layers; listed in `LoadReport.skipped`),
`packed_weight_slot(name)` (a tensor that fills one slice of a stacked parameter, e.g. one MoE
expert) and `float32_weight_names()` (tensors kept in float32 whatever the dtype).

Split over tensor-parallel ranks (glimpse/distributed), a rank reads only its part of each tensor
(`model.checkpoint_shard(name)`: safetensors slices, so the rest of the file is never copied) and skips
the MoE experts other ranks hold.
"""

from __future__ import annotations

import importlib
import json
import sys
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from glimpse import backends, distributed, platform
from glimpse.buffers import move_to_huge_pages
from glimpse.config import ModelConfig, load_config
from glimpse.errors import CheckpointError
from glimpse.models.base import VisionLanguageModel

_MODEL_CLASSES = {"glm4v": ("glimpse.models.glm4v", "Glm4vModel"), "qwen2_5_vl": ("glimpse.models.qwen2_5_vl", "Qwen2_5_VLModel")}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Checkpoints larger than this take a few seconds to read or more: a progress bar then shows (on a terminal only).
PROGRESS_BYTES = 1 << 30


@dataclass
class LoadReport:
    """Which file each checkpoint tensor came from (checkpoint name -> file), and how it was renamed."""

    source: dict[str, str] = field(default_factory=dict)
    renamed: dict[str, str] = field(default_factory=dict)  # checkpoint name -> model name
    skipped: list[str] = field(default_factory=list)  # names the model's skip_checkpoint_tensor refused
    other_ranks: list[str] = field(default_factory=list)  # tensors only other tensor-parallel ranks hold


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype in _DTYPES.values():
            return dtype
    elif dtype in _DTYPES:
        return _DTYPES[dtype]
    raise ValueError(f"dtype {dtype!r} is not supported; use one of {', '.join(_DTYPES)}")


def model_class(config: ModelConfig) -> type[VisionLanguageModel]:
    module, name = _MODEL_CLASSES[config.family]
    return getattr(importlib.import_module(module), name)


def load_model(
    path: str | Path,
    dtype: str | torch.dtype = "float32",
    load_format: str = "auto",
    device: str | torch.device = "cpu",
    seed: int = 0,
    tensor_parallel_size: int = 1,
    enable_expert_parallel: bool = False,
    mm_encoder_tp_mode: str = "weights",
    **model_kwargs,
) -> VisionLanguageModel:
    """Build the family model for `path` and fill its weights.

    load_format: "auto"/"safetensors" reads the folder's safetensors; "dummy" makes seeded
    random weights from config.json alone (for benchmarks without weights).
    tensor_parallel_size > 1: this process is one rank of the default torch.distributed process group
    (of that size) and gets its share of the model (glimpse/distributed); every rank calls this and
    then runs the same forwards. `enable_expert_parallel`: MoE experts whole on one rank each;
    `mm_encoder_tp_mode`: "weights" splits the vision tower by heads, "data" keeps it whole on every
    rank and splits the media items.
    model_kwargs go to the family class (e.g. `video_position_rule` for Qwen2.5-VL).
    """
    config = load_config(path)
    torch_dtype = resolve_dtype(dtype)
    if load_format not in ("auto", "safetensors", "dummy"):
        raise ValueError(f"load_format {load_format!r} is not supported; use auto, safetensors or dummy")
    tp = distributed.from_process_group(tensor_parallel_size, enable_expert_parallel, mm_encoder_tp_mode)
    model = _build_on_meta(config, tp, model_kwargs)
    if load_format == "dummy":
        _fill_dummy(model, config, seed, torch_dtype, device)
    else:
        load_weights(model, config.path, torch_dtype, device)
    model.fuse_projections()  # after loading, which reads HF's per-projection names
    if torch.device(device).type == "cpu":
        move_to_huge_pages(model)
    model.glimpse_config = config
    head_dim, vision_head_dim = _attention_head_dims(config.hf_config)
    linear_bytes = backends.linear_weight_bytes(model)  # (decoder, vision tower): what packed copies would add
    chosen = backends.select_backends(platform.detect(device), torch_dtype, head_dim, vision_head_dim, linear_bytes)
    backends.bind_backends(model, chosen)  # once, at start-up: every layer runs on these from now on
    return model.eval()


def check_tensor_parallel(path: str | Path, tensor_parallel_size: int, enable_expert_parallel: bool = False,
                          mm_encoder_tp_mode: str = "weights", **model_kwargs) -> None:
    """Refuse a split the checkpoint's shapes do not allow (heads, MLP rows, experts), before any process
    starts or any weight is read: the model is built on the meta device with rank 0's shapes."""
    tp = distributed.TensorParallel(0, tensor_parallel_size, None, enable_expert_parallel, mm_encoder_tp_mode)
    _build_on_meta(load_config(path), tp, model_kwargs)


def _build_on_meta(config: ModelConfig, tp: distributed.TensorParallel, model_kwargs: dict) -> VisionLanguageModel:
    """The family model with `tp`'s share of every layer, its parameters on the meta device (shapes only)."""
    with torch.device("meta"), distributed.building(tp):
        return model_class(config)(config.hf_config, **model_kwargs)  # (the family keeps `tp` as model.tp)


def _attention_head_dims(hf_config) -> tuple[int, int]:
    """(decoder head dim, vision head dim): what the attention backends are chosen for."""
    text, vision = hf_config.get_text_config(), hf_config.vision_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return head_dim, vision.hidden_size // vision.num_heads


def load_weights(
    model: VisionLanguageModel, path: Path, dtype: torch.dtype, device: str | torch.device = "cpu"
) -> LoadReport:
    """Read every tensor of the folder into `model` (built on meta); returns where each came from."""
    expected = dict(model.state_dict())
    tied = _tied_names(model)
    for name in tied:
        expected.pop(name, None)
    report = LoadReport()
    state: dict[str, torch.Tensor] = {}
    skip = model.skip_checkpoint_tensor
    packed_slot = model.packed_weight_slot
    keep_fp32 = model.float32_weight_names()
    filled: dict[str, int] = {}  # stacked parameter -> elements written so far by its slices
    files = _checkpoint_files(path)
    with _progress_bar(list(files)) as bar:
        for file, names in files.items():
            try:
                with safe_open(str(file), framework="pt", device="cpu") as f:
                    keys = list(f.keys()) if names is None else names
                    file_bytes, read = file.stat().st_size, 0
                    for key in keys:
                        target = current_name(key)
                        if key in report.source:
                            raise CheckpointError(f"tensor {key} appears in both {report.source[key]} and {file.name}")
                        report.source[key] = file.name
                        if skip(target):
                            report.skipped.append(key)
                            continue
                        slot, source = packed_slot(target), None
                        if slot is not None:
                            target, index, source = slot
                            if index is None:  # an MoE expert another rank holds
                                report.other_ranks.append(key)
                                continue
                        if target not in expected:
                            raise CheckpointError(f"{file.name}: unexpected tensor {key} (no parameter {target} "
                                                  f"in {type(model).__name__})")  # fmt: skip
                        want = expected[target] if slot is None else expected[target][index]  # meta: shape only
                        if slot is None:
                            source = model.checkpoint_shard(target)
                        tensor = _read(f, key, source, tuple(want.shape), file.name)
                        bar.update(tensor.nbytes)
                        read += tensor.nbytes
                        to = torch.float32 if target in keep_fp32 else dtype
                        if target in state and (slot is None or target not in filled):
                            raise CheckpointError(f"{file.name}: {target} is given both whole and in slices ({key})")
                        if slot is None:
                            # safetensors hands out views of its file mapping (`_base` set): copied, as one view
                            # kept would keep the whole file mapped, every page read counted in RSS a second time
                            state[target] = tensor.to(device=device, dtype=to, copy=tensor._base is not None)
                        else:
                            if target not in state:
                                state[target] = torch.empty(expected[target].shape, dtype=to, device=device)
                            state[target][index] = tensor.to(device=device, dtype=to)
                            filled[target] = filled.get(target, 0) + tensor.numel()
                        if target != key:
                            report.renamed[key] = target
                    bar.update(file_bytes - read)  # the header and skipped tensors: the bar ends at the files' size
            except (SafetensorError, OSError, RuntimeError) as e:
                raise CheckpointError(f"{file} is truncated or corrupt: {e}") from None
    for target, count in filled.items():  # distinct names fill distinct slices, so a short count is a gap
        if count != expected[target].numel():
            raise CheckpointError(
                f"{path}: {target} is assembled from per-slice tensors (e.g. one per MoE expert) and "
                f"{expected[target].numel() - count} of its {expected[target].numel()} values have no tensor; "
                "some of its pieces are missing"
            )
    missing = sorted(set(expected) - set(state))
    if missing:
        shown = ", ".join(missing[:20]) + (f" ... ({len(missing)} in all)" if len(missing) > 20 else "")
        raise CheckpointError(f"{path}: missing tensors: {shown}")
    model.load_state_dict(state, strict=False, assign=True)
    if tied:
        model.tie_weights()
    return report


def _read(f, key: str, spec: distributed.ShardSpec | None, want: tuple[int, ...], file_name: str) -> torch.Tensor:
    """Tensor `key` of open safetensors file `f`, or only this rank's part of it (`spec`), shaped `want`."""
    if spec is None:
        tensor = f.get_tensor(key)
        if tuple(tensor.shape) != want:
            raise CheckpointError(f"{file_name}: tensor {key} has shape {tuple(tensor.shape)}, the model expects {want}")
        return tensor
    part = f.get_slice(key)
    shape, full = tuple(part.get_shape()), spec.full_shape(want)
    if shape != full:
        raise CheckpointError(f"{file_name}: tensor {key} has shape {shape}, the model expects {full} "
                              f"(of which this tensor-parallel rank holds {want})")  # fmt: skip
    if spec.zero:
        return torch.zeros(want)  # (cast to the model's dtype by the caller)
    return _pad_to(spec.take(part), want, spec.dim)


def _pad_to(tensor: torch.Tensor, want: tuple[int, ...], dim: int) -> torch.Tensor:
    """`tensor` with zeros appended along `dim` up to `want` (the last rank's share of a vocabulary)."""
    short = want[dim] - tensor.shape[dim]
    if short <= 0:
        return tensor
    pad = list(tensor.shape)
    pad[dim] = short
    return torch.cat([tensor, tensor.new_zeros(pad)], dim)


def _progress_bar(files: list[Path]) -> tqdm:
    """A bar over the files' bytes on stderr, for checkpoints over PROGRESS_BYTES and only on a terminal
    (tqdm's disable=None), so logs and tests stay clean."""
    total = sum(f.stat().st_size for f in files)
    return tqdm(total=total, desc="glimpse: loading weights", unit="B", unit_scale=True, unit_divisor=1024,
                file=sys.stderr, disable=None if total > PROGRESS_BYTES else True)  # fmt: skip


def current_name(name: str) -> str:
    """Older HF layout -> current: `model.X` -> `model.language_model.X`, `visual.X` -> `model.visual.X`."""
    if name.startswith("visual."):
        return "model." + name
    if name.startswith("model.") and not name.startswith(("model.language_model.", "model.visual.")):
        return "model.language_model." + name[len("model.") :]
    return name


def _tied_names(model: VisionLanguageModel) -> set[str]:
    return set(model.tied_weight_names())


def _checkpoint_files(path: Path) -> dict[Path, list[str] | None]:
    """safetensors files to read -> the tensor names the index assigns them (None: all)."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index: {e}") from None
        files: dict[Path, list[str] | None] = {}
        for name, fname in weight_map.items():
            files.setdefault(path / fname, []).append(name)
        for file in files:
            if not file.is_file():
                raise CheckpointError(f"{index.name} names {file.name}, which is not in {path}")
        return files
    single = path / "model.safetensors"
    if single.is_file():
        return {single: None}
    found = sorted(path.glob("*.safetensors"))
    if not found:
        raise CheckpointError(f"{path} has no safetensors weights (use load_format='dummy' for random weights)")
    return dict.fromkeys(found)


def _fill_dummy(model: VisionLanguageModel, config: ModelConfig, seed: int, dtype: torch.dtype, device) -> None:
    """Seeded random weights from the factory's distributions (`init_distribution`), drawn straight in
    the model dtype by one generator per tensor (seeded from `seed` and the tensor's name), on as many
    threads as torch computes with: a 3.75B-parameter model in 15-19 s on 2 cores instead of 41 s drawn
    one tensor after another in float32. The same seed gives the same weights on every rank."""
    from glimpse.testing.checkpoints import init_distribution

    hidden = config.hf_config.get_text_config().hidden_size
    keep_fp32 = model.float32_weight_names()
    tied = _tied_names(model)

    def draw(name: str, p: torch.Tensor) -> torch.Tensor:
        to = torch.float32 if name in keep_fp32 else dtype
        spec = model.checkpoint_shard(name)  # split over ranks: every rank draws the whole tensor, keeps its part
        shape = tuple(p.shape) if spec is None else spec.full_shape(p.shape)
        mean, std = init_distribution(name, shape, hidden)
        gen = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{name}".encode()))
        tensor = torch.empty(shape, dtype=to).normal_(mean, std, generator=gen)
        if spec is not None:
            tensor = torch.zeros(p.shape, dtype=to) if spec.zero else _pad_to(spec.take(tensor), tuple(p.shape), spec.dim)
        return tensor.to(device=device)

    params = {name: p for name, p in sorted(model.state_dict().items()) if name not in tied}
    with ThreadPoolExecutor(max(1, torch.get_num_threads()), thread_name_prefix="glimpse-dummy") as pool:
        state = dict(zip(params, pool.map(draw, params, params.values()), strict=True))
    model.load_state_dict(state, strict=False, assign=True)
    if tied:
        model.tie_weights()
