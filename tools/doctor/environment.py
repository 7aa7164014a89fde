"""The doctor's environment section: versions, the CPU and its instruction sets, the native kernel's build, and on
CUDA the GPU, its copy bandwidth and the Triton kernel. Every item is one line ending in ``ok`` or a named problem
with its fix."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

__all__ = ["Item", "check_environment", "cpu_isa_flags", "cpu_model"]


@dataclass
class Item:
    name: str
    value: str
    problem: str | None = None
    fix: str | None = None

    @property
    def ok(self) -> bool:
        return self.problem is None

    def line(self) -> str:
        tail = "ok" if self.ok else f"PROBLEM: {self.problem}" + (f" -> fix: {self.fix}" if self.fix else "")
        return f"{self.name}: {self.value} ... {tail}"

    def as_dict(self) -> dict:
        return asdict(self) | {"ok": self.ok}


def _version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split("+")[0].split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def _distribution(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


_OPTIONAL = (
    # distribution, lowest, below, what it is for, the extra that installs it
    ("deepspeed", (0, 19), (0, 20), "the DeepSpeed integration", "deepspeed"),
    ("accelerate", (1, 0), (2, 0), "the accelerate integration", "accelerate"),
    ("transformers", (4, 45), None, "sm3-dist train and the Trainer example", "train"),
)


def _package_items(device: torch.device) -> list[Item]:
    items = []
    py = sys.version.split()[0]
    items.append(
        Item("Python", py)
        if sys.version_info >= (3, 10)
        else Item("Python", py, "sm3-dist needs Python >= 3.10", "use Python 3.10 or newer")
    )
    cuda = torch.version.cuda
    value = f"{torch.__version__} ({'CUDA ' + cuda if cuda else 'CPU build, no CUDA'})"
    tv = _version_tuple(torch.__version__)
    if not (2, 6) <= tv[:2] < (2, 15):
        items.append(Item("torch", value, "outside the supported range 2.6 to 2.14", "pip install 'torch>=2.6,<2.15'"))
    elif device.type == "cuda" and not cuda:
        items.append(Item("torch", value, "a CPU-only build", "install a CUDA build of torch (pytorch.org)"))
    else:
        items.append(Item("torch", value))
    triton = _distribution("triton")
    if triton is not None:
        items.append(Item("triton", triton))
    elif device.type == "cuda":
        items.append(
            Item(
                "triton",
                "not installed",
                "no fused CUDA kernel (SM3 falls back to foreach)",
                "pip install 'sm3-dist[gpu]'",
            )
        )
    else:
        items.append(Item("triton", "not installed (only the CUDA fused kernel uses it)"))
    for name, lowest, below, purpose, extra in _OPTIONAL:
        version = _distribution(name)
        fix = f"pip install 'sm3-dist[{extra}]'"
        if version is None:
            items.append(Item(name, "not installed", f"{purpose} is unavailable", fix))
            continue
        v = _version_tuple(version)[:2]
        if v < lowest or (below is not None and v >= below):
            span = f">= {'.'.join(map(str, lowest))}" + (f", < {'.'.join(map(str, below))}" if below else "")
            items.append(Item(name, version, f"{purpose} is tested with {span}", fix))
        else:
            items.append(Item(name, version))
    return items


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


_ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_bf16", "amx_tile", "asimd", "sve")


def cpu_isa_flags() -> list[str]:
    """The vector instruction sets of this CPU that matter to the kernels (``/proc/cpuinfo`` flags)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            present = set(line.split(":", 1)[1].split())
            return [f for f in _ISA_FLAGS if f in present]
    return []


def _cpu_items() -> list[Item]:
    cores = os.cpu_count()
    value = f"{cpu_model()} ({platform.machine()}, {cores} logical CPUs, torch uses {torch.get_num_threads()} threads)"
    flags = cpu_isa_flags()
    isa = Item("CPU ISA", " ".join(flags) if flags else "unknown (no /proc/cpuinfo flags)")
    if platform.machine() in ("x86_64", "AMD64") and flags and "avx2" not in flags:
        isa.problem = "no AVX2: the native kernel runs 4 floats per vector (SSE4.2)"
        isa.fix = "none needed for correctness; a CPU with AVX2/AVX-512 steps faster"
    return [Item("CPU", value), isa]


def native_item() -> tuple[Item, dict | None]:
    """The native CPU kernel: what it was built for, or why it is unavailable."""
    from sm3_dist.kernels.cpu import library

    info = library.build_info()  # builds the library if need be
    if info is None:
        reason = library.unavailable_reason() or "unknown"
        if os.environ.get("SM3_DIST_NATIVE", "1") == "0":
            fix = "unset SM3_DIST_NATIVE"
        elif "compiler" in reason and "found" in reason:
            fix = "install g++ (or set CXX to a C++ compiler)"
        elif "SM3_DIST_NATIVE_ISA" in reason:
            fix = "set SM3_DIST_NATIVE_ISA to native or a level this CPU runs (x86-64-v2/v3/v4)"
        else:
            fix = (
                "clear ~/.cache/sm3_dist (or $SM3_DIST_CACHE) and run again; report the compiler's error if it persists"
            )
        short = reason.strip().splitlines()[0][:200]
        return Item("native kernel", "unavailable", short, fix), None
    openmp = f"OpenMP, {info.get('max_threads')} threads" if info.get("openmp") else "no OpenMP (one thread)"
    value = (
        f"ISA {info.get('isa')}, vector width {info.get('vector_width')} floats, {openmp}, {info.get('compiler', '?')}"
    )
    item = Item("native kernel", value)
    if not info.get("openmp"):
        item.problem, item.fix = (
            "built without OpenMP: single-threaded",
            "install libgomp (GCC's OpenMP) and clear the cache",
        )
    return item, info


def _cuda_items() -> list[Item]:
    from sm3_dist.tools.bench.step import CopyBandwidth

    from sm3_dist.kernels import registry

    device = torch.device("cuda")
    props = torch.cuda.get_device_properties(device)
    items = [
        Item(
            "GPU",
            f"{props.name}, {props.total_memory / 2**30:.1f} GiB, compute capability {props.major}.{props.minor}, "
            f"{torch.cuda.device_count()} visible",
        )
    ]
    copy = CopyBandwidth(device, mib=256)
    copy.sample(reps=10)
    items.append(Item("GPU copy bandwidth", f"{copy.bytes_per_second / 1e9:.0f} GB/s (read + write, 256 MiB fp32)"))
    del copy
    kernel = registry.fused_kernel("cuda")
    if kernel is None:
        items.append(
            Item(
                "Triton kernel",
                "unavailable",
                "fused=True is refused on CUDA; the default kernel is foreach",
                "pip install 'sm3-dist[gpu]' (triton >= 3.0)",
            )
        )
    else:
        items.append(Item("Triton kernel", "available (the fused CUDA kernel)"))
    return items


def check_environment(device: torch.device) -> tuple[list[Item], dict]:
    """The section's items, and the native kernel's build info (``None`` when unavailable) for the report."""
    items = _package_items(device)
    items += _cpu_items()
    native, info = native_item()
    items.append(native)
    if device.type == "cuda":
        items += _cuda_items()
    return items, {"native_build": info}
