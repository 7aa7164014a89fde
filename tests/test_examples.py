"""Every script in ``examples/`` (README, "Your own scripts") runs as README says, on 2 CPU processes.

Each example checks its own result (per-dimension state, a falling loss, the
optimizer that steps) and ends by printing a line starting with ``ok:``; a test
starts it with the launcher README gives (``torchrun``; ``ACCELERATE_USE_CPU=1``
for accelerate's DDP; ``DS_ACCELERATOR=cpu`` for DeepSpeed) and checks the exit
status and that line (the DeepSpeed script at each of the stages README names,
1, 2 and 3; that path against single-process SM3 is tested in ``test_user_paths.py``). accelerate's FSDP2 plugin does not shard on
CPU: that example runs where a GPU is present.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
DS = {"DS_ACCELERATOR": "cpu"}

EXAMPLES = {
    # name: (command after the interpreter or launcher, extra environment, needs)
    "plain_pytorch": ([sys.executable, "examples/plain_pytorch.py"], {}, ()),
    "ddp_sharded": ([*TORCHRUN, "examples/ddp_sharded.py"], {}, ()),
    "fsdp2": ([*TORCHRUN, "examples/fsdp2.py"], {}, ()),
    **{
        f"deepspeed_initialize-zero{stage}": (
            [*TORCHRUN, "examples/deepspeed_initialize.py", "--stage", str(stage)],
            DS,
            ("deepspeed",),
        )
        for stage in (1, 2, 3)  # README: --stage 1|2|3
    },
    "accelerate_ddp": ([*TORCHRUN, "examples/accelerate_ddp.py"], {"ACCELERATE_USE_CPU": "1"}, ("accelerate",)),
    "accelerate_ddp-sharded": (
        [*TORCHRUN, "examples/accelerate_ddp.py", "--sharded"],
        {"ACCELERATE_USE_CPU": "1"},
        ("accelerate",),
    ),
    "accelerate_deepspeed": ([*TORCHRUN, "examples/accelerate_deepspeed.py"], DS, ("accelerate", "deepspeed")),
    "hf_trainer-config": (
        [*TORCHRUN, "examples/hf_trainer.py", "--route", "config"],
        DS,
        ("transformers", "deepspeed"),
    ),
    "hf_trainer-cls": ([*TORCHRUN, "examples/hf_trainer.py", "--route", "cls"], DS, ("transformers", "deepspeed")),
}


def _run(command: list[str], env: dict, tmp_path) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **env, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    if "hf_trainer" in " ".join(command):
        command = [*command, "--out", str(tmp_path / "out")]
    return subprocess.run(command, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(EXAMPLES), ids=list(EXAMPLES))
def test_example_runs(name, tmp_path):
    command, env, needs = EXAMPLES[name]
    for module in needs:
        pytest.importorskip(module)
    done = _run(command, env, tmp_path)
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    assert any(line.startswith("ok:") for line in done.stdout.splitlines()), done.stdout[-3000:]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="accelerate's FSDP2 plugin shards on GPUs only")
def test_accelerate_fsdp2_example_on_gpus(tmp_path):
    pytest.importorskip("accelerate")
    processes = str(min(2, torch.cuda.device_count()))
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", processes, "--use_fsdp"]
    done = _run([*launch, "--fsdp_version", "2", "examples/accelerate_fsdp2.py"], {}, tmp_path)
    assert done.returncode == 0, done.stderr[-5000:]
    assert any(line.startswith("ok:") for line in done.stdout.splitlines())
