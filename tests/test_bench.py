"""``sm3-dist bench`` on a tiny parameter set: the table has every row and sane numbers (no timing claims)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
import types

import pytest
from sm3_dist.tools.bench import cli as bench_cli
from sm3_dist.tools.bench import step
from sm3_dist.tools.bench.shapes import PRESETS, gpt_shapes

from sm3_dist import cli
from sm3_dist.kernels.cpu import library
from tests.common import run_distributed

EXPECTED = [
    "sm3 eager m=0",
    "sm3 eager m=0.9",
    "sm3 eager m=0.9 bf16-mom",
    "sm3 foreach m=0",
    "sm3 foreach m=0.9",
    "sm3 fused m=0",
    "sm3 fused m=0.9",
    "sm3 fused m=0.9 nonfinite=ignore",
    "sm3 fused m=0.9 bf16-mom",
    "sm3 fused recommended",
    "adam fused",
    "adam foreach",
    "adagrad",
    "pytorch_optimizer sm3 m=0.9",
]
COLUMNS = "| optimizer | ms/step (median) | IQR ms | min ms | vs Adam fused | state MiB | MB moved/step | bound ms"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "bench.json"
    argv = ["bench", "--params", "tiny", "--rounds", "2", "--steps", "1", "--warmup", "1", "--json", str(path)]
    argv += ["--check", "--sync-error"]  # on CPU: nothing to compare, no syncs to count (the columns say "-")
    return argv, path


def test_bench_prints_every_row_with_sane_numbers(tiny_run, capsys, monkeypatch):
    argv, path = tiny_run
    # DeepSpeed's CPU Adam JIT-builds its C++ op at first use (minutes): its row is checked apart, by name
    monkeypatch.setattr(step, "_deepspeed_cpu_adam", lambda lr: [])
    assert cli.main(argv) == 0
    out, err = capsys.readouterr()
    info = library.build_info()
    assert f"CPU: {step.cpu_model()}; native SM3 kernel: ISA {info['isa']}, {info['vector_width']} floats" in out
    assert "round 2/2" in err  # progress goes to stderr
    assert COLUMNS + " | % of bound | launches/step | syncs/step |" in out
    table = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| optimizer")]
    assert [line.split(" | ")[0][2:] for line in table] == EXPECTED
    result = json.loads(path.read_text())
    rows = {r["name"]: r for r in result["rows"]}
    assert list(rows) == EXPECTED
    numel = sum(math.prod(s) for s in gpt_shapes(*PRESETS["tiny"]))
    assert result["parameters"] == numel and result["bandwidth_gb_s"] > 0
    for r in rows.values():
        assert r["samples"] == 2 and len(r["times_ms"]) == 2
        assert r["launches"] is None and r["syncs"] is None and r["sync_error"] is None
        assert 0 < r["median_ms"] < 60_000 and r["iqr_ms"] >= 0
        assert r["bound_ms"] > 0 and r["pct_of_bound"] > 0
    assert rows["adam fused"]["ratio_to_adam_fused"] == pytest.approx(1.0)
    # state: Adam keeps two fp32 tensors per parameter; SM3 without momentum only the sums of dimensions
    assert rows["adam fused"]["state_mib"] * 2**20 == pytest.approx(8 * numel)
    assert rows["adagrad"]["state_mib"] * 2**20 == pytest.approx(4 * numel)
    assert rows["sm3 fused m=0"]["state_mib"] < rows["adagrad"]["state_mib"] / 4
    assert rows["sm3 fused m=0.9 bf16-mom"]["state_mib"] < rows["sm3 fused m=0.9"]["state_mib"]
    # bytes moved: Adam > SM3 with momentum > SM3 with bf16 momentum > SM3 without momentum
    moved = [
        rows[n]["moved_mb"] for n in ("adam fused", "sm3 fused m=0.9", "sm3 fused m=0.9 bf16-mom", "sm3 fused m=0")
    ]
    assert moved == sorted(moved, reverse=True)


def test_bench_only_filter_and_plot(capsys, tmp_path):
    png = tmp_path / "step-time.png"
    argv = ["--params", "8,4,1", "--rounds", "1", "--steps", "1", "--warmup", "0", "--quiet"]
    assert bench_cli.main([*argv, "--only", "adagrad", "adam fused", "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "| adagrad |" in out and "| adam fused |" in out and "| adam foreach |" not in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--params", "huge"], "--params must be one of"),
        (["--params", "64,0,1"], "VOCAB, WIDTH and BLOCKS must be >= 1"),
        (["--rounds", "0"], "--rounds and --steps must be >= 1"),
    ],
)
def test_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        bench_cli.main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_distributed_dispatches_lazily(monkeypatch):
    seen = []
    fake = types.ModuleType("sm3_dist.tools.bench.distributed")
    fake.main = lambda argv: seen.append(argv) or 0
    monkeypatch.setitem(sys.modules, "sm3_dist.tools.bench.distributed", fake)
    assert bench_cli.main(["--distributed", "--world", "2"]) == 0
    assert seen == [["--world", "2"]]


def test_zero_offload_dispatches_lazily(monkeypatch):
    seen = []
    fake = types.ModuleType("sm3_dist.tools.bench.offload")
    fake.main = lambda argv: seen.append(argv) or 0
    monkeypatch.setitem(sys.modules, "sm3_dist.tools.bench.offload", fake)
    assert bench_cli.main(["--zero-offload", "--stage", "3"]) == 0
    assert seen == [["--stage", "3"]]


def test_zero_offload_engines_run_the_named_optimizers():
    """The offload bench as a user runs it: a table of the three engines, DeepSpeed's CPU Adam against SM3."""
    pytest.importorskip("deepspeed")
    import subprocess

    argv = ["bench", "--zero-offload", "--params", "tiny", "--rounds", "2", "--warmup", "1", "--quiet"]
    done = subprocess.run(
        [sys.executable, "-m", "sm3_dist.cli", *argv],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "DS_ACCELERATOR": "cpu"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    table = {line.split("|")[1].strip(): line for line in done.stdout.splitlines() if line.startswith("| ")}
    assert "| DeepSpeedCPUAdam |" in table["deepspeed cpu adam"] and "| 1.00x |" in table["deepspeed cpu adam"]
    for row in ("sm3 m=0.9", "sm3 recommended"):
        cells = [c.strip() for c in table[row].split("|")[1:-1]]
        assert cells[1] == "DeepSpeedSM3" and float(cells[2]) > 0 and cells[3].endswith("x"), cells
    assert f"ZeRO-2 offload, {sum(math.prod(s) for s in gpt_shapes(*PRESETS['tiny'])):,} parameters" in done.stdout


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--stage", "4"], "invalid choice"),
        (["--rounds", "0"], "--rounds must be >= 1"),
        (["--only", "adam"], "invalid choice"),
    ],
)
def test_zero_offload_bad_arguments(argv, message, capsys):
    from sm3_dist.tools.bench import offload

    with pytest.raises(SystemExit) as exc:
        offload.main(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_zero_offload_refuses_another_accelerator_on_cpu(monkeypatch, capsys):
    from sm3_dist.tools.bench import offload

    monkeypatch.setenv("DS_ACCELERATOR", "cuda")
    with pytest.raises(SystemExit):
        offload.main(["--device", "cpu"])
    assert "DS_ACCELERATOR=cuda" in capsys.readouterr().err


def test_gpt_preset_is_about_27m_parameters():
    shapes = gpt_shapes(*PRESETS["gpt"])
    assert 27e6 <= sum(math.prod(s) for s in shapes) <= 28e6
    assert (16384, 512) in shapes and (1536, 512) in shapes and (512, 2048) in shapes


def _fsdp2_world1_worker(rank: int, world_size: int) -> dict:
    import torch

    from sm3_dist import SM3

    shapes = gpt_shapes(*PRESETS["tiny"])
    torch.manual_seed(0)
    params = [torch.randn(s, requires_grad=True) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = step.fsdp2_candidate(0.01, torch.device("cpu")).make(params)
    builds = []
    original = opt._init_group
    opt._init_group = lambda gi, group: builds.append(gi) or original(gi, group)
    ref = SM3(params, lr=0.01, momentum=0.9, fused=True)
    for _ in range(4):
        opt.step()
        ref.step()
    opt.state_dict()  # the last reduction of maxima
    plan = opt._dense[0]
    sharded = list(opt.param_groups[0]["params"])
    return dict(
        builds=len(builds),
        equal=all(torch.equal(s.full_tensor(), p) for s, p in zip(sharded, params)),
        whole=all(b.whole for b in plan.blocks) and len(plan.blocks) == len(params),
        reduced=all(pr.reduced for pr in plan.pieces),
        fused=type(plan.fused).__name__,
        other=len(plan.other_blocks),
    )


def test_fsdp2_world1_row_steps_through_the_block_plan():
    """The bench's FSDP2 row: DTensor parameters on a one-rank mesh, one block per parameter (the local tensor
    itself, maxima to the reducer), one fused plan built once for all steps, equal to plain SM3."""
    (result,) = run_distributed(_fsdp2_world1_worker, 1)
    assert result["builds"] == 1 and result["equal"] and result["whole"] and result["reduced"]
    if result["fused"] != "NoneType":
        assert result["fused"] == "NativePlan" and result["other"] == 0


def test_launch_and_sync_counters_are_cuda_only():
    import torch

    assert step.count_launches(lambda: None, torch.device("cpu")) is None
    assert step.count_syncs(lambda: None, torch.device("cpu")) is None
    assert step.sync_error(lambda: None, torch.device("cpu")) is None


def test_a_deepspeed_cpu_adam_row_where_deepspeed_is_installed():
    names = [c.name for c in step._candidates(1e-3, cpu=True)]
    installed = importlib.util.find_spec("deepspeed") is not None
    assert ("deepspeed cpu adam" in names) == installed
    assert "deepspeed cpu adam" not in [c.name for c in step._candidates(1e-3, cpu=False)]


def test_a_leftover_jit_build_lock_is_named(tmp_path, monkeypatch):
    """A killed JIT build leaves torch's lock file behind and the next build waits on it without end: the
    bench names the file before it builds DeepSpeed's op."""
    from sm3_dist.tools.bench.step import stale_build_lock

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert stale_build_lock("cpu_adam") is None
    build = tmp_path / "cpu_adam"
    build.mkdir(parents=True, exist_ok=True)
    (build / "lock").touch()
    assert stale_build_lock("cpu_adam") == build / "lock"
