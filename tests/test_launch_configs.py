"""The configs in ``launch/`` that test_launch.py does not run end to end, ``--compare``, DeepSpeed resume.

Each CPU-capable accelerate config is started for a few steps with 2 CPU
processes (gloo, ``DS_ACCELERATOR=cpu``); the GPU-only one (``fsdp2.yaml``) is
refused on CPU (tested in test_launch.py) and run by a ``gpu``-marked test there.
"""

from __future__ import annotations

import pytest
from sm3_dist.launch.defaults import default_lr

from tests.test_launch import LAUNCH, SMALL, SMALL_ANY_LR, _accelerate, _assert_trained, _losses, _sm3_dist


@pytest.mark.slow
def test_deepspeed_resumes_exactly(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    common = [*SMALL, "--setup", "deepspeed", "--steps", "4", "--eval-every", "0"]
    _sm3_dist(*common, "--out", str(first), "--checkpoint-every", "2")
    _sm3_dist(*common, "--out", str(second), "--resume", str(first / "checkpoints" / "step_0000002"))
    a, b = _losses(first), _losses(second)
    assert sorted(b) == [3, 4] and all(a[s] == b[s] for s in b), (a, b)


CPU_SMOKE = ["ddp_cpu.yaml", "deepspeed_zero1.yaml", "deepspeed_zero3.yaml", "deepspeed_zero2_offload.yaml"]


@pytest.mark.slow
@pytest.mark.parametrize("name", CPU_SMOKE)
def test_accelerate_config_runs_steps_on_cpu(name, tmp_path):
    _accelerate(LAUNCH / "accelerate" / name, *SMALL, "--steps", "3", "--eval-every", "0", "--out", str(tmp_path))
    _assert_trained(tmp_path, 3, png=False)


@pytest.mark.slow
def test_compare_writes_one_png_with_both_curves(tmp_path):
    proc = _sm3_dist(*SMALL_ANY_LR, "--no-plot", "--compare", "sm3,adamw", "--steps", "3", "--eval-every", "0", "--nproc", "1",
                     "--out", str(tmp_path))  # fmt: skip
    for name in ("sm3", "adamw"):
        assert sorted(_losses(tmp_path / name)) == [1, 2, 3]
    assert (tmp_path / "compare.png").read_bytes()[:4] == b"\x89PNG"
    for name in ("sm3", "adamw"):  # each at its own default rate (launch/defaults.py)
        assert f"{name} (lr {default_lr(name, 'tiny'):g})" in proc.stdout, proc.stdout
