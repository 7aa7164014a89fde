"""The native CPU kernel's interface is defined once, in Python (``sm3_dist/library.py``), and C++ agrees with it.

The block layout, the hyperparameters' order and the codes a block or a step carries (parameter dtype, momentum
kind, scanned dtype, flags) are tables in ``library.py``; the C++ enums are generated from them. These tests fail
when the C++ source numbers a code by hand, when a built library reports other tables than Python's, and when a
code Python packs makes the kernel compute anything but the eager kernel's result.
"""

from __future__ import annotations

import re

import pytest
import torch

from sm3_dist import functional
from sm3_dist.kernels.cpu import library
from sm3_dist.kernels.cpu.native_step import MOMENTUM_KINDS, PARAM_DTYPES
from sm3_dist.kernels.cpu.scan import SCAN_CODES, first_nonfinite
from sm3_dist.kernels.rule import UpdateRule
from tests.common import KERNELS, assert_same, native_library, random_blocks

SOURCE = library._SOURCE_FILE.read_text()
GENERATED = [
    *(name for names in library.ENUMS.values() for name in names),
    *library.FLAGS,
    *(f"H_{name.upper()}" for name in library.HYPER_FIELDS),
    *(f"F_{name.upper()}" for name in library.BLOCK_FIELDS),
    "NFIELDS",
    "NHYPER",
    "ABI_VERSION",
]


# ---------------------------------------------------------------------------------------------- the C++ source


def test_the_cpp_source_defines_no_generated_name():
    """Every enum and constant both sides share comes from the generated prelude, none from the .cpp."""
    assert not re.search(r"^\s*enum\b", SOURCE, re.MULTILINE), "the .cpp declares an enum of its own"
    for name in GENERATED:
        assert not re.search(rf"\b{name}\s*=(?!=)", SOURCE), f"the .cpp defines {name}"
        assert re.search(rf"\b{name}\s*=", library.layout_header()), f"the prelude lacks {name}"


BY_NUMBER = {
    "a parameter dtype": r"\bpdtype\s*[!=]=\s*\d",
    "a momentum kind": r"\bmkind\s*[!=]=\s*\d",
    "a scanned dtype": r"\bkinds\[[^\]]*\]\s*[!=]=\s*\d",
    "a flag": r"\bflags\s*&\s*\d|switch\s*\(\s*flags",
    "a hyperparameter": r"\bhyper\[\s*\d",
    "a block field": r"\bf\[\s*\d",
}


@pytest.mark.parametrize("what", list(BY_NUMBER))
def test_the_cpp_reads_codes_by_name(what):
    assert not re.search(BY_NUMBER[what], SOURCE), f"the .cpp reads {what} by number"


def test_the_cpp_uses_every_flag_and_hyperparameter():
    for name in (*library.FLAGS, *(f"H_{h.upper()}" for h in library.HYPER_FIELDS)):
        assert re.search(rf"\b{name}\b", SOURCE), f"the .cpp never reads {name}"


def test_python_codes_are_the_tables():
    codes = library.codes()
    assert codes == library.CODES
    for names in library.ENUMS.values():
        assert [codes[n] for n in names] == list(range(len(names)))
    assert [codes[n] for n in library.FLAGS] == [1 << i for i in range(len(library.FLAGS))]
    assert sorted(PARAM_DTYPES.values()) == [codes[n] for n in library.ENUMS["ParamDtype"]]
    assert sorted(MOMENTUM_KINDS.values()) == [codes[n] for n in library.ENUMS["MomentumKind"]]
    assert sorted(SCAN_CODES.values()) == [codes[n] for n in library.ENUMS["ScanDtype"]]


# ---------------------------------------------------------------------------------------------- the built library


def test_the_cpp_names_every_block_field():
    assert set(re.findall(r"\bF_[A-Z_]+\b", SOURCE)) == {f"F_{name.upper()}" for name in library.BLOCK_FIELDS}
    assert library.META_FIELDS == len(library.BLOCK_FIELDS) == len(set(library.BLOCK_FIELDS))
    assert all(library.FIELD[name] == i for i, name in enumerate(library.BLOCK_FIELDS))


