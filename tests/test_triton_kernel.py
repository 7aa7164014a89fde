"""The Triton SM3 kernel (sm3_dist.kernels.cuda) under Triton's interpreter, bitwise against the eager kernel.

``TRITON_INTERPRET=1`` must be set before triton is imported, so the kernels run in one subprocess
(``python -m tests.triton_cases``) over the whole table of tests/triton_cases.py, on CPU tensors; this module
computes the eager reference (``single_block`` on whole tensors) from the same inputs and compares.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton", reason="Triton is not installed (the gpu and dev extras install it on Linux)")

from tests import triton_cases as tc
from tests.common import run_interpreted, same_bits

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory) -> dict:
    return run_interpreted("tests.triton_cases", tmp_path_factory.mktemp("triton"))


@pytest.mark.parametrize("name", list(tc.CASES))
def test_step_bitwise_equal_to_eager(interpreted, name):
    assert name not in interpreted["errors"], interpreted["errors"].get(name)
    got = interpreted["cases"][name]
    ref = tc.reference(tc.CASES[name])
    for k, (p, q) in enumerate(zip(got["params"], ref["params"])):
        assert same_bits(p, q), f"params[{k}] {tuple(q.shape)} {q.dtype} differ"
    for k, (m, n) in enumerate(zip(got["buffers"], ref["buffers"])):
        assert (m is None) == (n is None)
        assert n is None or same_bits(m, n), f"momentum_buffers[{k}] differ"
    for k, (a, b) in enumerate(zip(got["accs"], ref["accs"])):
        for d, (x, y) in enumerate(zip(a, b)):
            assert same_bits(x, y), f"accumulators[{k}][{d}] differ (maxima of the step)"
    # finalize left the maxima buffers at +0, ready for the next step's atomic max
    assert all(same_bits(t, torch.zeros_like(t)) for t in got["maxima_now"])


CLIP_CASES = [name for name, case in tc.CASES.items() if case["update_clip"] > 0.0]


@pytest.mark.parametrize("name", CLIP_CASES)
def test_the_clip_cases_bind(name):
    """The clip changes some parameters and leaves others (in the eager reference the kernel is held to): a
    kernel that ignored ``update_clip`` fails test_step_bitwise_equal_to_eager on these cases."""
    clipped = tc.reference(tc.CASES[name])["params"]
    unclipped = tc.reference({**tc.CASES[name], "update_clip": 0.0})["params"]
    changed = [(p != q) & ~(p.isnan() & q.isnan()) for p, q in zip(clipped, unclipped)]
    assert any(c.any() for c in changed) and not all(c.all() for c in changed), name


def test_found_inf_leaves_everything_unchanged(interpreted):
    case = tc.CASES["found_inf set"]
    start = tc.make_inputs(case)
    got = interpreted["cases"]["found_inf set"]
    assert all(same_bits(p, q) for p, q in zip(got["params"], start["params"]))
    assert all(same_bits(m, n) for m, n in zip(got["buffers"], start["buffers"]))
    assert all(same_bits(x, y) for a, b in zip(got["accs"], start["accs"]) for x, y in zip(a, b))
    assert all(same_bits(t, torch.zeros_like(t)) for t in got["maxima_after_first_step"])


def test_flat_range_maxima_combine_to_whole_tensor_maxima(interpreted):
    # after one step, the maxima that the sub-blocks (straddling rows) accumulated into shared buffers are the
    # whole tensor's maxima from the eager kernel
    case = {**tc.CASES["flat ranges straddling rows"], "steps": 1}
    ref = tc.reference(case)
    got = interpreted["cases"]["flat ranges straddling rows"]["maxima_after_first_step"]
    expected = [t for a in ref["accs"] for t in a]
    assert len(got) == len(expected)
    for k, (x, y) in enumerate(zip(got, expected)):
        assert same_bits(x, y), f"maxima {k} differ"


def test_comparison_sees_one_ulp(interpreted):
    got = interpreted["cases"]["momentum 0.9 fp32"]["params"][0].clone()
    ref = tc.reference(tc.CASES["momentum 0.9 fp32"])["params"][0]
    assert same_bits(got, ref)
    got.view(torch.int32).view(-1)[7] += 1
    assert not same_bits(got, ref)


@pytest.mark.parametrize("name", list(tc.NONFINITE_CASES))
def test_nonfinite_flag(interpreted, name):
    case = tc.NONFINITE_CASES[name]
    expected = max(case["start"], 1.0) if case["bad"] else case["start"]
    assert interpreted["nonfinite"][name].tolist() == [expected]


BAD = {
    "no blocks": "no blocks",
    "float64": "float64",
    "not contiguous": "not contiguous",
    "rank 5": "rank 5",
    "fp16 momentum": "momentum_buffers[0]",
    "accumulator length": "accumulators[0][1] is not a 1-D fp32 tensor of length 4",
    "accumulator dtype": "accumulators[0][1] is not a 1-D fp32 tensor",
    "maxima overlap accumulators": "maxima_out[0][0] overlaps an accumulator",
    "step grad shape": "grads[0] must be a contiguous",
    "step grad count": "2 gradients for 1 blocks",
    "step found_inf dtype": "found_inf must be None or a 1-element fp32 tensor",
    "step lr shape": "lr must be a number or a 1-element tensor",
    "nonfinite dtype": "tensors[0] must be a contiguous fp32/bf16/fp16 tensor",
    "finalize lengths": "accumulators[0] and maxima[0] differ in size",
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_is_named(interpreted, name):
    message = interpreted["bad"][name]
    assert message is not None and BAD[name] in message, message


def test_plan_builds_and_holds_its_tensors(interpreted):
    bad = interpreted["bad"]
    assert bad["good"] is None
    assert bad["holds same"] == "True"
    assert bad["holds other param"] == "False"
    assert bad["holds other maxima"] == "False"


def test_prepared_tables_follow_the_tensors(interpreted):
    # the same tensors again (their prepared table reused), then new ones: every call sees the values now there
    repeated = interpreted["repeated"]
    assert repeated["nonfinite flags"] == [0.0, 1.0, 0.0, 1.0]
    assert repeated["finalize acc, maxima"] == [1.0, 0.0, 3.0, 0.0]


def test_device_check_passes_every_case(interpreted):
    # sm3_dist._triton.check, which the GPU run relies on, on CPU under the interpreter (small shapes)
    check = interpreted["check"]
    results = {r["name"]: r for r in check["results"]}
    assert set(check["cases"]) <= set(results)
    assert [name for name in results if name.startswith("nonfinite_ ")] == [
        "nonfinite_ float32",
        "nonfinite_ bfloat16",
        "nonfinite_ float16",
    ]
    for name, r in results.items():
        assert r["ok"], f"{name}: {r.get('error') or r.get('mismatches')}"


CLI = {
    "no mode": ([], 2, "give --check and/or --bench"),
    "bench": (
        ["--bench", "--device", "cpu", "--params", "64,32,1", "--steps", "1", "--rounds", "1"],
        0,
        "| sm3 triton update kernel alone |",
    ),
}


@pytest.mark.parametrize("name", list(CLI))
def test_module_command_line(name):
    args, code, text = CLI[name]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, "-m", "sm3_dist._triton", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == code, proc.stderr[-4000:]
    assert text in proc.stdout + proc.stderr
