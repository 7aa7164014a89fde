"""A one-pass C++ kernel for the fused SM3 step on CPU, built with the system C++ compiler at first use.

Per dense block, viewed as ``rows x cols`` (the last dimension against the
others), one pass over memory reads ``w``, ``g`` and ``m`` once and writes
``w`` and ``m`` once, computing ``nu``, the row maxima, the column maxima
(per tile, combined afterwards by max) and the update on the way. The tiles of
all blocks of a step are cut into one contiguous range per OpenMP thread (long
streams, prefetched 1 KiB ahead), in one parallel region.

Every elementwise step is one correctly rounded IEEE operation in the same
order as :func:`sm3_dist.kernels.math.single_block` (compiled with
``-ffp-contract=off -fno-fast-math``: no fused multiply-add, no approximate
reciprocal square root), and reductions are only NaN-propagating min/max, so
the results are bitwise those of the eager kernel, wherever a block is cut.

The C++ source is ``sm3_native.cpp`` (package data). Everything both sides must
agree on is defined once, here: the per-block argument layout
(:data:`BLOCK_FIELDS`), the order of the step's hyperparameters
(:data:`HYPER_FIELDS`) and the codes a block or a step carries
(:data:`ENUMS`: parameter dtype, momentum kind, scanned dtype; :data:`FLAGS`).
:func:`layout_header` generates the C++ enums from them, prepended to the
source at build time, so the C++ reads them only by name; the library reports
what it was built with, checked at load by :func:`check_layout`.

The kernel is one generic body over a vector of ``W`` floats (GCC vector extensions): ``W`` is 16 with
AVX-512, 8 with AVX2, 4 with SSE4.2 or Arm NEON; the instruction set is the one the library is compiled for.

**ISA level.** ``SM3_DIST_NATIVE_ISA`` selects the ``-march=`` the library is built with:

- ``native`` (the default): this machine's CPU (``-march=native``);
- ``x86-64-v2`` (SSE4.2, 4 floats per vector), ``x86-64-v3`` (AVX2 and FMA, 8 floats),
  ``x86-64-v4`` (AVX-512, 16 floats): a fixed x86-64 level, for example to run a lower level's code on a
  newer CPU, or to build one library for a fleet of mixed machines.

FMA contraction is off at every level (``-ffp-contract=off``), so every level computes bitwise the same
results. :func:`build_info` says what the loaded library was built for (ISA, vector width, OpenMP, threads,
compiler, flags, path); :func:`unavailable_reason` why there is none. :func:`load_isa` builds and opens the
library at one level as a separate handle (the default library is untouched), and :func:`executable_isas`
lists the levels this CPU can run (read from its ``/proc/cpuinfo`` flags).

**Threads.** The step and the scan run on ``torch.get_num_threads()`` OpenMP threads (set it with
``torch.set_num_threads`` or ``OMP_NUM_THREADS``), as DeepSpeed's CPU Adam does.

The shared library is cached under ``$SM3_DIST_CACHE`` (default
``~/.cache/sm3_dist``), keyed by the compiled text (prelude and source), the flags (the ISA level among them),
the compiler and the CPU's feature flags. If it cannot be built, :func:`load` returns ``None`` and logs why,
once (:func:`unavailable_reason` returns it).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

__all__ = [
    "ABI_VERSION",
    "BLOCK_FIELDS",
    "CODES",
    "ENUMS",
    "FIELD",
    "FLAGS",
    "HYPER_FIELDS",
    "ISA_LEVELS",
    "ISA_SETTINGS",
    "META_FIELDS",
    "TILE_ELEMS",
    "build_info",
    "check_layout",
    "codes",
    "executable_isas",
    "layout_header",
    "load",
    "load_isa",
    "requested_isa",
    "unavailable_reason",
]

logger = logging.getLogger(__name__)

BLOCK_FIELDS = ("w", "g", "m", "rowmin", "colacc", "rowmax", "colmax", "rows", "cols", "pdtype", "mkind", "keep_max")
"""The kernel's per-block arguments, in order: one int64 each. The w, g, m, rowmin, colacc, rowmax, colmax
pointers; rows; cols; param dtype; momentum kind; and whether rowmax/colmax keep the max of their old values and
the new maxima (else they are overwritten). The only definition of the layout: the C++ side's ``enum Field``
is generated from it (:func:`layout_header`)."""
FIELD = {name: index for index, name in enumerate(BLOCK_FIELDS)}
"""A field's index within a block's row of the argument array (``meta[FIELD["g"]::META_FIELDS]``)."""
META_FIELDS = len(BLOCK_FIELDS)
HYPER_FIELDS = (
    "lr",
    "momentum",
    "one_minus_momentum",
    "beta",
    "one_minus_beta",
    "eps",
    "weight_decay",
    "sign",
    "nu_divisor",
    "grad_scale",
    "update_clip",
)
"""The step's hyperparameters, in order: one double each (C++ ``enum HyperField``: ``H_LR``, ...)."""
ENUMS = {
    "ParamDtype": ("DTYPE_F32", "DTYPE_BF16"),
    "MomentumKind": ("MOMENTUM_NONE", "MOMENTUM_F32", "MOMENTUM_BF16"),
    "ScanDtype": ("SCAN_F32", "SCAN_BF16", "SCAN_F16"),
}
"""The codes a block (``pdtype``, ``mkind``) or a scanned tensor carries: each C++ enum's names, numbered in
order from 0."""
FLAGS = ("FLAG_WD", "FLAG_BETA", "FLAG_EPS", "FLAG_NU_DIV", "FLAG_SCALE", "FLAG_CLIP")
"""The step's bit flags (weight decay, beta > 0, eps > 0, a bias-correction divisor, a gradient scale, an
update clip > 0): the i-th is ``1 << i`` (C++ ``enum Flag``)."""