def test_the_library_reports_pythons_tables():
    """Its ABI version, block layout (field count and names, in order), hyperparameter order and codes."""
    lib = native_library()
    library.check_layout(lib)
    assert lib.sm3_native_abi() == library.ABI_VERSION
    assert lib.sm3_native_nfields() == library.META_FIELDS
    assert lib.sm3_native_field_names().decode().split(",") == list(library.BLOCK_FIELDS)
    assert lib.sm3_native_hyper_names().decode().split(",") == list(library.HYPER_FIELDS)
    reported = dict(item.split("=") for item in lib.sm3_native_codes().decode().split(","))
    assert {name: int(value) for name, value in reported.items()} == library.CODES


def _swapped(names: tuple[str, ...]) -> tuple[str, ...]:
    return (names[1], names[0], *names[2:])


MISMATCHES = {
    # what Python would pack differently from the built library: the _native attributes that say so
    "two block fields swapped": dict(BLOCK_FIELDS=_swapped(library.BLOCK_FIELDS)),
    "a block field fewer": dict(BLOCK_FIELDS=library.BLOCK_FIELDS[:-1], META_FIELDS=library.META_FIELDS - 1),
    "another interface version": dict(ABI_VERSION=library.ABI_VERSION + 1),
    "two flags swapped": dict(FLAGS=_swapped(library.FLAGS)),
    "two momentum kinds swapped": dict(
        ENUMS={**library.ENUMS, "MomentumKind": _swapped(library.ENUMS["MomentumKind"])}
    ),
    "a scanned dtype fewer": dict(ENUMS={**library.ENUMS, "ScanDtype": library.ENUMS["ScanDtype"][:-1]}),
    "two hyperparameters swapped": dict(HYPER_FIELDS=_swapped(library.HYPER_FIELDS)),
}


@pytest.mark.parametrize("mismatch", list(MISMATCHES))
def test_a_library_built_with_another_interface_is_refused(monkeypatch, mismatch):
    lib = native_library()
    for name, value in MISMATCHES[mismatch].items():
        monkeypatch.setattr(library, name, value)
    with pytest.raises(RuntimeError, match="is not this module's"):
        library.check_layout(lib)


# ---------------------------------------------------------------------------------------------- the codes at work

FLAG_SETTINGS = {
    "no flag": dict(eps=0.0),
    "FLAG_WD": dict(eps=0.0, weight_decay=0.01),
    "FLAG_BETA": dict(eps=0.0, beta=0.9),
    "FLAG_EPS": dict(eps=1e-3),
    "FLAG_NU_DIV": dict(eps=0.0, nu_divisor=0.19),
    "FLAG_SCALE": dict(eps=0.0, grad_scale=torch.tensor(8.0)),
    "FLAG_CLIP": dict(eps=0.0, update_clip=0.5),
    "every flag, maximize": dict(
        eps=1e-3, weight_decay=0.01, beta=0.9, nu_divisor=0.19, grad_scale=torch.tensor(8.0), update_clip=0.5
    ),
}


