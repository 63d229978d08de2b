"""The device seam: only glimpse/platform.py, glimpse/device_names.py and glimpse/backends/ name devices and CPU features, and
the backends are chosen once at start-up (glimpse/backends/__init__.py).

The scan reads code, not prose: it tokenizes each module (`tokenize`), drops comments and docstrings
(a string that is a whole statement), and looks for lowercase `cuda`, `is_cuda`, `mkldnn*`, `avx*` and
`amx*` as words in names and string literals. Lowercase is how torch's APIs, device strings and
/proc/cpuinfo spell them; prose says "CUDA" and "oneDNN". `"cpu"` is allowed everywhere: it is where
tensors live by default and the device users pass, not a device check.

Behaviour: with `GLIMPSE_NATIVE_KERNELS=0` (a subprocess, as the variable is read once) the selected
backends are torch's and a tiny bf16 glm4v checkpoint decodes the same greedy tokens as with the
native kernels, wherever the float32 model's top-2 margin exceeds both paths' rounding error; each
path's logprobs stay within the tolerance tests/test_cpu_kernels.py uses (1.5x torch's bf16 error
against float32, plus 1e-3).
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import tokenize
from pathlib import Path

import pytest
import torch

from glimpse import backends, platform
from glimpse.engine.sampling_params import SamplingParams
from glimpse.llm import LLM

PACKAGE = Path(__file__).resolve().parents[1] / "glimpse"
# device_names.py: the device names alone, torch-free, so that the command line can check --device as it parses
ALLOWED = (PACKAGE / "platform.py", PACKAGE / "backends", PACKAGE / "device_names.py")
DEVICE_WORD = re.compile(r"\b(?:is_cuda|cuda\w*|mkldnn\w*|avx\w*|amx\w*)\b")


def device_mentions(source: str) -> list[tuple[int, str]]:
    """(line, word) for each device or CPU-feature word in code (names and strings, not comments or docstrings)."""
    found = []
    tokens = [t for t in tokenize.generate_tokens(io.StringIO(source).readline) if t.type != tokenize.NL]
    for i, tok in enumerate(tokens):
        if tok.type not in (tokenize.NAME, tokenize.STRING):
            continue
        statement_start = i == 0 or tokens[i - 1].type in (tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT)
        next_type = tokens[i + 1].type if i + 1 < len(tokens) else tokenize.ENDMARKER
        if (
            tok.type == tokenize.STRING
            and statement_start
            and next_type in (tokenize.NEWLINE, tokenize.ENDMARKER)
        ):
            continue  # a docstring (or a bare string statement): prose
        found += [(tok.start[0], m.group()) for m in DEVICE_WORD.finditer(tok.string)]
    return found


def test_scanner_reads_code_not_prose():
    """A hand-made module: the words in a docstring and a comment are prose; those in code are found."""
    source = '''"""Runs on cuda and avx512_bf16."""
import torch  # mkldnn is faster here


def f(t):
    """On is_cuda tensors."""
    flags = {"amx_tile"}
    return t.is_cuda or torch.backends.mkldnn.enabled, f"{t.device}" == "cuda", flags
'''
    assert device_mentions(source) == [(7, "amx_tile"), (8, "is_cuda"), (8, "mkldnn"), (8, "cuda")]


def test_only_platform_and_backends_name_devices():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path in (ALLOWED[0], ALLOWED[2]) or ALLOWED[1] in path.parents:
            continue
        offenders += [
            f"{path.relative_to(PACKAGE.parent)}:{line}: {word}"
            for line, word in device_mentions(path.read_text())
        ]
    assert not offenders, (
        "device/CPU-feature names outside glimpse/platform.py and glimpse/backends/:\n" + "\n".join(offenders)
    )


def test_one_row_matmuls_switch_only_for_one_reduced_cpu_row():
    """oneDNN goes off only for one bf16/fp16 row on CPU, and comes back as it was."""
    cpu = torch.device("cpu")
    before = torch.backends.mkldnn.enabled
    for rows, dtype, off in ((1, torch.bfloat16, True), (1, torch.float16, True), (2, torch.bfloat16, False),
                             (1, torch.float32, False)):  # fmt: skip
        with platform.one_row_matmuls(rows, dtype, cpu):
            assert torch.backends.mkldnn.enabled is (before and not off)
        assert torch.backends.mkldnn.enabled is before


def test_selection_follows_platform_dtype_and_head_dim():
    cpu_native = platform.Platform("cpu", frozenset(platform.NATIVE_CPU_FLAGS), 2, True)
    names = lambda b: (b.attention.name, b.vision_attention.name, b.linear.name, b.graphs.name)  # noqa: E731
    assert names(backends.select_backends(cpu_native, torch.bfloat16, 128, 80)) == (
        "native-cpu-bf16", "native-cpu-bf16", "native-cpu-one-row-bf16", "torch.compile")  # fmt: skip
    # a head dim the kernels are not built for (vision 72), float32, native kernels off
    assert names(backends.select_backends(cpu_native, torch.bfloat16, 128, 72))[:2] == (
        "native-cpu-bf16",
        "torch-sdpa",
    )
    assert names(backends.select_backends(cpu_native, torch.float32, 128, 80))[:3] == (
        "torch-sdpa",
        "torch-sdpa",
        "torch",
    )
    off = platform.Platform("cpu", frozenset(platform.NATIVE_CPU_FLAGS), 2, False)
    assert names(backends.select_backends(off, torch.bfloat16, 128, 80))[:3] == (
        "torch-sdpa",
        "torch-sdpa",
        "torch",
    )
    amx = platform.Platform("cpu", frozenset(platform.NATIVE_CPU_FLAGS) | {"amx_tile", "amx_bf16"}, 2, True)
    assert names(backends.select_backends(amx, torch.bfloat16, 128, 80))[:2] == ("native-cpu-bf16", "native-cpu-bf16")
    assert names(backends.select_backends(amx, torch.bfloat16, 128, 72))[:2] == ("native-cpu-bf16", "torch-sdpa")
    packed = platform.Platform("cpu", frozenset(platform.NATIVE_CPU_FLAGS), 2, True, packed_weights=True)
    assert names(backends.select_backends(packed, torch.bfloat16, 128, 80))[2] == "onednn-packed-bf16+native-one-row"
    assert names(backends.select_backends(packed, torch.float32, 128, 80))[2] == "torch"
    # by default the packed copies may take a quarter of the RAM, the decoder's first (decode steps run
    # them a few rows at a time), the vision tower's too where both fit; GLIMPSE_PACKED_WEIGHTS=1 forces it
    small_ram = platform.Platform("cpu", frozenset(), 2, False, packed_weights=True, memory_bytes=4 << 30)
    linears = lambda b: (b.linear.name, b.tower_linear.name)  # noqa: E731
    gib = 1 << 30
    assert linears(backends.select_backends(small_ram, torch.bfloat16, 128, 80, (gib // 2, gib // 2))) == (
        "onednn-packed-bf16", "onednn-packed-bf16")  # fmt: skip
    assert linears(backends.select_backends(small_ram, torch.bfloat16, 128, 80, (gib // 2, gib // 2 + 1))) == (
        "onednn-packed-bf16", "torch")  # fmt: skip
    assert linears(backends.select_backends(small_ram, torch.bfloat16, 128, 80, (gib + 1, 0))) == ("torch", "torch")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(platform.PACKED_WEIGHTS_ENV, "1")
        assert linears(backends.select_backends(small_ram, torch.bfloat16, 128, 80, (2 * gib, gib))) == (
            "onednn-packed-bf16", "onednn-packed-bf16")  # fmt: skip
    packed_only = platform.Platform("cpu", frozenset(), 2, False, packed_weights=True)
    assert names(backends.select_backends(packed_only, torch.bfloat16, 128, 80))[2] == "onednn-packed-bf16"
    gpu = platform.Platform("cuda", frozenset(), 2, False)  # selection only: nothing runs on it here
    assert names(backends.select_backends(gpu, torch.bfloat16, 128, 80))[1:] == (
        "cuda-flash-varlen",
        "torch",
        "cuda-graphs",
    )


_RUN = """
import json, sys
from glimpse.llm import LLM
from glimpse.engine.sampling_params import SamplingParams
llm = LLM(sys.argv[1], dtype="bfloat16")
conv = json.loads(sys.argv[2])
out = llm.chat(conv, SamplingParams(temperature=0, max_tokens=10, logprobs=0, ignore_eos=True), use_tqdm=False)[0]
b = llm.engine.model.backends
comp = out.outputs[0]
print(json.dumps({"backends": [b.attention.name, b.vision_attention.name, b.linear.name],
                  "kv_cache": llm.engine.kv_cache.attention is b.attention,
                  "tokens": comp.token_ids, "logprobs": [lp.logprob for lp in comp.logprobs]}))