def codes() -> dict[str, int]:
    """Every code of :data:`ENUMS` and :data:`FLAGS` by its C++ name, e.g. ``codes()["FLAG_EPS"] == 4``."""
    numbered = {name: i for names in ENUMS.values() for i, name in enumerate(names)}
    return numbered | {name: 1 << i for i, name in enumerate(FLAGS)}


CODES = codes()
"""The codes Python packs (:func:`codes` at import)."""
ABI_VERSION = 8
"""The version of the library's C interface (bump on any change of an exported signature)."""

TILE_ELEMS = 1 << 16
"""Elements per tile: the unit in which a step's (and a scan's) work is split among threads."""

_SOURCE_FILE = Path(__file__).with_name("sm3_native.cpp")


def _code_names() -> str:
    return ",".join(f"{name}={value}" for name, value in codes().items())


def layout_header() -> str:
    """The C++ prelude generated from :data:`BLOCK_FIELDS`, :data:`HYPER_FIELDS`, :data:`ENUMS`, :data:`FLAGS`
    and :data:`ABI_VERSION`, prepended to the source."""
    fields = ", ".join(f"F_{name.upper()} = {index}" for index, name in enumerate(BLOCK_FIELDS))
    hyper = ", ".join(f"H_{name.upper()} = {index}" for index, name in enumerate(HYPER_FIELDS))
    enums = [f"enum Field : int {{ {fields}, NFIELDS = {META_FIELDS} }};"]
    enums.append(f"enum HyperField : int {{ {hyper}, NHYPER = {len(HYPER_FIELDS)} }};")
    for enum, names in ENUMS.items():
        enums.append(f"enum {enum} : int64_t {{ {', '.join(f'{name} = {i}' for i, name in enumerate(names))} }};")
    enums.append(f"enum Flag : int64_t {{ {', '.join(f'{name} = {1 << i}' for i, name in enumerate(FLAGS))} }};")
    return "\n".join(
        [
            "// generated by sm3_dist/kernels/cpu/library.py (BLOCK_FIELDS, HYPER_FIELDS, ENUMS, FLAGS): do not edit",
            "#include <cstdint>",
            *enums,
            f"constexpr int ABI_VERSION = {ABI_VERSION};",
            f'constexpr const char* FIELD_NAMES = "{",".join(BLOCK_FIELDS)}";',
            f'constexpr const char* HYPER_NAMES = "{",".join(HYPER_FIELDS)}";',
            f'constexpr const char* CODE_NAMES = "{_code_names()}";',
            "",
        ]
    )


def source() -> str:
    """The C++ text that is compiled: the generated layout prelude, then ``sm3_native.cpp``."""
    return layout_header() + _SOURCE_FILE.read_text()


def check_layout(lib: ctypes.CDLL) -> None:
    """Raise when the loaded library was built for another interface, block layout, hyperparameter order or
    codes than this module's, or does not report its ISA and vector width."""
    try:
        for query in (lib.sm3_native_field_names, lib.sm3_native_hyper_names, lib.sm3_native_codes):
            query.restype = ctypes.c_char_p
        built = (
            lib.sm3_native_abi(),
            lib.sm3_native_nfields(),
            lib.sm3_native_field_names().decode(),
            lib.sm3_native_hyper_names().decode(),
            lib.sm3_native_codes().decode(),
        )
    except AttributeError:  # an older library, without the layout queries
        built = (lib.sm3_native_abi(), None, "unknown", "unknown", "unknown")
    expected = (ABI_VERSION, META_FIELDS, ",".join(BLOCK_FIELDS), ",".join(HYPER_FIELDS), _code_names())
    if built != expected:
        raise RuntimeError(
            f"the library's interface (ABI {built[0]}, {built[1]} fields: {built[2]}; hyperparameters: {built[3]}; "
            f"codes: {built[4]}) is not this module's (ABI {expected[0]}, {expected[1]} fields: {expected[2]}; "
            f"hyperparameters: {expected[3]}; codes: {expected[4]}); clear {_cache_dir()} to rebuild it"
        )
    isa, width, _ = _reported_target(lib)
    if not isa or width not in (1, 4, 8, 16):
        raise RuntimeError(
            f"the library reports ISA {isa!r} and vector width {width}, which is not this module's; clear "
            f"{_cache_dir()} to rebuild it"
        )


