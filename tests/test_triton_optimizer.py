"""``SM3(fused=True)`` through the Triton kernel's registry entry equals the eager kernel bitwise.

The optimizer side of the CUDA kernel: the block plan handing its blocks, maxima
buffers and finalizers to :class:`sm3_dist.kernels.cuda.TritonPlan`, the found-inf
flag kept on the device (a non-finite step skipped without the host reading
it), step counts and bias-correction divisors on the device, a GradScaler's
scale. Run under Triton's interpreter on CPU tensors in a subprocess
(tests/triton_optimizer_cases.py); the eager runs are computed here.
"""

from __future__ import annotations

import pytest

pytest.importorskip("triton", reason="Triton is not installed (the gpu and dev extras install it on Linux)")

from tests import triton_optimizer_cases as cases
from tests.common import run_interpreted, same_bits


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory) -> dict:
    return run_interpreted("tests.triton_optimizer_cases", tmp_path_factory.mktemp("triton_optimizer"))


@pytest.mark.parametrize("name", list(cases.CASES))
def test_fused_triton_steps_equal_the_eager_kernel(interpreted, name):
    assert name not in interpreted["errors"], interpreted["errors"].get(name)
    got = interpreted["cases"][name]
    assert got["fused"] == "TritonPlan" and got["other_blocks"] == 0, "the steps did not run through the Triton plan"
    want = cases.train(cases.CASES[name], foreach=False, fused=False)
    for k, (p, q) in enumerate(zip(got["params"], want["params"])):
        assert same_bits(p, q), f"params[{k}] differ"
    assert sorted(got["state"]) == sorted(want["state"])
    for k, entry in want["state"].items():
        for key, value in entry.items():
            assert same_bits(got["state"][k][key], value), (k, key)
    assert got["skipped"] == want["skipped"] == (0 if name == "ignore lets nan through" else 1)
