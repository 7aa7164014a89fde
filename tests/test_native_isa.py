"""The native kernel at every ISA level this machine can execute: vectorized, and bitwise the eager kernel.

Each x86-64 level the CPU's ``/proc/cpuinfo`` flags allow (:func:`library.executable_isas`) is built once per
session (the shared cache) and opened as a handle of its own (:func:`library.load_isa`); the kernel test cases
of ``tests/test_kernels.py`` and ``tests/test_native_abi.py`` (odd widths and tails, shard cuts, inf/NaN, bf16
parameters and momentum, beta, bias correction, gradient scale, the update clip and its edges: NaN, -0, +-inf,
the bounds themselves; every code) then run through it. Levels the CPU cannot execute (AVX-512 here) are
compiled, both the intrinsics and the generic body, but not run.

aarch64 (NEON): where ``aarch64-linux-gnu-g++`` and ``qemu-aarch64`` are installed (``make test-aarch64``
installs them on Debian), a driver (``tests/native/sm3_driver.cpp``) compiled for aarch64 with the kernel
runs under emulation on inputs the eager kernel's cases wrote; its outputs must be the eager kernel's bits.
Without the cross compiler those tests skip and say so.
"""

from __future__ import annotations

import math
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from sm3_dist import functional
from sm3_dist.kernels.cpu import library
from sm3_dist.kernels.cpu.native_step import MOMENTUM_KINDS, PARAM_DTYPES, step_arguments
from sm3_dist.kernels.rule import UpdateRule
from tests import test_kernels as kernel_cases
from tests import test_native_abi as abi_cases
from tests.common import KERNELS

LEVELS = library.executable_isas() if library._compiler() is not None else []
DRIVER = Path(__file__).with_name("native") / "sm3_driver.cpp"


@pytest.fixture(scope="module", params=LEVELS or [pytest.param(None, marks=pytest.mark.skip("no x86-64 level"))])
def level(request):
    """One ISA level's library (built once per session), as a handle of its own."""
    return request.param, library.load_isa(request.param)


@pytest.fixture
def at_level(level, monkeypatch):
    """Every native call of the test (the step, the scan) goes to this level's library."""
    name, lib = level
    monkeypatch.setattr(library, "load", lambda: lib)
    return name


def test_the_level_reports_its_vector_width(level):
    name, lib = level
    info = library.build_info(lib)
    assert info["isa"] == name and f"-march={name}" in info["flags"]
    assert info["vector_width"] == library.ISA_VECTOR_WIDTH[name] > 1


@pytest.mark.parametrize("hyper", list(kernel_cases.HYPERS))
@pytest.mark.parametrize("shape", [*kernel_cases.SHAPES, (1,), (3, 40000), (70001,)], ids=str)
@pytest.mark.parametrize("pdtype,mdtype", [("fp32", "fp32"), ("fp32", "none"), ("bf16", "bf16"), ("bf16", "fp32")])
def test_bitwise_eager(at_level, hyper, shape, pdtype, mdtype):
    kernel_cases.test_native_kernel_is_bitwise_eager(hyper, shape, pdtype, mdtype)


@pytest.mark.parametrize("hyper", list(kernel_cases.HYPERS))
@pytest.mark.parametrize("shape", kernel_cases.SHAPES, ids=str)
def test_shard_cuts_do_not_change_bits(at_level, hyper, shape):
    kernel_cases.test_shard_boundaries_do_not_change_bits("fused", hyper, shape, "bf16", "bf16")


@pytest.mark.parametrize("flags", list(abi_cases.FLAG_SETTINGS))
@pytest.mark.parametrize("momentum_dtype", list(MOMENTUM_KINDS), ids=str)
@pytest.mark.parametrize("param_dtype", list(PARAM_DTYPES), ids=str)
def test_every_code(at_level, param_dtype, momentum_dtype, flags):
    abi_cases.test_every_code_makes_the_kernel_compute_the_eager_result(param_dtype, momentum_dtype, flags)


@pytest.mark.parametrize("hyper", ["plain", "clip 0.5"])
@pytest.mark.parametrize("shape", [(13, 40), (5, 7, 36)], ids=str)
def test_nonfinite_values(at_level, monkeypatch, shape, hyper):
    kernel_cases.test_nonfinite_values_propagate_alike(monkeypatch, "fused", shape, hyper)


