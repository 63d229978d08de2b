"""Step 2 of the data path, preprocessing settings: a checkpoint's image/video processor as plain data.

`load_specs(checkpoint_dir) -> (ImageSpec, VideoSpec)` reads `processor_config.json`,
`preprocessor_config.json` and `video_preprocessor_config.json` the way HF 5.23's processor
classes apply them (class defaults for missing or null keys, Qwen's `min_pixels`/`max_pixels`
aliases, the video processor falling back to the image config), keyed on the processor *class
names*, never on `model_type`. `with_overrides` applies validated per-request knobs under `Ceilings`
(the server flags); `check_overrides` validates those of a modality a request does not carry.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

from glimpse.errors import CheckpointError, InvalidInputError, LimitExceededError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# HF class name -> (resize rule, sampler). `...Fast` / `...Pil` spellings map to the same entry.
IMAGE_CLASSES = MappingProxyType(
    {
        "Glm4vImageProcessor": "glm",
        "Glm46VImageProcessor": "glm",
        "GlmgaImageProcessor": "glm",
        "Qwen2VLImageProcessor": "qwen",
    }
)
VIDEO_CLASSES = MappingProxyType(
    {
        "Glm4vVideoProcessor": "glm4v",
        "Glm46VVideoProcessor": "glm46v",
        "GlmgaVideoProcessor": "glmga",
        "Qwen2VLVideoProcessor": "qwen",
    }
)

# HF 5.23 class defaults that differ per class (parity-spec §1.7); the shared ones (patch sizes,
# CLIP mean/std, 1/255, bicubic) are ImageSpec's field defaults. Only keys a class accepts are read.
_IMAGE_SIZE = MappingProxyType({"glm": (112 * 112, 28 * 28 * 15000), "qwen": (56 * 56, 28 * 28 * 1280)})
_VIDEO_DEFAULTS = MappingProxyType({
    "glm4v": {"size": (112 * 112, 28 * 28 * 2 * 30000), "fps": 2.0, "max_duration": 300.0, "do_sample_frames": True},
    "glm46v": {"size": (112 * 112, 28 * 28 * 2 * 30000), "do_sample_frames": True},
    "glmga": {"size": (112 * 112, 28 * 28 * 2 * 55790), "fps": 2.0, "max_frames": 640, "do_sample_frames": True},
    "qwen": {"size": (128 * 28 * 28, 28 * 28 * 768), "min_frames": 4, "max_frames": 768, "do_sample_frames": False},
})  # fmt: skip

Sampler = Literal["glm4v", "glm46v", "glmga", "qwen"]


@dataclass(frozen=True)
class ImageSpec:
    """How one checkpoint turns an image into patches. Areas are in pixels (not edge lengths)."""

    processor_class: str
    resize_rule: Literal["glm", "qwen"]
    min_pixels: int  # HF size["shortest_edge"]
    max_pixels: int  # HF size["longest_edge"]
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    patch_expand_factor: int = 1  # GLMGA only
    image_mean: tuple[float, ...] = CLIP_MEAN
    image_std: tuple[float, ...] = CLIP_STD
    rescale_factor: float = 1 / 255
    resample: int = 3  # PIL code: 3 bicubic, 2 bilinear

    @property
    def factor(self) -> int:
        """Resize granularity `f = P*m*e` (GLMGA multiplies by `patch_expand_factor`)."""
        return self.patch_size * self.merge_size * self.patch_expand_factor


@dataclass(frozen=True)
class VideoSpec(ImageSpec):
    """How one checkpoint samples and patchifies a video (plus the image fields, video-sized)."""

    sampler: Sampler = "glm4v"
    do_sample_frames: bool = True
    fps: float | None = None  # glm4v/glmga target fps; qwen sampling fps (None: all frames)
    num_frames: int | None = None  # qwen only
    min_frames: int | None = None  # qwen only
    max_frames: int | None = None  # glmga (instance value) and qwen
    max_duration: float | None = None  # glm4v only
    cap_pixels_per_frame: bool = False  # qwen only
    max_video_tokens: int = 128000  # qwen only, with cap_pixels_per_frame
    timestamp_format: Literal["int", "seconds", "none"] = "int"  # GLM prompt text; qwen: none


@dataclass(frozen=True)
class Ceilings:
    """Operator limits that per-request overrides may not exceed (a request may only lower them).

    Each field is the server flag in the comment; errors name the flag. `None` for a pixel
    ceiling means "the checkpoint's own value" for that modality.
    """

    max_pixels: int | None = None  # --max-pixels: image resize area (size.longest_edge)
    max_video_pixels: int | None = None  # --max-video-pixels: video area, all frames (GLM) / per frame (Qwen)
    max_frames: int = 768  # --max-frames: frames a request may ask for (num_frames / max_frames) or keep
    max_fps: float = 30.0  # --max-fps


# No ceiling at all (`check_overrides`: a modality the request does not carry).
_UNBOUNDED = Ceilings(
    max_pixels=sys.maxsize, max_video_pixels=sys.maxsize, max_frames=sys.maxsize, max_fps=math.inf
)


def _canonical(name: Any, table: MappingProxyType, path: str, key: str) -> str:
    if not isinstance(name, str):
        raise CheckpointError(
            f"{path}: '{key}' is missing or not a string; glimpse needs the HF processor class name"
        )
    for suffix in ("Fast", "Pil"):
        if name.endswith(suffix) and name[: -len(suffix)] in table:
            name = name[: -len(suffix)]
    if name not in table:
        raise CheckpointError(f"{path}: unsupported {key} '{name}'; supported: {', '.join(table)}")
    return name


def _size(cfg: dict, default: tuple[int, int], qwen: bool, path: str) -> tuple[int, int]:
    size = cfg.get("size")
    if size is None:
        lo, hi = default
    elif isinstance(size, dict):
        # HF replaces the whole default dict with the checkpoint's, so a missing key stays missing.
        lo, hi = size.get("shortest_edge"), size.get("longest_edge")
    else:
        raise CheckpointError(f"{path}: 'size' must be a dict with shortest_edge/longest_edge, got {size!r}")
    if qwen:  # Qwen's legacy top-level aliases win over `size`
        lo = cfg["min_pixels"] if cfg.get("min_pixels") is not None else lo
        hi = cfg["max_pixels"] if cfg.get("max_pixels") is not None else hi
    if not lo or not hi:
        raise CheckpointError(
            f"{path}: size needs non-zero 'shortest_edge' and 'longest_edge' (pixel areas), got {size!r}"
        )
    return _pos_int(lo, "size.shortest_edge", path), _pos_int(hi, "size.longest_edge", path)


def _is_positive(value: Any) -> bool:
    return (
        not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value) and value > 0
    )


def _pos_int(value: Any, key: str, path: str) -> int:
    if not _is_positive(value) or value != int(value):
        raise CheckpointError(f"{path}: '{key}' must be a positive integer, got {value!r}")
    return int(value)


def _pos_float(value: Any, key: str, path: str) -> float:
    if not _is_positive(value):
        raise CheckpointError(f"{path}: '{key}' must be a positive number, got {value!r}")
    return float(value)


def _common(cfg: dict, path: str, expand: bool) -> dict:
    """The fields every spec shares; a missing or null key takes HF's class default."""
    defaults = {f.name: f.default for f in dataclasses.fields(ImageSpec)}
    out = {}
    for key in ("patch_size", "temporal_patch_size", "merge_size", "rescale_factor", "resample"):
        out[key] = defaults[key] if cfg.get(key) is None else cfg[key]
    for key in ("patch_size", "temporal_patch_size", "merge_size"):
        out[key] = _pos_int(out[key], key, path)
    out["rescale_factor"] = _pos_float(out["rescale_factor"], "rescale_factor", path)
    out["patch_expand_factor"] = (
        _pos_int(cfg.get("patch_expand_factor") or 1, "patch_expand_factor", path) if expand else 1
    )
    for key in ("image_mean", "image_std"):
        value = defaults[key] if cfg.get(key) is None else cfg[key]
        if isinstance(value, int | float):
            value = [value] * 3
        if (
            not isinstance(value, list | tuple)
            or len(value) != 3
            or not all(isinstance(v, int | float) for v in value)
        ):
            raise CheckpointError(f"{path}: '{key}' must hold 3 numbers (RGB), got {value!r}")
        out[key] = tuple(float(v) for v in value)
    if 0 in out["image_std"]:
        raise CheckpointError(f"{path}: 'image_std' has a zero entry")
    if out["resample"] not in (2, 3):
        raise CheckpointError(
            f"{path}: resample={out['resample']!r} unsupported; glimpse does 2 (bilinear), 3 (bicubic)"
        )
    for flag in ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb"):
        if cfg.get(flag) is False:
            raise CheckpointError(
                f"{path}: {flag}=false is not supported (glimpse always resizes, rescales, normalizes)"
            )
    return out


