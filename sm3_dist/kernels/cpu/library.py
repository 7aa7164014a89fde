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

The shared library is cached under ``$SM3_DIST_CACHE`` (default
``~/.cache/sm3_dist``), keyed by the compiled text (prelude and source), the flags, the compiler and the
CPU's feature flags (it is built with ``-march=native``). If it cannot be
built, :func:`load` returns ``None`` and logs why, once.
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
    "META_FIELDS",
    "TILE_ELEMS",
    "check_layout",
    "codes",
    "layout_header",
    "load",
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
)
"""The step's hyperparameters, in order: one double each (C++ ``enum HyperField``: ``H_LR``, ...)."""
ENUMS = {
    "ParamDtype": ("DTYPE_F32", "DTYPE_BF16"),
    "MomentumKind": ("MOMENTUM_NONE", "MOMENTUM_F32", "MOMENTUM_BF16"),
    "ScanDtype": ("SCAN_F32", "SCAN_BF16", "SCAN_F16"),
}
"""The codes a block (``pdtype``, ``mkind``) or a scanned tensor carries: each C++ enum's names, numbered in
order from 0."""
FLAGS = ("FLAG_WD", "FLAG_BETA", "FLAG_EPS", "FLAG_NU_DIV", "FLAG_SCALE")
"""The step's bit flags (weight decay, beta > 0, eps > 0, a bias-correction divisor, a gradient scale): the
i-th is ``1 << i`` (C++ ``enum Flag``)."""


def codes() -> dict[str, int]:
    """Every code of :data:`ENUMS` and :data:`FLAGS` by its C++ name, e.g. ``codes()["FLAG_EPS"] == 4``."""
    numbered = {name: i for names in ENUMS.values() for i, name in enumerate(names)}
    return numbered | {name: 1 << i for i, name in enumerate(FLAGS)}


CODES = codes()
"""The codes Python packs (:func:`codes` at import)."""
ABI_VERSION = 6
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
            "// generated by sm3_dist/_native.py (BLOCK_FIELDS, HYPER_FIELDS, ENUMS, FLAGS): do not edit",
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
    codes than this module's."""
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


_FLAGS = ["-O3", "-fno-fast-math", "-ffp-contract=off", "-fno-math-errno", "-march=native", "-fPIC", "-shared"]
_OPENMP = ["-fopenmp"]

_lock = threading.Lock()
_state: dict[str, object] = {}


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


def _build(cxx: str) -> Path:
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=True).stdout
    text = source()
    key_text = "\n".join([text, " ".join(_FLAGS), version, platform.machine(), _cpu_signature()])
    key = hashlib.sha256(key_text.encode()).hexdigest()[:20]
    cache = _cache_dir()
    target = cache / f"sm3_native_{key}.so"
    if target.exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        src = Path(tmp) / "sm3_native.cpp"
        src.write_text(text)
        out = Path(tmp) / target.name
        errors = []
        for extra in (_OPENMP, []):
            result = subprocess.run([cxx, *_FLAGS, *extra, str(src), "-o", str(out)], capture_output=True, text=True)
            if result.returncode == 0:
                if not extra:
                    logger.warning("sm3_dist: the native SM3 kernel was built without OpenMP (single-threaded)")
                os.replace(out, target)  # atomic: concurrent builders write identical files
                return target
            errors.append(result.stderr.strip()[-2000:])
        raise RuntimeError("compiler failed:\n" + "\n".join(errors))


def load() -> ctypes.CDLL | None:
    """The native kernel library, building it on first use; ``None`` (logged once) when unavailable.

    ``SM3_DIST_NATIVE=0`` disables it (the default kernel on CPU is then the per-tensor loop, and
    ``fused=True`` on CPU an error that says why).
    """
    with _lock:
        if "lib" in _state:
            return _state["lib"]  # type: ignore[return-value]
        lib = None
        if os.environ.get("SM3_DIST_NATIVE", "1") != "0":
            try:
                if platform.system() != "Linux":
                    raise RuntimeError(f"only built on Linux, not {platform.system()}")
                cxx = _compiler()
                if cxx is None:
                    raise RuntimeError("no C++ compiler found (set CXX)")
                lib = ctypes.CDLL(str(_build(cxx)))
                check_layout(lib)
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
            except Exception as exc:  # the default kernel falls back to the per-tensor loop
                lib = None
                message = (
                    f"sm3_dist: native fused SM3 kernel unavailable ({exc}); on CPU the default kernel is the "
                    "per-tensor loop and fused=True is refused"
                )
                logger.warning(message)
                warnings.warn(message, RuntimeWarning, stacklevel=3)
        _state["lib"] = lib
        return lib