@pytest.mark.parametrize("eps", [1e-45, 0.0])
@pytest.mark.parametrize("mdtype", ["fp32", "none"])
def test_clip_edges(at_level, mdtype, eps):
    kernel_cases.test_clip_edges_bitwise_eager("fused", mdtype, eps)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("bad", [math.inf, math.nan, None])
def test_the_scan(at_level, monkeypatch, dtype, bad):
    kernel_cases.test_first_nonfinite(monkeypatch, dtype, bad, True)


def _subnormal_blocks(dtype):
    """Gradients, momentum and accumulators of subnormal size (nu, its root and the update subnormal or tiny)."""
    gen = torch.Generator().manual_seed(3)
    tiny = torch.finfo(torch.float32).tiny
    params, grads, bufs, accs = [], [], [], []
    for shape in [(9, 21), (45,)]:
        params.append(torch.randn(shape, generator=gen).to(dtype))
        grads.append((torch.randn(shape, generator=gen) * tiny * 2.0 ** -(shape[-1] % 7)).to(dtype))
        bufs.append((torch.randn(shape, generator=gen) * tiny).to(dtype))
        accs.append([torch.rand(n, generator=gen) * tiny for n in shape])
    return params, grads, bufs, accs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("eps", [0.0, 1e-30])
def test_subnormals(at_level, dtype, eps):
    rule = UpdateRule(momentum=0.9, beta=0.5, eps=eps)
    results = []
    for kernel in ("eager", "fused"):
        params, grads, bufs, accs = _subnormal_blocks(dtype)
        maxima = functional.sm3(params, grads, bufs, accs, rule=rule, lr=0.1, **KERNELS[kernel])
        results.append((params, bufs, maxima))
    assert any((m[0] != 0).any() and (m[0].abs() < torch.finfo(torch.float32).tiny).any() for m in results[0][2])
    for a, b in zip(*results):
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True)


# ---------------------------------------------------------------------------------------------- levels compiled only

_NOT_EXECUTABLE = [lv for lv in library.ISA_LEVELS if lv not in LEVELS]


@pytest.mark.skipif(library._compiler() is None, reason="no C++ compiler")
@pytest.mark.parametrize(
    "isa,define",
    [(lv, d) for lv in _NOT_EXECUTABLE for d in ("", "-DSM3_GENERIC_AVX512")]
    or [pytest.param("-", "", marks=pytest.mark.skip("every level runs here"))],
)
def test_a_level_this_cpu_cannot_run_still_compiles(tmp_path, isa, define):
    src = tmp_path / "k.cpp"
    src.write_text(library.source())
    flags = [f for f in library._FLAGS if f != "-shared"] + library._march(isa)
    cmd = [library._compiler(), *flags, *([define] if define else []), "-c", str(src), "-o", str(tmp_path / "k.o")]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    dump = subprocess.run(["objdump", "-d", str(tmp_path / "k.o")], capture_output=True, text=True).stdout
    if shutil.which("objdump"):
        assert "zmm" in dump  # 16-float vectors


# ---------------------------------------------------------------------------------------------- aarch64 under qemu

CROSS = shutil.which("aarch64-linux-gnu-g++")
QEMU = shutil.which("qemu-aarch64")
needs_aarch64 = pytest.mark.skipif(
    CROSS is None or QEMU is None,
    reason="no aarch64 cross compiler or qemu-aarch64 (`make test-aarch64` installs g++-aarch64-linux-gnu and "
    "qemu-user, then runs these tests)",
)