def image_spec_from_dict(cfg: dict, path: str = "preprocessor_config.json") -> ImageSpec:
    """ImageSpec from an image-processor dict, as HF's class named in `image_processor_type` applies it."""
    cls = _canonical(cfg.get("image_processor_type"), IMAGE_CLASSES, path, "image_processor_type")
    rule = IMAGE_CLASSES[cls]
    lo, hi = _size(cfg, _IMAGE_SIZE[rule], rule == "qwen", path)
    common = _common(cfg, path, expand=cls == "GlmgaImageProcessor")
    return ImageSpec(processor_class=cls, resize_rule=rule, min_pixels=lo, max_pixels=hi, **common)


def video_class_name(cfg: dict, path: str) -> str:
    """HF's AutoVideoProcessor rule: `video_processor_type`, else the image class renamed."""
    name = cfg.get("video_processor_type")
    if name is None and isinstance(cfg.get("image_processor_type"), str):
        name = cfg["image_processor_type"].replace("ImageProcessor", "VideoProcessor")
    return _canonical(name, VIDEO_CLASSES, path, "video_processor_type")


def video_spec_from_dict(
    cfg: dict, path: str = "video_preprocessor_config.json", processor_class: str | None = None
) -> VideoSpec:
    """VideoSpec from a video-processor dict (or the image dict HF falls back to).

    `processor_class` (from processor_config.json) picks the GLM timestamp text: `Glm4vProcessor`
    writes integer seconds, any other GLM processor writes "{:.1f} seconds"; without it the
    video class decides (glm4v -> int, glm46v/glmga -> seconds).
    """
    cls = video_class_name(cfg, path)
    sampler: Sampler = VIDEO_CLASSES[cls]  # type: ignore[assignment]
    defaults = _VIDEO_DEFAULTS[sampler]
    lo, hi = _size(cfg, defaults["size"], sampler == "qwen", path)
    common = _common(cfg, path, expand=sampler == "glmga")

    def pick(key: str) -> Any:
        value = cfg.get(key)
        return defaults.get(key) if value is None else value

    fields: dict[str, Any] = {"do_sample_frames": bool(pick("do_sample_frames"))}
    if sampler in ("glm4v", "glmga", "qwen"):
        fps = pick("fps")
        fields["fps"] = None if fps is None else _pos_float(fps, "fps", path)
    if sampler == "glm4v":
        fields["max_duration"] = _pos_float(pick("max_duration"), "max_duration", path)
    if sampler in ("glmga", "qwen"):
        fields["max_frames"] = _pos_int(pick("max_frames"), "max_frames", path)
    if sampler == "qwen":
        fields["min_frames"] = _pos_int(pick("min_frames"), "min_frames", path)
        if cfg.get("num_frames") is not None:
            fields["num_frames"] = _pos_int(cfg["num_frames"], "num_frames", path)
        fields["cap_pixels_per_frame"] = bool(cfg.get("cap_pixels_per_frame") or False)
        fields["max_video_tokens"] = _pos_int(cfg.get("max_video_tokens") or 128000, "max_video_tokens", path)
        fields["timestamp_format"] = "none"
        if fields.get("num_frames") is not None and fields["fps"] is not None:
            raise CheckpointError(
                f"{path}: sets both fps and num_frames; HF refuses that (they exclude each other)"
            )
    elif processor_class is not None:
        fields["timestamp_format"] = "int" if processor_class == "Glm4vProcessor" else "seconds"
    else:
        fields["timestamp_format"] = "int" if sampler == "glm4v" else "seconds"
    return VideoSpec(
        processor_class=cls,
        resize_rule="qwen" if sampler == "qwen" else "glm",
        min_pixels=lo,
        max_pixels=hi,
        sampler=sampler,
        **common,
        **fields,
    )


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not readable JSON ({type(exc).__name__})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def load_specs(checkpoint_dir: str | Path) -> tuple[ImageSpec, VideoSpec]:
    """Both specs of a checkpoint folder, with HF's file priority.

    Image: `processor_config.json["image_processor"]`, else `preprocessor_config.json`.
    Video: `processor_config.json["video_processor"]`, else `video_preprocessor_config.json`,
    else `preprocessor_config.json` (so the image pixel limits then apply to videos too).
    """
    root = Path(checkpoint_dir)
    processor = _read_json(root / "processor_config.json") or {}
    image_file = _read_json(root / "preprocessor_config.json")
    video_file = _read_json(root / "video_preprocessor_config.json")

    if isinstance(processor.get("image_processor"), dict):
        image_cfg, image_path = processor["image_processor"], "processor_config.json[image_processor]"
    elif image_file is not None:
        image_cfg, image_path = image_file, "preprocessor_config.json"
    else:
        raise CheckpointError(
            f"{root}: no preprocessor_config.json (or processor_config.json with image_processor)"
        )

    if isinstance(processor.get("video_processor"), dict):
        video_cfg, video_path = processor["video_processor"], "processor_config.json[video_processor]"
    elif video_file is not None:
        video_cfg, video_path = video_file, "video_preprocessor_config.json"
    else:
        video_cfg, video_path = image_cfg, image_path

    processor_class = processor.get("processor_class")
    if processor_class is None and image_file is not None:
        processor_class = image_file.get("processor_class")
    if processor_class is None:
        tokenizer_cfg = _read_json(root / "tokenizer_config.json") or {}
        processor_class = tokenizer_cfg.get("processor_class")
    if not isinstance(processor_class, str):
        processor_class = None
    return (
        image_spec_from_dict(image_cfg, image_path),
        video_spec_from_dict(video_cfg, video_path, processor_class),
    )