def _reported_target(lib: ctypes.CDLL) -> tuple[str, int, bool]:
    """The ISA name, vector width (floats) and OpenMP the library says it was compiled with."""
    try:
        lib.sm3_native_isa.restype = ctypes.c_char_p
        return lib.sm3_native_isa().decode(), int(lib.sm3_native_vector_width()), bool(lib.sm3_native_openmp())
    except AttributeError:  # an older library, without the target queries
        return "", 0, False


ISA_LEVELS = ("x86-64-v2", "x86-64-v3", "x86-64-v4")
"""The x86-64 levels ``SM3_DIST_NATIVE_ISA`` may pin (``-march=<level>``), lowest first."""
ISA_SETTINGS = (*ISA_LEVELS, "native")
"""Every value ``SM3_DIST_NATIVE_ISA`` takes; ``native`` (``-march=native``) is the default."""
_ISA_CPU_FLAGS = {
    "x86-64-v2": {"cx16", "lahf_lm", "popcnt", "sse4_1", "sse4_2", "ssse3"},
    "x86-64-v3": {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"},
    "x86-64-v4": {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"},
}
"""The /proc/cpuinfo flags each level adds to the one below (the x86-64 psABI's micro-architecture levels)."""
ISA_VECTOR_WIDTH = {"x86-64-v2": 4, "x86-64-v3": 8, "x86-64-v4": 16, "aarch64": 4}
"""Floats per vector the kernel runs at each ISA it names."""


def requested_isa() -> str:
    """The ISA level ``SM3_DIST_NATIVE_ISA`` asks for (``native`` when unset); a ValueError for any other value
    than :data:`ISA_SETTINGS`."""
    isa = os.environ.get("SM3_DIST_NATIVE_ISA", "").strip() or "native"
    if isa not in ISA_SETTINGS:
        raise ValueError(f"SM3_DIST_NATIVE_ISA={isa!r}: expected one of {', '.join(ISA_SETTINGS)}")
    return isa


def _cpu_flags() -> set[str]:
    line = _cpu_signature()
    return set(line.split(":", 1)[1].split()) if ":" in line else set()


def executable_isas() -> list[str]:
    """The x86-64 levels of :data:`ISA_LEVELS` this CPU can execute (its ``/proc/cpuinfo`` flags), lowest first;
    empty on other architectures."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return []
    flags, needed, levels = _cpu_flags(), set(), []
    for level in ISA_LEVELS:
        needed |= _ISA_CPU_FLAGS[level]
        if not needed <= flags:
            break
        levels.append(level)
    return levels


_FLAGS = ["-O3", "-fno-fast-math", "-ffp-contract=off", "-fno-math-errno", "-fPIC", "-shared"]
_OPENMP = ["-fopenmp"]

_lock = threading.Lock()
_state: dict[str, object] = {}
_INFO: dict[str, dict] = {}  # the build of each opened library, by its path


def _march(isa: str) -> list[str]:
    return ["-march=native"] if isa == "native" else [f"-march={isa}", "-mtune=generic"]


def _cpu_signature() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return line
    return platform.processor()


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")


def _cache_dir() -> Path:
    root = os.environ.get("SM3_DIST_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "sm3_dist"


def _build(cxx: str, isa: str = "native") -> tuple[Path, list[str], str]:
    """The library built at ``isa`` (cached): its path, the flags it was built with, the compiler's version."""
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=True).stdout
    text = source()
    flags = [*_FLAGS, *_march(isa)]
    key_text = "\n".join([text, " ".join(flags), version, platform.machine(), _cpu_signature()])
    key = hashlib.sha256(key_text.encode()).hexdigest()[:20]
    cache = _cache_dir()
    compiler = version.splitlines()[0] if version else cxx
    for extra in (_OPENMP, []):
        target = cache / f"sm3_native_{key}{'' if extra else '_serial'}.so"
        if target.exists():
            return target, [*flags, *extra], compiler
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        src = Path(tmp) / "sm3_native.cpp"
        src.write_text(text)
        errors = []
        for extra in (_OPENMP, []):
            target = cache / f"sm3_native_{key}{'' if extra else '_serial'}.so"
            out = Path(tmp) / target.name
            result = subprocess.run([cxx, *flags, *extra, str(src), "-o", str(out)], capture_output=True, text=True)
            if result.returncode == 0:
                if not extra:
                    logger.warning("sm3_dist: the native SM3 kernel was built without OpenMP (single-threaded)")
                os.replace(out, target)  # atomic: concurrent builders write identical files
                return target, [*flags, *extra], compiler
            errors.append(result.stderr.strip()[-2000:])
        raise RuntimeError("compiler failed:\n" + "\n".join(errors))


def _open(isa: str) -> ctypes.CDLL:
    """Build (or find in the cache) and open the library at ``isa``; raise why not."""
    if platform.system() != "Linux":
        raise RuntimeError(f"only built on Linux, not {platform.system()}")
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set CXX)")
    path, flags, compiler = _build(cxx, isa)
    lib = ctypes.CDLL(str(path))
    check_layout(lib)
    reported, width, openmp = _reported_target(lib)
    if isa != "native" and reported != isa:
        raise RuntimeError(f"built with -march={isa}, the library reports ISA {reported!r}")
    lib.sm3_native_first_nonfinite.restype = ctypes.c_int64
    lib.sm3_native_first_nonfinite.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3
    lib.sm3_native_step.restype = ctypes.c_int
    lib.sm3_native_step.argtypes = [
        ctypes.c_void_p,
        ctypes.c_int64,
        ctypes.c_void_p,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_int64,
    ]
    _INFO[str(path)] = {
        "isa": reported if isa != "native" else f"native ({reported})",
        "vector_width": width,
        "openmp": openmp,
        "setting": isa,
        "compiler": compiler,
        "compiler_path": cxx,
        "flags": flags,
        "path": str(path),
        "abi": ABI_VERSION,
    }
    return lib