"""


def _engine_run(path: Path, conv: list, native: bool) -> dict:
    flag = "1" if native else "0"  # "native": glimpse's kernels and packed weights; else torch's plain ops
    env = {**os.environ, platform.NATIVE_KERNELS_ENV: flag, platform.PACKED_WEIGHTS_ENV: flag}
    done = subprocess.run([sys.executable, "-c", _RUN, str(path), json.dumps(conv)], env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_native_kernels_off_selects_torch_and_decodes_the_same(tiny_checkpoint):
    path = tiny_checkpoint("glm4v")
    image = Path(__file__).resolve().parent / "data" / "media" / "images" / "coffee.png"
    conv = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": str(image)}},
                                         {"type": "text", "text": "Describe the cup."}]}]  # fmt: skip
    off = _engine_run(path, conv, native=False)
    assert off["backends"] == ["torch-sdpa", "torch-sdpa", "torch"] and off["kv_cache"]
    if not platform.detect().native_kernels:
        pytest.skip("this machine does not run the native kernels: nothing to compare the torch path with")
    on = _engine_run(path, conv, native=True)
    # the decoder's head dim (32) is one the kernels are built for; the tiny tower's is not (torch's SDPA)
    linear = "onednn-packed-bf16+native-one-row" if platform.detect().packed_weights else "native-cpu-one-row-bf16"
    assert on["backends"] == ["native-cpu-bf16", "torch-sdpa", linear] and on["kv_cache"]

    # the float32 model (torch's kernels, no rounding to speak of) scores each path's tokens
    llm32 = LLM(path, dtype="float32")
    p = llm32.processor(conv)
    media = {k: v for k, v in dict(p).items() if k in ("pixel_values", "image_grid_thw")}
    start = len(p.input_ids) - 1

    def exact(tokens: list[int]) -> torch.Tensor:
        ids = torch.tensor(p.input_ids + tokens[:-1])
        return torch.log_softmax(llm32.engine.model.compute_logits(ids, **media)[start:].double(), -1)

    errors = {}
    for name, run in (("on", on), ("off", off)):
        ref = exact(run["tokens"]).gather(1, torch.tensor(run["tokens"])[:, None])[:, 0]
        errors[name] = float((torch.tensor(run["logprobs"], dtype=torch.float64) - ref).abs().max())
    assert errors["on"] <= 1.5 * errors["off"] + 1e-3, errors

    # greedy tokens agree wherever float32's top-2 margin is beyond both paths' error: the paths may part
    # only at a near-tie, and before that they pick float32's argmax at every step it is sure of
    ref = exact(on["tokens"])
    top2 = ref.topk(2, dim=-1).values
    sure = ((top2[:, 0] - top2[:, 1]) >= 2 * max(errors.values())).tolist()
    pairs = list(zip(on["tokens"], off["tokens"], strict=True))
    part = next((i for i, (a, b) in enumerate(pairs) if a != b), len(pairs))
    assert part == len(pairs) or not sure[part], ("the paths part where float32 is sure", part, on, off)
    argmax = ref.argmax(-1).tolist()
    checked = [i for i in range(part) if sure[i]]
    assert len(checked) >= 4, "fixture too close to ties to compare anything; change the prompt"
    assert all(on["tokens"][i] == argmax[i] for i in checked), (on["tokens"], argmax, checked)


def test_backends_selected_once_per_engine(tiny_checkpoint, monkeypatch):
    """Loading selects (and logs) once; building the engine and serving a request select nothing more."""
    calls = []
    select = backends.select_backends
    monkeypatch.setattr(backends, "select_backends", lambda *a, **k: calls.append(a) or select(*a, **k))
    llm = LLM(tiny_checkpoint("glm4v"), dtype="bfloat16")
    llm.generate("Hello", SamplingParams(temperature=0, max_tokens=3), use_tqdm=False)
    assert len(calls) == 1
    assert llm.engine.kv_cache.attention is llm.engine.model.backends.attention


@pytest.mark.skipif(not platform.detect().packed_weights, reason="oneDNN has no bf16 matmuls on this CPU")
@pytest.mark.parametrize(("k", "n", "bias"), [(768, 4096, True), (2048, 768, False), (96, 40, True)])
def test_packed_linear_equals_f_linear(k, n, bias):
    """The packed-weight method runs the same oneDNN kernel as F.linear on the plain weight: equal
    bit for bit at every row count (several rows; one row goes to the native GEMV when it runs),
    also for a leading batch dim, and F.linear's under autograd."""
    from glimpse.backends.onednn_packed import PackedOneDnnLinear
    from glimpse.models.layers import Linear

    torch.manual_seed(0)
    layer = Linear(k, n, bias=bias).to(torch.bfloat16)
    method = PackedOneDnnLinear()
    method.prepare(layer)
    assert layer.packed_weight is not None and "packed_weight" not in layer.state_dict()
    with torch.no_grad():
        for rows in (1, 2, 5, 16, 33, 64, 300):
            x = torch.randn(rows, k, dtype=torch.bfloat16)
            assert torch.equal(method.apply(layer, x), torch.nn.functional.linear(x, layer.weight, layer.bias)), rows
        x = torch.randn(2, 7, k, dtype=torch.bfloat16)
        assert torch.equal(method.apply(layer, x), torch.nn.functional.linear(x, layer.weight, layer.bias))
    x = torch.randn(4, k, dtype=torch.bfloat16, requires_grad=True)
    method.apply(layer, x).float().sum().backward()  # autograd goes through F.linear
    assert x.grad is not None


