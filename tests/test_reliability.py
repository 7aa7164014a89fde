"""Reliability of ``sm3-dist train``: kill-and-resume, damaged or foreign checkpoints, dead and hung ranks.

End to end (2 CPU processes, gloo, tiny model, 10 steps, a checkpoint every 2):
for ``--setup sharded`` (DDP + ShardedSM3), ``fsdp2`` and ``deepspeed`` (ZeRO-2)
a reference run goes uninterrupted; a second run of the same job is SIGKILLed
(the whole process group) when ``metrics.jsonl`` reaches a random step, resumed
with ``--resume auto``, SIGKILLed again inside a checkpoint write (at a random
phase of it, through the test-only ``SM3_DIST_TEST_FAULT``), its newest
complete checkpoint is then corrupted (bytes flipped in a random file), and the
last ``--resume auto`` must skip that one, say so, fall back to the previous
checkpoint and end with parameters ``torch.equal`` to the reference. Under
``sharded`` and ``fsdp2`` one rank's gradients are NaN at step 3 in every run,
so the runs also show the skipped step counted, checkpointed and restored.

In process: a table of damaged and foreign checkpoints, each refused before
any process group starts (exit code 2, the file and the mismatch named, the
checkpoint left as it was), and ``--resume auto`` falling back past them.
Draws are seeded (``SM3_DIST_RELIABILITY_SEED``, default 0) and reported in
failure messages.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from sm3_dist.launch import checkpoint, config, faults, train
from sm3_dist.launch.defaults import SM3_RECOMMENDED

from tests.test_launch import ROOT, SMALL, _env

SEED = int(os.environ.get("SM3_DIST_RELIABILITY_SEED", "0"))
STEPS = 10
COMMON = [*SMALL, "--steps", str(STEPS), "--eval-every", "0", "--checkpoint-every", "2", "--keep-checkpoints", "3"]
NAN_AT_STEP_3 = "nan@grad:3:1"
SAVE_PHASES = ("staged", "manifest", "renamed")


def _cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "sm3_dist.cli", "train", *args]


def _job_env(fault: str | None) -> dict[str, str]:
    env = _env()
    env.pop(faults.FAULT_ENV, None)
    if fault:
        env[faults.FAULT_ENV] = fault
    return env


def _run(args: list[str], *, fault: str | None = None, expect: int | None = 0, timeout: float = 240):
    proc = subprocess.run(
        _cmd(*args), cwd=ROOT, env=_job_env(fault), capture_output=True, text=True, timeout=timeout,
        start_new_session=True,
    )  # fmt: skip
    if expect is not None and proc.returncode != expect:
        raise AssertionError(
            f"{' '.join(args)} (fault {fault}): exit code {proc.returncode}, expected {expect}\n"
            f"--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-5000:]}"
        )
    return proc


def _records(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    records = []
    for line in lines:
        with contextlib.suppress(json.JSONDecodeError):  # a line cut by the kill
            records.append(json.loads(line))
    return records


def _last_step(out: Path) -> int:
    return max((r["step"] for r in _records(out) if r["kind"] == "train"), default=0)


def _kill_at_step(args: list[str], out: Path, step: int, *, fault: str | None, timeout: float = 240) -> int:
    """Start the job in its own session, SIGKILL its process group once metrics.jsonl shows ``step``."""
    log = out.parent / f"{out.name}-killed-at-{step}.log"
    with open(log, "w") as stderr:
        proc = subprocess.Popen(
            _cmd(*args), cwd=ROOT, env=_job_env(fault), stdout=subprocess.DEVNULL, stderr=stderr,
            start_new_session=True,
        )  # fmt: skip
    end = time.monotonic() + timeout
    try:
        while _last_step(out) < step:
            if proc.poll() is not None:
                raise AssertionError(f"the job ended (exit code {proc.returncode}) before step {step}:\n"
                                     f"{log.read_text()[-4000:]}")  # fmt: skip
            if time.monotonic() > end:
                raise AssertionError(f"the job did not reach step {step} within {timeout} s")
            time.sleep(0.005)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.returncode
    return _last_step(out)


def _final_losses(out: Path) -> dict[int, float]:
    losses = {}
    for r in _records(out):
        if r["kind"] == "train":
            losses[r["step"]] = r["loss"]
    return losses


def _summary(out: Path) -> dict:
    return [r for r in _records(out) if r["kind"] == "summary"][-1]


def _flip_bytes(path: Path, rng: random.Random, count: int = 4) -> None:
    data = bytearray(path.read_bytes())
    for i in rng.sample(range(len(data)), min(count, len(data))):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


# ---------------------------------------------------------------------------------------------- kill and resume


@pytest.mark.slow
@pytest.mark.parametrize("setup", ["sharded", "fsdp2", "deepspeed"])
def test_killed_job_resumes_bitwise_and_falls_back_past_a_corrupted_checkpoint(setup, tmp_path):
    rng = random.Random(f"{SEED}-{setup}")
    nan = NAN_AT_STEP_3 if setup != "deepspeed" else None
    args = [*COMMON, "--setup", setup]
    ref, out = tmp_path / "reference", tmp_path / "killed"
    ckpts = out / "checkpoints"

    _run([*args, "--out", str(ref), "--final-weights", str(ref / "final.pt")], fault=nan)
    kept = [checkpoint.step_of(d) for d in checkpoint.list_checkpoints(ref / "checkpoints")]
    assert kept == [10, 8, 6], kept  # --keep-checkpoints 3
    plan = config.validate(config.build_parser().parse_args([*args, "--out", str(ref)]), env={})
    expected = config.expected_checkpoint(plan)
    manifest = checkpoint.verify(ref / "checkpoints" / "step_0000010", expected)
    assert manifest["world_size"] == 2 and manifest["setup"] == setup and manifest["step"] == 10
    assert manifest["optimizer_config_sha256"] == checkpoint.config_hash(expected.optimizer_config)
    assert all(len(e["sha256"]) == 64 and e["bytes"] > 0 for e in manifest["files"])
    ref_summary = _summary(ref)
    assert ref_summary["skipped_steps"] == (1 if nan else 0)

    # 1: SIGKILL the process group when metrics.jsonl shows a random step
    kill_step = rng.randint(3, 5)
    reached = _kill_at_step([*args, "--out", str(out)], out, kill_step, fault=nan)
    after_first = [checkpoint.step_of(d) for d in checkpoint.list_checkpoints(ckpts)]
    assert reached < STEPS and after_first and max(after_first) <= reached, (kill_step, reached, after_first)

    # 2: resume, and SIGKILL inside a later checkpoint write (one save completes first)
    target = min(max(after_first) + 4, STEPS)
    phases = SAVE_PHASES if target < STEPS else SAVE_PHASES[:2]
    phase = rng.choice(phases)
    fault = ",".join(filter(None, [nan, f"kill@{phase}:{target}"]))
    proc = _run([*args, "--out", str(out), "--resume", "auto"], fault=fault, expect=-signal.SIGKILL)
    assert f"kill at {phase} of step {target}" in proc.stdout
    complete = checkpoint.list_checkpoints(ckpts)
    steps = [checkpoint.step_of(d) for d in complete]
    assert (target in steps) == (phase == "renamed"), (phase, target, steps)
    assert (ckpts / f".staging.step_{target:07d}").exists() == (phase != "renamed")
    assert len(complete) >= 2, steps

    # 3: corrupt the newest complete checkpoint; --resume auto must skip it and take the previous one
    newest, previous = complete[0], complete[1]
    files = json.loads((newest / checkpoint.MANIFEST_FILE).read_text())["files"]
    victim = rng.choice(files)["path"]
    _flip_bytes(newest / victim, rng)
    proc = _run([*args, "--out", str(out), "--resume", "auto", "--final-weights", str(out / "final.pt")], fault=nan)
    assert f"skipping checkpoint {newest}: {newest / victim}: sha256 differs from the manifest" in proc.stderr
    assert f"resuming from the older checkpoint {previous}" in proc.stderr
    resume_records = [r for r in _records(out) if r["kind"] == "resume"]
    assert resume_records[-1]["from"] == str(previous) and resume_records[-1]["skipped"][0]["path"] == str(newest)
    assert not any(d.name.startswith(".staging.") for d in ckpts.iterdir())

    context = f"seed {SEED}: killed at step {reached}, then at {phase} of step {target}, corrupted {victim}"
    a, b = torch.load(ref / "final.pt"), torch.load(out / "final.pt")
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == torch.float32
        assert torch.equal(a[key], b[key]), f"{key} differs ({context})"
    ref_losses, losses = _final_losses(ref), _final_losses(out)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert losses == ref_losses, context
    assert _summary(out)["skipped_steps"] == ref_summary["skipped_steps"], context


# ---------------------------------------------------------------------------------------------- bad checkpoints


TINY = ["--model-size", "tiny", "--seq-len", "32", "--steps", "10", "--lr", "0.03", "--warmup-fraction", "0.34"]


def _expected(argv: list[str]) -> checkpoint.Expected:
    return config.expected_checkpoint(config.validate(config.build_parser().parse_args(argv), env={}))


def _fake_checkpoint(root: Path, step: int, expected: checkpoint.Expected) -> Path:
    """A step directory written as the job writes one, with made-up payload files."""
    path = root / f"step_{step:07d}"
    (path / "dcp").mkdir(parents=True)
    payload = {"dcp/__0_0.distcp": os.urandom(3000), "dcp/.metadata": os.urandom(500), "trainer.pt": b"x" * 100}
    files = []
    for name, data in payload.items():
        (path / name).write_bytes(data)
        files.append({"path": name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    (path / checkpoint.MANIFEST_FILE).write_text(json.dumps(expected.manifest(step, files)))
    (path / checkpoint.DONE_FILE).write_text("")
    return path


def _flip(path: Path) -> None:
    _flip_bytes(path / "dcp/__0_0.distcp", random.Random(SEED))


def _truncate(path: Path) -> None:
    file = path / "dcp/__0_0.distcp"
    file.write_bytes(file.read_bytes()[:1000])


def _edit_manifest(**changes):
    def edit(path: Path) -> None:
        manifest = json.loads((path / checkpoint.MANIFEST_FILE).read_text())
        manifest.update(changes)
        (path / checkpoint.MANIFEST_FILE).write_text(json.dumps(manifest))

    return edit


# fmt: off
BAD_CHECKPOINTS = [
    # (saved with, damage, resumed with, message parts: "{ckpt}" is the step directory)
    ("sharded", _flip, [], ["{ckpt}/dcp/__0_0.distcp: sha256 differs from the manifest (corrupted)"]),
    ("sharded", _truncate, [], ["{ckpt}/dcp/__0_0.distcp: 1000 bytes, the manifest says 3000 (truncated"]),
    ("sharded", lambda p: (p / "dcp/.metadata").unlink(), [], ["{ckpt}/dcp/.metadata: missing"]),
    ("sharded", lambda p: (p / "manifest.json").unlink(), [], ["{ckpt}/manifest.json: no manifest"]),
    ("sharded", lambda p: (p / "manifest.json").write_text('{"step": 4, "se'), [],
     ["{ckpt}/manifest.json: not valid JSON"]),
    ("sharded", lambda p: (p / "complete").unlink(), [], ["{ckpt}/complete: missing: the checkpoint is incomplete"]),
    ("sharded", _edit_manifest(files=[]), [], ["{ckpt}/manifest.json: the manifest lists no files"]),
    ("sharded", None, ["--model-size", "small"],
     ["{ckpt}/manifest.json: checkpoint saved with model_size='tiny', this run has 'small'"]),
    ("sharded", None, ["--seq-len", "64"],
     ["{ckpt}/manifest.json: checkpoint of another model: n_positions=32 in the checkpoint, 64 in this run"]),
    ("fsdp2", None, ["--optimizer", "adamw"],
     ["{ckpt}/manifest.json: checkpoint saved with optimizer='sm3', this run has 'adamw'"]),
    ("sharded", None, ["--setup", "fsdp2"], ["checkpoint saved with setup='sharded', this run has 'fsdp2'"]),
    ("sharded", None, ["--lr", "0.05"],
     ["{ckpt}/manifest.json: optimizer config hash", "lr=0.03 in the checkpoint, 0.05 in this run"]),
    ("sharded", None, ["--momentum", "0.5", "--beta", "0.9"],
     [f"beta={SM3_RECOMMENDED['beta']} in the checkpoint, 0.9 in this run; ",
      f"momentum={SM3_RECOMMENDED['momentum']} in the checkpoint, 0.5 in this run"]),
    ("sharded", None, ["--steps", "20"], ["steps=10 in the checkpoint, 20 in this run"]),
    ("deepspeed", None, ["--nproc", "3", "--batch-size", "6"],
     ["{ckpt}/manifest.json: checkpoint holds deepspeed state of 2 ranks, which this setup cannot reshard; "
      "resume it on 2 processes (this run has 3)"]),
    ("deepspeed", None, ["--deepspeed-config", str(ROOT / "launch/deepspeed/zero1.json"), "--batch-size", "16"],
     ["{ckpt}/manifest.json: checkpoint saved with ZeRO stage 2, this run has stage 1"]),
]
# fmt: on


def _bad_id(case) -> str:
    saved, damage, argv, _ = case
    return f"{saved}-{damage.__name__ if damage else ' '.join(argv)}"


@pytest.mark.parametrize(("saved", "damage", "argv", "messages"), BAD_CHECKPOINTS, ids=map(_bad_id, BAD_CHECKPOINTS))
def test_bad_checkpoint_is_refused_before_anything_is_loaded(saved, damage, argv, messages, tmp_path, capsys):
    import torch.distributed as dist

    base = [*TINY, "--setup", saved, "--out", str(tmp_path / "run")]
    ckpt = _fake_checkpoint(tmp_path / "ckpts", 4, _expected(base))
    if damage is not None:
        damage(ckpt)
    before = {p: p.read_bytes() for p in ckpt.rglob("*") if p.is_file()}
    rc = train.main([*base, *argv, "--resume", str(ckpt)])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("sm3-dist train: error: "), err
    for message in messages:
        assert message.format(ckpt=ckpt) in err, err
    assert not dist.is_initialized()
    assert not (tmp_path / "run").exists()
    assert {p: p.read_bytes() for p in ckpt.rglob("*") if p.is_file()} == before


def test_reshardable_checkpoint_loads_at_another_world_size(tmp_path):
    base = [*TINY, "--setup", "sharded", "--out", str(tmp_path / "run")]
    ckpt = _fake_checkpoint(tmp_path / "ckpts", 4, _expected(base))
    plan = config.validate(config.build_parser().parse_args([*base, "--nproc", "1", "--resume", str(ckpt)]), env={})
    assert plan.resume == ckpt and plan.skipped == ()


def test_resume_auto_falls_back_past_bad_checkpoints_and_says_so(tmp_path, capsys):
    base = [*TINY, "--setup", "sharded", "--out", str(tmp_path)]
    root = tmp_path / "checkpoints"
    good = _expected(base)
    oldest = _fake_checkpoint(root, 2, good)
    middle = _fake_checkpoint(root, 4, good)
    foreign = _fake_checkpoint(root, 6, _expected([*base, "--lr", "0.05"]))
    newest = _fake_checkpoint(root, 8, good)
    base += ["--resume", "auto"]
    _truncate(newest)
    (root / ".staging.step_0000010").mkdir()  # an interrupted save: never a candidate
    plan = config.validate(config.build_parser().parse_args(base), env={})
    err = capsys.readouterr().err
    assert plan.resume == middle
    assert [path for path, _ in plan.skipped] == [str(newest), str(foreign)]
    assert f"skipping checkpoint {newest}: {newest}/dcp/__0_0.distcp: 1000 bytes, the manifest says 3000" in err
    assert f"skipping checkpoint {foreign}: {foreign}/manifest.json: optimizer config hash" in err
    assert f"resuming from the older checkpoint {middle}" in err

    _flip(middle)
    (oldest / checkpoint.MANIFEST_FILE).unlink()
    assert train.main(base) == 2
    err = capsys.readouterr().err
    assert f"sm3-dist train: error: --resume auto: no usable checkpoint in {root}" in err
    for path in (newest, foreign, middle, oldest):
        assert str(path) in err.split("no usable checkpoint", 1)[1]


def test_resume_auto_with_nothing_saved_starts_fresh(tmp_path):
    base = [*TINY, "--setup", "sharded", "--out", str(tmp_path), "--resume", "auto"]
    (tmp_path / "checkpoints" / ".staging.step_0000002").mkdir(parents=True)  # killed during its first save
    plan = config.validate(config.build_parser().parse_args(base), env={})
    assert plan.resume is None and plan.skipped == ()


def test_fault_spec_is_checked():
    assert faults.parse("kill@staged:6, nan@grad:3:1") == [("kill", "staged", 6, 0), ("nan", "grad", 3, 1)]
    with pytest.raises(ValueError, match="not ACTION@POINT:STEP"):
        faults.parse("kill@staged")
    with pytest.raises(ValueError, match="unknown action 'boom'"):
        faults.parse("boom@step:1")


# ---------------------------------------------------------------------------------------------- dead and hung ranks


PG_TIMEOUT = 5.0
STEP_TIMEOUT = 10.0
MARGIN = 30.0
"""Seconds allowed after a timeout for the error, the launcher stopping the other rank, and exiting."""

HANGS = [
    # (setup, fault, the step metrics.jsonl shows when the hang begins, --step-timeout, timeout that must end it,
    #  message); the gloo row's watchdog waits past the margin, so the process-group timeout alone must end it
    ("sharded", "hang@step:4:1", 3, PG_TIMEOUT + MARGIN + 30.0, PG_TIMEOUT,
     "rank 0, step 4 (training step): a collective did not complete within the process-group timeout "
     "(--pg-timeout 5 s): another rank hung or died"),
    # DeepSpeed's CPU all-reduce spins on shared memory with no timeout: the watchdog ends it
    ("deepspeed", "hang@step:4:1", 3, STEP_TIMEOUT, STEP_TIMEOUT,
     "step 4 made no progress for 10 s (--step-timeout 10 s): another rank died or hung"),
]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize(
    ("setup", "fault", "shown", "step_timeout", "limit", "message"), HANGS, ids=[f"{h[0]}-{h[1]}" for h in HANGS]
)
def test_hung_rank_stops_the_job_within_the_timeout(setup, fault, shown, step_timeout, limit, message, tmp_path):
    out = tmp_path / "run"
    args = [*SMALL, "--setup", setup, "--steps", "8", "--eval-every", "0", "--checkpoint-every", "4", "--out", str(out),
            "--pg-timeout", str(PG_TIMEOUT), "--step-timeout", str(step_timeout)]  # fmt: skip
    log = tmp_path / "stderr.log"
    with open(log, "w") as stderr:
        proc = subprocess.Popen(
            _cmd(*args), cwd=ROOT, env=_job_env(fault), stdout=subprocess.DEVNULL, stderr=stderr,
            start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while _last_step(out) < shown and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        assert _last_step(out) >= shown, log.read_text()[-4000:]
        hung_at = time.monotonic()
        try:
            rc = proc.wait(timeout=limit + MARGIN)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the job still runs {limit + MARGIN:g} s after the hang began") from None
        elapsed = time.monotonic() - hung_at
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    err = log.read_text()
    assert rc != 0, err[-4000:]
    assert limit - 1.0 <= elapsed <= limit + MARGIN, (elapsed, err[-4000:])
    assert message in err, err[-6000:]
    assert _last_step(out) == shown


# ---------------------------------------------------------------------------------------------- soak report


@pytest.mark.slow
def test_soak_writes_its_report(tmp_path):
    cmd = [sys.executable, "-m", "sm3_dist.launch.soak", "--steps", "50", "--warmup-steps", "10", "--window", "25",
           "--checkpoint-every", "25", "--sample-every", "0.05", "--out", str(tmp_path)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode in (0, 3), proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "soak.json").read_text())
    assert result["steps_logged"] == 50
    assert [w["steps"] for w in result["step_time_windows"]] == [[1, 25], [26, 50]]
    assert all(w["n"] == 25 and 0 < w["p50_ms"] <= w["p90_ms"] <= w["p99_ms"] <= w["max_ms"]
               for w in result["step_time_windows"])  # fmt: skip
    assert [m["rank"] for m in result["memory"]] == [0, 1]
    for m in result["memory"]:
        assert m["samples"] >= 2
        assert 50 < m["rss_start_mib"] < 4096 and 50 < m["rss_end_mib"] < 4096
    assert proc.returncode == (0 if result["memory_flat"] and result["step_time_stable"] else 3)
    assert "RSS (MiB)" in proc.stdout and "step time (ms)" in proc.stdout and "steps   26-50" in proc.stdout
    steps = [s["step"] for s in result["samples"]]
    assert steps == sorted(steps) and steps[-1] >= 40


def test_soak_report_verdicts():
    from sm3_dist.launch.soak import report

    mib = 1024 * 1024
    samples = [{"t": i, "step": i * 10, "rss": [400 * mib, (400 + (i > 5) * i) * mib]} for i in range(1, 11)]
    times = {s: 0.010 if s <= 50 else 0.030 for s in range(1, 101)}
    result = report(samples, times, steps=100, warmup_steps=20, window=50, rss_tolerance=0.05,
                    rss_tolerance_mib=4.0, time_tolerance=1.5)  # fmt: skip
    flat = [m["flat"] for m in result["memory"]]
    assert flat == [True, False] and not result["memory_flat"]
    assert result["memory"][1]["growth_after_warmup_mib"] == 10.0
    assert result["memory"][0]["slope_mib_per_1000_steps"] == 0.0
    assert result["p50_ratio_to_first_window"] == pytest.approx([1.0, 3.0]) and not result["step_time_stable"]