@pytest.mark.parametrize("flags", list(FLAG_SETTINGS))
@pytest.mark.parametrize("momentum_dtype", list(MOMENTUM_KINDS), ids=str)
@pytest.mark.parametrize("param_dtype", list(PARAM_DTYPES), ids=str)
def test_every_code_makes_the_kernel_compute_the_eager_result(param_dtype, momentum_dtype, flags):
    """Each parameter dtype, momentum kind and flag Python packs, through the native kernel: bitwise the
    per-tensor loop's parameters, momentum and maxima."""
    native_library()
    settings = dict(FLAG_SETTINGS[flags])
    step = {k: settings.pop(k) for k in ("nu_divisor", "grad_scale") if k in settings}
    rule = UpdateRule(momentum=0.0 if momentum_dtype is None else 0.9, maximize="maximize" in flags, **settings)
    params, grads, bufs, accs = random_blocks(seed=7, shapes=((37,), (13, 11), (3, 5, 70)))
    params = [p.to(param_dtype) for p in params]
    grads = [g.to(param_dtype) for g in grads]
    bufs = [None if momentum_dtype is None else b.to(momentum_dtype) for b in bufs]
    results = {}
    for kernel in ("eager", "fused"):
        copy = (
            [p.clone() for p in params],
            [g.clone() for g in grads],
            [None if b is None else b.clone() for b in bufs],
            [[a.clone() for a in acc] for acc in accs],
        )
        maxima = functional.sm3(*copy, rule=rule, lr=0.1, **step, **KERNELS[kernel])
        results[kernel] = (copy[0], [b for b in copy[2] if b is not None], maxima)
    assert_same(results["fused"], results["eager"])


@pytest.mark.parametrize("dtype", list(SCAN_CODES), ids=str)
def test_every_scanned_dtype_is_read_as_itself(dtype):
    """A scanned dtype's code read as another dtype would miss (or invent) an inf: the native scan finds each
    dtype's own inf and NaN, and no finite maximum."""
    native_library()
    tensors = [torch.zeros(70_000, dtype=dtype), torch.zeros(5, dtype=dtype)]
    tensors[0][-1] = torch.finfo(dtype).max
    assert first_nonfinite(tensors) is None
    for bad in (float("inf"), float("nan")):
        tensors[1][3] = bad
        assert first_nonfinite(tensors) == 1
        tensors[1][3] = 0.0


# ---------------------------------------------------------------------------------------------- the build it reports


def test_build_info_reports_the_target_it_was_built_for():
    """The loaded library's ISA and vector width come from the C++ (its compiler macros), the rest from the
    build; the ISA is the one ``SM3_DIST_NATIVE_ISA`` (default ``native``) asked for."""
    lib = native_library()
    info = library.build_info()
    assert info == library.build_info(lib)
    assert set(info) >= {"isa", "vector_width", "openmp", "max_threads", "compiler", "flags", "path"}
    assert info["vector_width"] in (1, 4, 8, 16) and info["max_threads"] >= 1
    assert info["path"] == lib._name and isinstance(info["flags"], list) and info["compiler"]
    setting = library.requested_isa()
    if setting == "native":
        assert info["isa"].startswith("native (") and "-march=native" in info["flags"]
    else:
        assert info["isa"] == setting and f"-march={setting}" in info["flags"]
    assert library.unavailable_reason() is None


def test_an_isa_setting_is_part_of_the_cache_key_and_reported(monkeypatch, tmp_path):
    native_library()
    levels = library.executable_isas()
    if not levels:
        pytest.skip("no x86-64 level to pin on this CPU")
    monkeypatch.setenv("SM3_DIST_CACHE", str(tmp_path))
    monkeypatch.setenv("SM3_DIST_NATIVE_ISA", levels[0])
    monkeypatch.setattr(library, "_state", {})
    info = library.build_info()
    assert info["isa"] == levels[0] and f"-march={levels[0]}" in info["flags"]
    monkeypatch.setenv("SM3_DIST_NATIVE_ISA", "native")
    monkeypatch.setattr(library, "_state", {})
    assert library.build_info()["isa"].startswith("native")
    assert len(list(tmp_path.glob("sm3_native_*.so"))) == 2


@pytest.mark.parametrize(
    "env,reason", [({"SM3_DIST_NATIVE": "0"}, "SM3_DIST_NATIVE=0"), ({"SM3_DIST_NATIVE_ISA": "avx9"}, "avx9")]
)
def test_an_unavailable_library_says_why(monkeypatch, env, reason):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(library, "_state", {})
    with pytest.warns(RuntimeWarning) if "SM3_DIST_NATIVE_ISA" in env else _no_warning():
        assert library.build_info() is None
    assert reason in library.unavailable_reason()


def _no_warning():
    import contextlib

    return contextlib.nullcontext()