def test_no_cuda_home_warning_on_a_cpu_machine(tmp_path):
    """torch's extension loader warns "No CUDA runtime is found, using CUDA_HOME=..." when a CUDA folder
    exists but no GPU does (forced here with CUDA_HOME); glimpse builds CPU kernels and compiles CPU graphs
    with it, so that line must not reach the user's terminal."""
    import os
    import subprocess
    import sys

    code = ("import torch; from glimpse.platform import detect; detect('cpu'); "
            "import torch.utils.cpp_extension as c; c._find_cuda_home()")  # fmt: skip
    env = {**os.environ, "CUDA_HOME": str(tmp_path), "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "No CUDA runtime is found" not in done.stderr
    # the control: without glimpse's filter torch does print it in this environment
    control = subprocess.run([sys.executable, "-c", "import torch.utils.cpp_extension"], env=env,
                             capture_output=True, text=True, timeout=300)  # fmt: skip
    assert "No CUDA runtime is found" in control.stderr


def test_devices_resolve_by_what_torch_sees(monkeypatch):
    from glimpse.errors import InvalidInputError
    from glimpse.platform import resolve_device

    for seen in (0, 2):
        monkeypatch.setattr(torch.cuda, "is_available", lambda seen=seen: seen > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda seen=seen: seen)
        assert resolve_device("auto") == ("cuda" if seen else "cpu")
        assert resolve_device(" CPU ") == "cpu"
        for name in ("cuda", "cuda:1"):
            if seen:
                assert resolve_device(name) == name
            else:
                with pytest.raises(InvalidInputError, match=f"device '{name}': this machine has 0 CUDA GPU"):
                    resolve_device(name)
    with pytest.raises(InvalidInputError, match="this machine has 2 CUDA GPU"):
        resolve_device("cuda:2")
    for bad in ("tpu", "cuda:", "cuda:-1", "mps", ""):
        with pytest.raises(InvalidInputError, match="is not supported; use auto"):
            resolve_device(bad)


def test_the_tower_and_the_decoder_get_their_own_linear_method(tiny_checkpoint):
    """bind_backends gives the vision tower's Linear layers `tower_linear` and every other one (the
    language model's, lm_head) `linear`, and prepares each for its own method: a packed copy only where
    the method packs. linear_weight_bytes splits the weights the same way."""
    from glimpse.backends.torch_linear import TorchLinear
    from glimpse.loader import load_model
    from glimpse.models.layers import Linear

    class Marking(TorchLinear):
        def __init__(self, mark: str) -> None:
            self.name, self.mark = mark, mark

        def prepare(self, layer):
            layer.prepared_by = self.mark

    model = load_model(tiny_checkpoint("qwen2_5_vl"), dtype="bfloat16")
    chosen = model.backends
    split = backends.Backends(chosen.attention, chosen.vision_attention, Marking("decoder"), chosen.graphs,
                              Marking("tower"))  # fmt: skip
    backends.bind_backends(model, split)
    tower = set(model.model.visual.modules())
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, Linear)]
    assert {m.prepared_by for _, m in linears if m in tower} == {"tower"}
    assert {m.prepared_by for _, m in linears if m not in tower} == {"decoder"}
    assert all(name.startswith("model.visual.") == (m in tower) for name, m in linears)
    assert model.lm_head.linear_method is split.linear and model.lm_head.prepared_by == "decoder"
    decoder_bytes, tower_bytes = backends.linear_weight_bytes(model)
    assert tower_bytes == sum(m.weight.nbytes for name, m in linears if name.startswith("model.visual."))
    assert decoder_bytes + tower_bytes == sum(m.weight.nbytes for _, m in linears) and min(decoder_bytes, tower_bytes) > 0