def load_isa(isa: str) -> ctypes.CDLL:
    """The library built for one ISA level of :data:`ISA_SETTINGS`, opened as a handle of its own (cached per
    level; the default library of :func:`load` is untouched). Raises when it cannot be built or opened; a
    level this CPU cannot execute (:func:`executable_isas`) builds, but must not be called."""
    if isa not in ISA_SETTINGS:
        raise ValueError(f"ISA {isa!r}: expected one of {', '.join(ISA_SETTINGS)}")
    with _lock:
        handles = _state.setdefault("handles", {})
        if isa not in handles:  # type: ignore[operator]
            handles[isa] = _open(isa)  # type: ignore[index]
        return handles[isa]  # type: ignore[index]


def build_info(lib: ctypes.CDLL | None = None) -> dict | None:
    """What the native library was built for: ``isa`` (``"x86-64-v3"``, ``"native (x86-64-v4)"``,
    ``"native (aarch64)"``, ...), ``vector_width`` (floats per vector the kernel runs; 1 is scalar),
    ``openmp``, ``max_threads`` (the threads a step runs on: ``torch.get_num_threads()``, 1 without OpenMP),
    ``compiler``, ``flags``, ``path`` (and ``setting``, ``compiler_path``, ``abi``). Of ``lib`` (a handle of
    :func:`load_isa`), else of the default library (built now if need be); ``None`` when that is unavailable
    (:func:`unavailable_reason` says why)."""
    lib = load() if lib is None else lib
    if lib is None:
        return None
    info = dict(_INFO[lib._name])
    if info["openmp"]:
        import torch

        info["max_threads"] = torch.get_num_threads()
    else:
        info["max_threads"] = 1
    return info


def unavailable_reason() -> str | None:
    """Why the native library is unavailable (the default :func:`load` tried, building it if need be), ``None``
    when it loads."""
    return None if load() is not None else str(_state.get("reason", "unknown"))


def load() -> ctypes.CDLL | None:
    """The native kernel library, building it on first use at ``SM3_DIST_NATIVE_ISA`` (default ``native``);
    ``None`` (logged once; :func:`unavailable_reason` says why) when unavailable.

    ``SM3_DIST_NATIVE=0`` disables it (the default kernel on CPU is then the per-tensor loop, and
    ``fused=True`` on CPU an error that says why).
    """
    with _lock:
        if "lib" in _state:
            return _state["lib"]  # type: ignore[return-value]
        lib = None
        if os.environ.get("SM3_DIST_NATIVE", "1") == "0":
            _state["reason"] = "disabled by SM3_DIST_NATIVE=0"
        else:
            try:
                lib = _open(requested_isa())
            except Exception as exc:  # the default kernel falls back to the per-tensor loop
                lib = None
                _state["reason"] = str(exc)
                message = (
                    f"sm3_dist: native fused SM3 kernel unavailable ({exc}); on CPU the default kernel is the "
                    "per-tensor loop and fused=True is refused"
                )
                logger.warning(message)
                warnings.warn(message, RuntimeWarning, stacklevel=3)
        _state["lib"] = lib
        return lib