_IMAGE_KNOBS = ("min_pixels", "max_pixels")
_VIDEO_KNOBS = ("min_pixels", "max_pixels", "fps", "num_frames", "min_frames", "max_frames", "max_duration",
                "do_sample_frames")  # fmt: skip

# Knobs that HF's processor would accept and then silently not use, per sampler, with the reason.
_IGNORED_BY_HF = MappingProxyType({
    "glm4v": (("num_frames", "min_frames", "max_frames", "max_duration"),
              "Glm4vVideoProcessor samples by fps only, and reads max_duration from the checkpoint"),
    "glm46v": (("fps", "num_frames", "min_frames", "max_frames", "max_duration"),
               "Glm46VVideoProcessor picks 6/2/1 frames/s from the duration, at most 640 frames"),
    "glmga": (("num_frames", "min_frames", "max_frames", "max_duration"),
              "GlmgaVideoProcessor samples by fps only, and reads max_frames from the checkpoint"),
    "qwen": (("max_duration",), "Qwen2VLVideoProcessor has no max_duration"),
})  # fmt: skip


def _req_int(key: str, value: Any, lowest: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
        raise InvalidInputError(f"{key} must be an integer >= {lowest}, got {value!r}")
    return value


def _req_float(key: str, value: Any) -> float:
    if not _is_positive(value):
        raise InvalidInputError(f"{key} must be a positive finite number, got {value!r}")
    return float(value)


def _over(key: str, value: float, limit: float, flag: str, source: str | None = None, what: str = "") -> None:
    """Refuse `value` over `limit`, naming the server flag that sets the limit (and, when the limit is
    the checkpoint's own value because the flag is unset, saying so). `what`: " for videos" etc."""
    if value > limit:
        where = (
            f"server flag {flag}" if source is None else f"{source}; the server flag {flag} can set another"
        )
        raise LimitExceededError(f"{key}={value}{what} exceeds the ceiling of {limit} ({where})")


def size_as_pixels(overrides: dict[str, Any]) -> dict[str, Any]:
    """HF's `size={"shortest_edge": N, "longest_edge": M}` as `min_pixels=N, max_pixels=M`.

    HF's Qwen2-VL and GLM image and video processors mean pixel counts (areas) by both edges, not side
    lengths, and take both keys or neither. Giving `size` and `min_pixels`/`max_pixels` together is refused
    rather than resolved: they say the same thing twice. Other keys pass unchanged.
    """
    if "size" not in overrides:
        return overrides
    size = overrides["size"]
    if not isinstance(size, dict) or set(size) != {"shortest_edge", "longest_edge"}:
        raise InvalidInputError(f"size must be {{\"shortest_edge\": MIN_PIXELS, \"longest_edge\": MAX_PIXELS}} (pixel "
                                f"counts, as HF's processors take it), got {size!r}")  # fmt: skip
    both = sorted({"min_pixels", "max_pixels"} & set(overrides))
    if both:
        raise InvalidInputError(f"size and {', '.join(both)} set the same resize bounds; give either size="
                                "{shortest_edge, longest_edge} or min_pixels/max_pixels, not both")  # fmt: skip
    out = {k: v for k, v in overrides.items() if k != "size"}
    return out | {"min_pixels": size["shortest_edge"], "max_pixels": size["longest_edge"]}


def with_overrides(spec: ImageSpec, ceilings: Ceilings | None = None, **overrides: Any) -> ImageSpec:
    """A copy of `spec` with per-request knobs applied, after validating every one of them.

    Image knobs: `min_pixels`, `max_pixels` (resize areas, as HF's `size=` call argument).
    Video knobs: also `fps`, `num_frames`, `min_frames`, `max_frames`, `max_duration`,
    `do_sample_frames`. Unknown keys, knobs that HF's processor would silently ignore for this
    family, bad values and values above `ceilings` are rejected. For Qwen, `fps` and
    `num_frames` exclude each other; setting one clears the checkpoint's other, and either
    turns frame sampling on (HF only samples when `do_sample_frames` is true).
    """
    ceilings = ceilings or Ceilings()
    is_video = isinstance(spec, VideoSpec)
    kind = "video" if is_video else "image"
    allowed = _VIDEO_KNOBS if is_video else _IMAGE_KNOBS
    for key in overrides:
        if key not in allowed:
            raise InvalidInputError(f"unknown {kind} setting '{key}'; allowed: {', '.join(allowed)}")
    if not overrides:
        return spec
    changes: dict[str, Any] = {}
    # Each modality has its own pixel ceiling: the operator's flag, else the checkpoint's own value.
    pixel_ceiling = ceilings.max_video_pixels if is_video else ceilings.max_pixels
    pixel_flag = "--max-video-pixels" if is_video else "--max-pixels"
    source = None
    if pixel_ceiling is None:
        pixel_ceiling, source = spec.max_pixels, f"the checkpoint's {kind} size.longest_edge"
    for key in ("min_pixels", "max_pixels"):
        if key in overrides:
            changes[key] = _req_int(key, overrides[key])
            _over(key, changes[key], pixel_ceiling, pixel_flag, source, f" for {kind}s")
    lo, hi = changes.get("min_pixels", spec.min_pixels), changes.get("max_pixels", spec.max_pixels)
    if lo > hi:
        raise InvalidInputError(f"min_pixels={lo} is larger than max_pixels={hi}")
    if is_video:
        changes.update(_video_changes(spec, ceilings, overrides))
    return dataclasses.replace(spec, **changes)


def check_overrides(spec: ImageSpec, **overrides: Any) -> None:
    """Validate per-request knobs for a modality the request does not carry, without applying them.

    Each value is checked on its own (type, range, knobs HF would ignore for this family, pairs
    given together such as min_pixels <= max_pixels), but against no ceiling and no checkpoint
    value: nothing is resized with them, so a request without videos is never refused for a
    video limit (and likewise for images).
    """
    loose = dataclasses.replace(spec, min_pixels=1, max_pixels=sys.maxsize)
    if isinstance(loose, VideoSpec):
        loose = dataclasses.replace(loose, min_frames=None, max_frames=None)
    with_overrides(loose, _UNBOUNDED, **overrides)


def _video_changes(spec: VideoSpec, ceilings: Ceilings, overrides: dict[str, Any]) -> dict[str, Any]:
    ignored, reason = _IGNORED_BY_HF[spec.sampler]
    for key in overrides:
        if key in ignored:
            raise InvalidInputError(
                f"'{key}' cannot be set per request for {spec.processor_class}: HF ignores it ({reason})"
            )
    changes: dict[str, Any] = {}
    if "do_sample_frames" in overrides:
        if not isinstance(overrides["do_sample_frames"], bool):
            raise InvalidInputError(
                f"do_sample_frames must be true or false, got {overrides['do_sample_frames']!r}"
            )
        changes["do_sample_frames"] = overrides["do_sample_frames"]
    if "fps" in overrides:
        changes["fps"] = _req_float("fps", overrides["fps"])
        _over("fps", changes["fps"], ceilings.max_fps, "--max-fps")
    for key in ("num_frames", "max_frames", "min_frames"):
        if key in overrides:
            changes[key] = _req_int(
                key, overrides[key], spec.temporal_patch_size if key == "num_frames" else 1
            )
            _over(key, changes[key], ceilings.max_frames, "--max-frames")
    if spec.sampler == "qwen":
        if "fps" in changes and "num_frames" in changes:
            raise InvalidInputError("fps and num_frames exclude each other (HF raises); set only one")
        if "fps" in changes:
            changes["num_frames"] = None
        elif "num_frames" in changes:
            changes["fps"] = None
        lo = changes.get("min_frames", spec.min_frames) or 0
        hi = changes.get("max_frames", spec.max_frames) or lo
        if lo > hi:
            raise InvalidInputError(f"min_frames={lo} is larger than max_frames={hi}")
    if ("fps" in changes or "num_frames" in changes) and "do_sample_frames" not in changes:
        changes["do_sample_frames"] = True
    elif ("fps" in changes or "num_frames" in changes) and changes["do_sample_frames"] is False:
        raise InvalidInputError(
            "fps/num_frames only act when frames are sampled; do not combine with do_sample_frames=false"
        )
    return changes