@pytest.fixture(scope="module")
def aarch64_driver(tmp_path_factory):
    out = tmp_path_factory.mktemp("aarch64")
    src = out / "driver.cpp"
    src.write_text(library.source() + DRIVER.read_text())
    exe = out / "sm3_driver"
    flags = [f for f in library._FLAGS if f not in ("-shared", "-fPIC")]
    cmd = [CROSS, *flags, "-march=armv8-a", "-static", str(src), "-o", str(exe)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return exe


def _read(data: memoryview, at: int, like: torch.Tensor) -> tuple[torch.Tensor, int]:
    n = like.numel() * like.element_size()
    raw = torch.frombuffer(bytearray(data[at : at + n]), dtype=torch.uint8)
    return raw.view(like.dtype).view(like.shape), at + n


AARCH64_SHAPES = [(37,), (13, 11), (2, 70), (1,), (3, 4001), (70001,)]


@needs_aarch64
@pytest.mark.parametrize("hyper", list(kernel_cases.HYPERS))
@pytest.mark.parametrize("pdtype,mdtype", [("fp32", "fp32"), ("fp32", "none"), ("bf16", "bf16"), ("bf16", "fp32")])
@pytest.mark.parametrize("poison", [False, True], ids=["finite", "inf/nan"])
def test_aarch64_neon_build_is_bitwise_eager(aarch64_driver, tmp_path, hyper, pdtype, mdtype, poison):
    """The eager kernel writes the inputs and its results; the aarch64 build, run under qemu, must give the
    same bits (NaNs compared as NaNs)."""
    hyper = dict(kernel_cases.HYPERS[hyper])
    lr, scale = hyper.pop("lr"), hyper.pop("grad_scale", None)
    mdt = kernel_cases.MOMENTA[mdtype]
    rule = UpdateRule(momentum=0.9 if mdt is not None else 0.0, **hyper)
    nu_divisor = rule.nu_divisor(3)
    values, flags = step_arguments(rule, lr, nu_divisor, scale)
    blocks = []
    for k, shape in enumerate(AARCH64_SHAPES):
        w, g, m, accs = kernel_cases._problem(shape, kernel_cases.PARAM_DTYPES[pdtype], mdt, seed=k)
        if poison:
            g.view(-1)[min(5, g.numel() - 1)] = math.nan
            g.view(-1)[-1] = math.inf
            accs[-1][min(3, accs[-1].numel() - 1)] = math.nan
        blocks.append((shape, w, g, m, accs))
    header = torch.tensor([len(blocks), flags], dtype=torch.int64).numpy().tobytes()
    payload = [header, torch.tensor(values, dtype=torch.float64).numpy().tobytes()]
    for shape, w, g, m, accs in blocks:
        rows, cols = (1, shape[0]) if len(shape) == 1 else shape
        rowmin = torch.full((1,), math.inf) if len(shape) == 1 else accs[0]
        codes = [rows, cols, PARAM_DTYPES[w.dtype], MOMENTUM_KINDS[None if m is None else m.dtype]]
        payload.append(torch.tensor(codes, dtype=torch.int64).numpy().tobytes())
        for t in (w, g, *([] if m is None else [m]), rowmin, accs[-1]):
            payload.append(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    (tmp_path / "in.bin").write_bytes(b"".join(payload))
    run = subprocess.run(
        [QEMU, str(aarch64_driver), str(tmp_path / "in.bin"), str(tmp_path / "out.bin")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, (run.returncode, run.stderr)
    assert run.stdout.split() == ["aarch64", "4"]  # NEON, 4 floats per vector
    data, at = memoryview((tmp_path / "out.bin").read_bytes()), 0
    for shape, w, g, m, accs in blocks:
        got_w, at = _read(data, at, w)
        got_m = None
        if m is not None:
            got_m, at = _read(data, at, m)
        rows, cols = (1, shape[0]) if len(shape) == 1 else shape
        got_rowmax, at = _read(data, at, torch.empty(rows))
        got_colmax, at = _read(data, at, torch.empty(cols))
        maxima = functional.sm3(
            [w],
            [g],
            [m],
            [accs],
            rule=rule,
            lr=lr,
            nu_divisor=nu_divisor,
            grad_scale=None if scale is None else torch.tensor(scale),
            **KERNELS["eager"],
        )[0]
        expected = [w, *([] if m is None else [m]), *([maxima[0]] if len(shape) == 2 else []), maxima[-1]]
        got = [got_w, *([] if m is None else [got_m]), *([got_rowmax] if len(shape) == 2 else []), got_colmax]
        for x, y in zip(got, expected):
            torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True)
    assert at == len(data)
