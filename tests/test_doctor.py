"""``sm3-dist doctor``: on this CPU it exits 0 and names the native kernel's ISA, vector width and a passing
bitwise check; a planted wrong kernel makes it exit 1 naming the failure; ``--device cuda`` without CUDA exits 2
with one line; ``--full --device cpu`` writes report.md/report.json naming every stage within its budget; the
targets are evaluated from stage outputs; docs/gpu-report.md renders from a report; the offline-GPU wheels
install into a fresh venv with ``--no-index`` (slow)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from sm3_dist.tools.doctor import cli as doctor_cli
from sm3_dist.tools.doctor import full, report

from sm3_dist import cli
from sm3_dist.kernels import registry
from sm3_dist.kernels.math import single_block

ROOT = Path(__file__).resolve().parent.parent


def _run(args: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, "-m", "sm3_dist.cli", "doctor", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_doctor_on_this_cpu_exits_0_and_names_the_native_build(tmp_path):
    # its run time is measured with `time sm3-dist doctor`, not asserted here (tests share the machine's cores)
    proc = _run(["--device", "cpu", "--json", str(tmp_path / "doctor.json")], tmp_path, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    native = next(line for line in out.splitlines() if line.strip().startswith("native kernel:"))
    assert "ISA " in native and "vector width " in native and native.endswith("ok"), native
    bitwise = next(line for line in out.splitlines() if "bitwise check:" in line)
    assert "fused (native C++)" in bitwise and bitwise.endswith("ok"), bitwise
    for section in ("== environment", "== correctness", "== speed"):
        assert section in out
    assert "| adam fused |" in out and "% of bound" in out
    result = json.loads((tmp_path / "doctor.json").read_text())
    assert result["ok"] and result["native_build"]["vector_width"] in (4, 8, 16)
    assert {r["case"] for r in result["correctness"]["results"]} >= {
        "dense",
        "dimension shard",
        "flat range, straddling rows",
        "bf16",
        "beta + bias correction",
        "found_inf",
    }


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_device_cuda_without_cuda_exits_2_with_one_line(tmp_path):
    proc = _run(["--device", "cuda"], tmp_path, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "no CUDA device" in lines[0], proc.stderr


class _NudgedPlan:
    """A wrong fused kernel: the per-tensor math with the learning rate off by one part in 10^6."""

    def __init__(self, params, momentum, accumulators, maxima_out):
        self.params, self.momentum, self.accumulators, self.maxima = params, momentum, accumulators, maxima_out

    def holds(self, *args) -> bool:
        return False

    def step(self, grads, rule, *, lr, nu_divisor=None, found_inf=None, grad_scale=None):
        for p, g, m, accs, outs in zip(self.params, grads, self.momentum, self.accumulators, self.maxima):
            maxima = single_block(p, g, m, accs, rule, lr * (1 + 1e-6), nu_divisor, grad_scale)
            for o, x in zip(outs, maxima):
                torch.maximum(o, x.reshape(o.shape), out=o)


def test_a_planted_wrong_kernel_fails_the_doctor(tmp_path, capsys):
    original = registry._FUSED["cpu"]
    planted = registry.FusedKernel(
        device_type="cpu",
        available=lambda: True,
        build=_NudgedPlan,
        param_dtypes=frozenset({torch.float32, torch.bfloat16}),
    )
    registry.register_fused_kernel("cpu", lambda: planted)
    try:
        status = cli.main(
            ["doctor", "--device", "cpu", "--sections", "correctness", "--json", str(tmp_path / "d.json")]
        )
    finally:
        registry.register_fused_kernel("cpu", original)
    out = capsys.readouterr().out
    assert status == 1
    assert "FAIL fused (native C++): differs from the eager kernel in param" in out
    assert "doctor: FAILED" in out
    result = json.loads((tmp_path / "d.json").read_text())
    failed = {(r["case"], r["kernel"]) for r in result["correctness"]["results"] if not r["ok"]}
    assert ("dense", "fused (native C++)") in failed
    assert not any(kernel in ("single", "foreach") for _, kernel in failed)


def test_full_on_cpu_writes_the_report_within_its_budget(tmp_path, capsys):
    out = tmp_path / "report"
    budget = 40.0
    started = time.monotonic()
    status = doctor_cli.main(
        ["--device", "cpu", "--full", "--sections", "none", "--out", str(out), "--budget", str(budget)]
    )
    elapsed = time.monotonic() - started
    # the budget stops the run: a run that ignored it would take several times as long (bench and two trainings)
    assert elapsed < budget + 60, f"--full took {elapsed:.0f} s with a {budget:.0f} s budget"
    assert status in (0, 1)
    md = (out / "report.md").read_text()
    data = json.loads((out / "report.json").read_text())
    names = [s["name"] for s in data["stages"]]
    assert names == ["bench", "graph", "train-sm3", "train-adamw", "memory", "tests"]
    for name in names:
        assert f"| {name} |" in md
    assert "## Targets" in md and "## Stages" in md and "Not reached or not finished:" in md
    by = {s["name"]: s for s in data["stages"]}
    for name in ("graph", "memory", "tests"):
        assert by[name]["status"] == "not applicable"
    assert by["bench"]["status"] == "ok", (out / "logs" / "bench.log").read_text()[-2000:]
    assert Path(by["bench"]["log"]).is_file() and (out / "bench.json").is_file()
    ratios = [t for t in by["bench"]["targets"] if "Adam(fused=True)" in t["name"] and t["limit"] == 0.80]
    assert ratios and isinstance(ratios[0]["value"], float) and ratios[0]["result"] != "not measured"


def _row(name, ratio, pct, launches, syncs, error="ok"):
    return dict(
        name=name,
        median_ms=1.0,
        ratio_to_adam_fused=ratio,
        pct_of_bound=pct,
        launches=launches,
        syncs=syncs,
        sync_error=error,
    )


def test_targets_are_met_or_missed_by_how_much(tmp_path):
    rows = [
        _row(full.IGNORE_ROW, 0.75, 82.0, 5, 0),
        _row(full.SKIP_ROW, 1.00, 65.0, 6, 0, "error: synchronizing"),
        _row(full.FSDP2_ROW, 1.1, 60.0, 9, 0),
        _row("adam fused", 1.0, 80.0, 1, 0, None),
    ]
    (tmp_path / "bench.json").write_text(json.dumps({"device": "cuda", "rows": rows}))
    stage = full.Stage("bench", "", ["x"], 1, status="ok")
    got = {t.name: t for t in full.targets_of(stage, tmp_path)}
    assert got['SM3(fused=True) "ignore" / Adam(fused=True)'].result == "met"
    assert got['SM3(fused=True) "skip" / Adam(fused=True)'].result == "missed by 0.05x"
    assert got['SM3(fused=True) "skip": % of the bandwidth bound'].result == "missed by 5 points"
    assert got['launches per step (one param group), "ignore"'].result == "missed by 2"
    sync = got['no host sync under set_sync_debug_mode("error") (every SM3 row)']
    assert sync.met is False and "synchronizing" in sync.note
    assert got["FSDP2 world 1 through the block table: step / Adam(fused=True)"].met
    for opt, tps in (("sm3", 900.0), ("adamw", 1000.0)):
        (tmp_path / f"train-{opt}").mkdir()
        (tmp_path / f"train-{opt}" / "metrics.jsonl").write_text(json.dumps({"kind": "summary", "tokens_per_s": tps}))
    (train,) = full.targets_of(full.Stage("train-adamw", "", ["x"], 1, status="ok"), tmp_path)
    assert train.result == "missed by 0.1" and "SM3 900 tokens/s" in train.note
    (unreached,) = full.targets_of(
        full.Stage("memory", "", ["x"], 1, reason="the overall time budget was spent"), tmp_path
    )
    assert unreached.result == "not measured (the overall time budget was spent)"


def test_docs_gpu_report_renders_from_a_cuda_report_only(tmp_path):
    stage = full.Stage("bench", "step time", ["x"], 1, status="ok", seconds=3.0)
    stage.targets = [full.Target("ratio", 0.7, 0.8).evaluate()]
    data = {
        "date": "2026-12-07 10:00 UTC",
        "device": "cuda",
        "device_name": "NVIDIA H200",
        "torch": "2.11.0",
        "command": "sm3-dist doctor --device cuda --full",
        "full": True,
        "ok": True,
        "seconds": 300.0,
        "budget_s": 480.0,
        "out": str(tmp_path),
        "stages": [stage.as_dict()],
    }
    (tmp_path / "report.json").write_text(json.dumps(data))
    docs = tmp_path / "gpu-report.md"
    assert doctor_cli.main(["--render-docs", str(tmp_path / "report.json"), "--docs-out", str(docs)]) == 0
    text = docs.read_text()
    assert text.startswith("# GPU report") and "2026-12-07 10:00 UTC" in text and "NVIDIA H200" in text
    assert "| bench | ratio | 0.7 | <= 0.8 | met |" in text and report.ACCEPTANCE_COMMAND in text
    (tmp_path / "report.json").write_text(json.dumps(data | {"device": "cpu"}))
    assert doctor_cli.main(["--render-docs", str(tmp_path / "report.json"), "--docs-out", str(docs)]) == 2


def test_committed_gpu_report_gives_the_command():
    text = (ROOT / "docs" / "gpu-report.md").read_text()
    assert report.ACCEPTANCE_COMMAND in text


_CARRIED = ("hjson", "pydantic", "annotated_types", "typing_inspection", "pytorch_optimizer", "expecttest")
_CARRIED += ("deepspeed", "sm3_dist", "__editable__", "_sm3_dist")


@pytest.mark.slow
def test_gpu_wheels_install_offline_into_a_fresh_venv(tmp_path):
    """tools/gpu_wheels.sh for this interpreter, installed as on the GPU machine (``--no-index --no-deps
    --target``) into a fresh venv that has only what the GPU machine has (this venv's packages less the ones
    carried as wheels), then ``import sm3_dist, deepspeed``."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    wheels = tmp_path / "whl"
    pip = Path(sys.executable).with_name("pip")
    env = dict(os.environ, PY_VERSION=version, PIP=str(pip))
    built = subprocess.run(
        ["bash", str(ROOT / "tools" / "gpu_wheels.sh"), str(wheels)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    names = sorted(p.name.split("-")[0].lower() for p in wheels.glob("*.whl"))
    assert names == sorted(
        [
            *("annotated_types", "deepspeed", "expecttest", "hjson", "pydantic", "pydantic_core", "pytorch_optimizer"),
            *("sm3_dist", "typing_inspection"),
        ]
    )
    # the "GPU machine": a fresh venv seeing this venv's packages except the carried ones
    base = tmp_path / "base"
    base.mkdir()
    site = Path(torch.__file__).resolve().parents[1]
    for entry in site.iterdir():
        key = entry.name.lower().replace("-", "_")
        if entry.suffix == ".pth" or key.startswith(_CARRIED):
            continue
        (base / entry.name).symlink_to(entry)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    (next((venv / "lib").glob("python*/site-packages")) / "machine.pth").write_text(str(base) + "\n")
    python = venv / "bin" / "python"
    probe = [str(python), "-c", "import deepspeed"]
    missing = subprocess.run(probe, capture_output=True, text=True, timeout=120)
    assert missing.returncode != 0, "the fresh venv must not see deepspeed before the wheels are installed"
    target = tmp_path / "site"
    installed = subprocess.run(
        [
            str(pip),
            "install",
            "-q",
            "--no-index",
            "--no-deps",
            "--target",
            str(target),
            *map(str, wheels.glob("*.whl")),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert installed.returncode == 0, installed.stderr[-3000:]
    code = (
        "import sm3_dist, deepspeed, pydantic, hjson, pytorch_optimizer, expecttest\n"
        "import sm3_dist.tools.doctor, sm3_dist.launch, sm3_dist.integrations\n"
        "print(sm3_dist.__file__, deepspeed.__version__)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PYTHONPATH=str(target), DS_ACCELERATOR="cpu")
    ran = subprocess.run([str(python), "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert str(target) in ran.stdout and "0.19.8" in ran.stdout
