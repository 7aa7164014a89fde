"""The training job (``sm3-dist train``, ``launch/train.py``) and every config in ``launch/``.

Fast checks run in-process: the corpus and its split, model sizes, the bad
inputs (each must be refused before any process group starts, exit code 2),
the plots and the parsing of every YAML/JSON config. The end-to-end runs start
2 CPU processes (gloo) under ``accelerate launch`` (DDP, DeepSpeed ZeRO-1/2/3),
``torchrun`` (FSDP2) and the job's own spawner, on a tiny model for a few
steps: the loss must fall, ``metrics.jsonl`` and ``loss.png`` must be written,
and a resumed run must repeat the uninterrupted one exactly.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from sm3_dist.launch import checkpoint, launcher, train
from sm3_dist.launch import config as job_config
from sm3_dist.launch.backends import BACKENDS, Backend
from sm3_dist.launch.backends.deepspeed import fill_config
from sm3_dist.launch.data import STDLIB, eval_windows, load_corpus, train_batch
from sm3_dist.launch.defaults import default_lr
from sm3_dist.launch.model import SIZES, build_model
from sm3_dist.launch.plot import plot_runs, read_metrics

from sm3_dist.comm import free_port

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
SCRIPT = LAUNCH / "train.py"
YAMLS = sorted((LAUNCH / "accelerate").glob("*.yaml"))
JSONS = sorted((LAUNCH / "deepspeed").glob("*.json"))
SMALL_ANY_LR = ["--batch-size", "8", "--seq-len", "32", "--eval-windows", "4", "--warmup-fraction", "0.34"]
SMALL = [*SMALL_ANY_LR, "--lr", "0.03", "--no-plot"]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _run(cmd: list[str], *, expect: int = 0, timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    if expect is not None and proc.returncode != expect:
        raise AssertionError(
            f"{' '.join(cmd)}\nexit code {proc.returncode}, expected {expect}\n"
            f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}"
        )
    return proc


def _accelerate(config: Path, *args: str, expect: int = 0) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]
    cmd += ["--main_process_port", str(free_port()), str(SCRIPT), *args]
    return _run(cmd, expect=expect)


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port())]
    return _run([*cmd, str(SCRIPT), *args])


def _sm3_dist(*args: str, expect: int = 0) -> subprocess.CompletedProcess:
    proc = _run([sys.executable, "-m", "sm3_dist.cli", "train", *args], expect=expect)
    # ranks end with os._exit: nothing they made may outlive them (multiprocessing's tracker would say so)
    assert "leaked semaphore" not in proc.stderr, proc.stderr[-2000:]
    return proc


def _losses(out: Path) -> dict[int, float]:
    records, _ = read_metrics(out / "metrics.jsonl")
    return {step: r["loss"] for step, r in records.items()}


def _assert_resumed_on_the_same_trajectory(first, second, resumed_steps: list[int]) -> None:
    """The resumed run's losses are the uninterrupted run's at its steps, and so is the Polyak average's eval loss."""
    a, b = _losses(first), _losses(second)
    assert sorted(b) == resumed_steps
    assert all(a[s] == b[s] for s in b), (a, b)
    assert _summary(first)["eval_loss_polyak"] == _summary(second)["eval_loss_polyak"]


def _summary(out: Path) -> dict:
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    (summary,) = [r for r in lines if r["kind"] == "summary"][-1:]
    return summary


def _assert_trained(out: Path, steps: int, world: int = 2, *, png: bool = True) -> None:
    losses = _losses(out)
    assert sorted(losses) == list(range(1, steps + 1))
    assert losses[steps] < losses[1] - 0.5, losses
    summary = _summary(out)
    assert summary["eval_loss"] < 4.5
    assert len(summary["optimizer_state_bytes"]) == world and all(b > 0 for b in summary["optimizer_state_bytes"])
    assert len(summary["peak_memory_bytes"]) == world and all(b > 0 for b in summary["peak_memory_bytes"])
    if png:
        assert (out / "loss.png").stat().st_size > 1000


# ---------------------------------------------------------------------------------------------- data, model, plot


def test_corpus_is_deterministic_with_disjoint_held_out_topics():
    a, b = load_corpus(), load_corpus()
    assert torch.equal(a.train, b.train) and torch.equal(a.held_out, b.held_out)
    assert a.train.dtype == torch.uint8 and int(a.train.max()) < 256
    assert a.train.numel() > 400_000 and 20_000 < a.held_out.numel() < 60_000
    held = bytes(a.held_out[:2000].tolist())
    assert held not in bytes(a.train.tolist())


def test_data_file_split(tmp_path):
    path = tmp_path / "text.txt"
    path.write_bytes(bytes(range(256)) * 40)
    corpus = load_corpus(path, held_out_fraction=0.25)
    assert corpus.train.numel() == 7680 and corpus.held_out.numel() == 2560


@pytest.mark.parametrize("world", [2, 4])
def test_global_batch_is_the_same_at_any_world_size(world):
    tokens = load_corpus().train
    kw = dict(step=7, global_batch=8, seq_len=16, seed=3)
    whole = train_batch(tokens, **kw)
    parts = [train_batch(tokens, **kw, rank=r, world_size=world) for r in range(world)]
    assert torch.equal(torch.cat(parts), whole)
    assert whole.shape == (8, 17)
    assert not torch.equal(train_batch(tokens, **{**kw, "step": 8}), whole)


def test_eval_windows_are_even_across_ranks():
    tokens = torch.arange(1000) % 256
    counts = [eval_windows(tokens, seq_len=31, max_windows=9, rank=r, world_size=4).shape for r in range(4)]
    assert counts == [(2, 32)] * 4


def test_model_sizes():
    for size in SIZES.values():
        assert size.n_embd % size.n_head == 0
    a = build_model("tiny", n_positions=32, seed=1)
    b = build_model("tiny", n_positions=32, seed=1)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert a.config.vocab_size == 256 and a.config.resid_pdrop == 0.0


def test_plot_runs(tmp_path):
    for name, scale in (("a", 1.0), ("b", 1.2)):
        lines = [{"kind": "train", "step": s, "loss": scale * 5 / s, "lr": 0.1} for s in range(1, 30)]
        lines += [{"kind": "eval", "step": 10, "eval_loss": scale, "eval_loss_polyak": scale * 0.9}]
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    png = plot_runs([("a", tmp_path / "a.jsonl"), ("b", tmp_path / "b.jsonl")], tmp_path / "x.png", title="t")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------------- bad input


BAD_INPUTS = [
    (["--optimizer", "sgd"], {}, "unknown optimizer 'sgd'"),
    (["--compare", "sm3,lion"], {}, "unknown optimizer 'lion'"),
    (["--compare", "sm3"], {}, "at least two optimizers"),
    (["--batch-size", "15"], {}, "global batch size 15 is not divisible by the 2 processes"),
    (["--batch-size", "8"], {"RANK": "0", "WORLD_SIZE": "3"}, "not divisible by the 3 processes"),
    (["--model-size", "huge"], {}, "unknown model size 'huge'"),
    (["--steps", "0"], {}, "--steps must be at least 1"),
    (["--momentum", "1.0"], {}, "--momentum must be in [0, 1)"),
    (["--warmup-fraction", "0.8", "--cooldown-fraction", "0.5"], {}, "exceeds the whole run"),
    ([], {"ACCELERATE_USE_FSDP": "true"}, "accelerate's FSDP plugin does not shard on CPU"),
    (["--setup", "ddp"], {"ACCELERATE_USE_DEEPSPEED": "true"}, "--setup ddp conflicts"),
    (["--compare", "sm3,adamw"], {"RANK": "0", "WORLD_SIZE": "2"}, "not under a launcher"),
    (["--deepspeed-config", "x.json"], {}, "only used with --setup deepspeed"),
    (["--setup", "deepspeed", "--deepspeed-config", "/nonexistent.json"], {}, "does not exist"),
    (["--setup", "sharded", "--optimizer", "adamw"], {}, "use --optimizer sm3"),
    (["--setup", "deepspeed", "--optimizer", "adafactor"], {}, "Adafactor under ZeRO"),
    (["--resume", "/nonexistent/ckpt"], {}, "no complete checkpoint there"),
    (["--data", "/nonexistent.txt"], {}, "is not a file"),
]


@pytest.mark.parametrize(("argv", "env", "message"), BAD_INPUTS, ids=[m for _, _, m in BAD_INPUTS])
def test_bad_input_is_refused_before_any_process_group(argv, env, message, monkeypatch, capsys):
    import torch.distributed as dist

    for key in ("RANK", "WORLD_SIZE", "ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    if "ACCELERATE_USE_FSDP" in env:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert train.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("sm3-dist train: error: ") and message in err, err
    assert not dist.is_initialized()


COMPARE_LR = [
    # (command line, the lr of each run of --compare sm3,adamw)
    ([], {"sm3": default_lr("sm3", "tiny"), "adamw": default_lr("adamw", "tiny")}),
    (["--model-size", "small"], {"sm3": default_lr("sm3", "small"), "adamw": default_lr("adamw", "small")}),
    (["--beta", "0.999"], {"sm3": default_lr("sm3", "tiny", beta=0.999), "adamw": default_lr("adamw", "tiny")}),
    (["--lr=0.05"], {"sm3": 0.05, "adamw": 0.05}),
    (["--lr", "0.05"], {"sm3": 0.05, "adamw": 0.05}),
]


@pytest.mark.parametrize(("argv", "lrs"), COMPARE_LR, ids=["default", "small", "beta", "lr=0.05", "lr 0.05"])
def test_compare_runs_each_optimizer_as_alone(argv, lrs, tmp_path):
    args = job_config.build_parser().parse_args(["--compare", "sm3,adamw", "--out", str(tmp_path), *argv])
    plans = launcher.compare_plans(args, job_config.validate(args, env={}))
    assert {p.args.optimizer: p.args.lr for p in plans} == lrs
    assert [p.args.out for p in plans] == [str(tmp_path / "sm3"), str(tmp_path / "adamw")]
    assert all(p.args.compare is None and p.world_size == 2 and not p.launched for p in plans)


def test_every_setup_has_one_backend():
    setups = {setup for setup, _ in BACKENDS}
    assert setups == set(job_config.SETUPS)
    assert {(s, None) for s in job_config.SETUPS} <= set(BACKENDS)
    for cls in BACKENDS.values():
        assert issubclass(cls, Backend) and cls._build is not Backend._build, cls


def test_stdlib_corpus_needs_no_file(tmp_path):
    plan = job_config.validate(
        job_config.build_parser().parse_args(["--data", "stdlib", "--out", str(tmp_path)]), env={}
    )
    assert plan.args.data == STDLIB and load_corpus(plan.args.data).name.startswith("stdlib")


def test_resume_of_another_setup_is_refused(tmp_path, capsys):
    step = tmp_path / "step_0000004"
    step.mkdir()
    meta = {"step": 4, "setup": "fsdp2", "optimizer": "sm3", "model_size": "tiny", "world_size": 2}
    (step / checkpoint.MANIFEST_FILE).write_text(json.dumps(meta))
    (step / checkpoint.DONE_FILE).write_text("")
    assert train.main(["--resume", str(tmp_path)]) == 2
    assert "saved with setup='fsdp2', this run has 'ddp'" in capsys.readouterr().err


def test_cli_exit_code_and_message():
    proc = _sm3_dist("--optimizer", "lamb", expect=2)
    assert "unknown optimizer 'lamb': choose from sm3, adamw, adagrad, adafactor" in proc.stderr


# ---------------------------------------------------------------------------------------------- packaging


def test_wheel_builds_quietly_and_the_cli_runs_from_the_repository_root(tmp_path):
    """The project's own configuration gives no setuptools warnings; installed, ``python -m sm3_dist.cli train``
    works in the repository root, where the source folder ``sm3_dist/`` comes first on ``sys.path``."""
    tree = tmp_path / "tree"
    listed = ["git", "ls-files", "--cached", "--others", "--exclude-standard"]
    files = subprocess.run(listed, cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        if (ROOT / name).is_file():
            (tree / name).parent.mkdir(parents=True, exist_ok=True)
            (tree / name).write_bytes((ROOT / name).read_bytes())
    env = {k: v for k, v in _env().items() if k != "PYTHONDONTWRITEBYTECODE"}
    cmd = [sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), "."]
    build = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=300)
    log = build.stdout + build.stderr
    assert build.returncode == 0, log[-4000:]
    for mark in ("Warning:", "deprecated", "would be ignored", "absent from the `packages`"):
        assert mark not in log, log[-6000:]
    (wheel,) = tmp_path.glob("sm3_dist-*.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
        names = z.namelist()
    assert "sm3_dist/launch/deepspeed/zero2.json" in names and "sm3_dist/launch/accelerate/ddp_cpu.yaml" in names
    installed_as = {"sm3_dist": "sm3_dist", "launch": "sm3_dist/launch", "integrations": "sm3_dist/integrations",
                    "tools": "sm3_dist/tools"}  # fmt: skip
    for folder, target in installed_as.items():  # every module of the source tree ships
        for source in (tree / folder).rglob("*.py"):
            assert f"{target}/{source.relative_to(tree / folder).as_posix()}" in names, source
    data_dirs = ("sm3_dist/launch/accelerate/", "sm3_dist/launch/deepspeed/")
    assert not any(n.startswith(data_dirs) and not n.endswith((".yaml", ".json")) for n in names)
    # -S: no site-packages .pth files, so the editable install of this checkout is out of the picture
    deps = [p for p in sys.path if p.endswith("site-packages")]
    env["PYTHONPATH"] = os.pathsep.join([str(site), *deps])
    run = subprocess.run([sys.executable, "-S", "-m", "sm3_dist.cli", "train", "--help"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert run.returncode == 0 and "usage: sm3-dist train" in run.stdout, run.stderr[-3000:]


COLLECTIVE = re.compile(
    r"\b(?:dist|torch\.distributed)\.(all_reduce|all_gather\w*|reduce_scatter\w*|broadcast\w*|barrier|send|recv|"
    r"isend|irecv|gather\w*|scatter\w*|all_to_all\w*|reduce)\("
)


def test_collectives_go_through_comm_as_its_docstring_says():
    import sm3_dist.comm

    callers = set()
    for folder in ("sm3_dist", "integrations", "launch", "tools"):
        for path in (ROOT / folder).rglob("*.py"):
            if path.name != "comm.py" and COLLECTIVE.search(path.read_text()):
                callers.add(path.relative_to(ROOT).as_posix())
    assert not {c for c in callers if c.startswith("launch/")}, callers
    for caller in callers:
        assert f"``{caller}``" in sm3_dist.comm.__doc__, f"{caller} calls collectives; comm.py's docstring says not"


# ---------------------------------------------------------------------------------------------- configs


@pytest.mark.parametrize("path", YAMLS, ids=[p.name for p in YAMLS])
def test_accelerate_config_parses(path):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(path))
    assert config.num_processes >= 1
    kind = str(config.distributed_type).split(".")[-1]
    assert kind in ("MULTI_CPU", "MULTI_GPU", "DEEPSPEED", "FSDP"), kind
    if kind == "DEEPSPEED":
        file = config.deepspeed_config.get("deepspeed_config_file")
        assert file is None or (ROOT / file).is_file(), file
        assert config.deepspeed_config.get("zero_stage") in (None, 0, 1, 2, 3)
    if kind == "FSDP":
        assert str(config.fsdp_config.get("fsdp_version")) == "2"


@pytest.mark.parametrize("path", JSONS, ids=[p.name for p in JSONS])
def test_deepspeed_json_fills_for_the_job(path):
    config = json.loads(path.read_text())
    args = job_config.build_parser().parse_args(["--setup", "deepspeed", "--deepspeed-config", str(path)])
    args.lr, args.batch_size = 0.05, 16
    filled, from_config = fill_config(config, args, world_size=2)
    assert from_config and filled["optimizer"]["type"] == "SM3"
    assert filled["optimizer"]["params"]["lr"] == 0.05
    assert filled["train_batch_size"] == 16 and filled["train_micro_batch_size_per_gpu"] == 8
    assert "scheduler" not in filled
    assert not any(v == "auto" for v in filled["optimizer"]["params"].values())


def test_baseline_under_deepspeed_is_a_client_optimizer():
    args = job_config.build_parser().parse_args(["--optimizer", "adagrad"])
    args.lr, args.batch_size = 0.01, 16
    filled, from_config = fill_config({"optimizer": {"type": "SM3"}}, args, world_size=2)
    assert not from_config and "optimizer" not in filled and filled["zero_allow_untested_optimizer"]


# ---------------------------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_accelerate_ddp_trains_and_resumes_exactly(tmp_path):
    """DDP under ``accelerate launch`` (torchrun starts 2 gloo processes), then a resume from its step 3."""
    first, second = tmp_path / "first", tmp_path / "second"
    config = LAUNCH / "accelerate" / "ddp_gpu.yaml"
    common = [*SMALL[:-1], "--steps", "6", "--eval-every", "3", "--polyak", "0.5"]
    _accelerate(config, *common, "--out", str(first), "--checkpoint-every", "3")
    _assert_trained(first, 6)
    step_3 = first / "checkpoints" / "step_0000003"
    assert (step_3 / checkpoint.DONE_FILE).exists()
    _accelerate(config, *common, "--out", str(second), "--resume", str(step_3))
    _assert_resumed_on_the_same_trajectory(first, second, [4, 5, 6])


@pytest.mark.slow
def test_accelerate_deepspeed_zero2_trains(tmp_path):
    """ZeRO-2 through accelerate's DeepSpeed plugin, SM3 built from the config entry "type": "SM3"."""
    proc = _accelerate(
        LAUNCH / "accelerate" / "deepspeed_zero2.yaml", *SMALL[:-1], "--steps", "6", "--out", str(tmp_path)
    )
    _assert_trained(tmp_path, 6)
    assert "final train loss" in proc.stdout


@pytest.mark.slow
def test_torchrun_fsdp2_with_polyak_resumes_exactly(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    common = [*SMALL, "--setup", "fsdp2", "--steps", "6", "--eval-every", "3", "--polyak", "0.5"]
    _torchrun(*common, "--out", str(first), "--checkpoint-every", "3")
    _assert_trained(first, 6, png=False)
    _torchrun(*common, "--out", str(second), "--resume", str(first / "checkpoints" / "step_0000003"))
    _assert_resumed_on_the_same_trajectory(first, second, [4, 5, 6])


@pytest.mark.slow
def test_sharded_checkpoint_resumes_at_another_world_size(tmp_path):
    """ShardedSM3 saved by 2 processes (DCP, consolidated state) resumes on 1 process on the same trajectory."""
    first, second = tmp_path / "first", tmp_path / "second"
    common = [*SMALL, "--setup", "sharded", "--steps", "4", "--eval-every", "0"]
    _sm3_dist(*common, "--out", str(first), "--checkpoint-every", "2")
    _assert_trained(first, 4, png=False)
    _sm3_dist(*common, "--out", str(second), "--nproc", "1", "--resume", str(first / "checkpoints" / "step_0000002"))
    a, b = _losses(first), _losses(second)
    assert sorted(b) == [3, 4]
    for s in b:  # the gradient average is summed in another order at world size 1
        assert b[s] == pytest.approx(a[s], rel=1e-4)


@pytest.mark.slow
def test_accelerate_fsdp_on_cpu_is_refused_before_any_process_group(tmp_path):
    proc = _accelerate(LAUNCH / "accelerate" / "fsdp2.yaml", "--out", str(tmp_path), expect=None)
    assert proc.returncode != 0
    assert "accelerate's FSDP plugin does not shard on CPU" in proc.stderr
    assert "exitcode  : 2" in proc.stderr
    assert not (tmp_path / "metrics.jsonl").exists()


@pytest.mark.gpu
@pytest.mark.skipif(
    torch.cuda.device_count() < 2, reason="accelerate's FSDP plugin shards on CUDA devices only (2 needed)"
)
def test_accelerate_fsdp2_trains_on_gpu(tmp_path):
    _accelerate(LAUNCH / "accelerate" / "fsdp2.yaml", *SMALL, "--steps", "6", "--out", str(tmp_path))
    _assert_trained(tmp_path, 6, png=False)


def test_deepspeed_config_batch_and_lr_are_used_unless_given():
    path = str(LAUNCH / "deepspeed" / "zero2.json")
    config = json.loads(Path(path).read_text())
    parser = job_config.build_parser()
    plan = job_config.validate(parser.parse_args(["--setup", "deepspeed", "--deepspeed-config", path]), env={})
    assert plan.args.batch_size == config["train_micro_batch_size_per_gpu"] * 2
    assert plan.args.lr == config["optimizer"]["params"]["lr"]
    with pytest.raises(job_config.UsageError, match="disagrees with --batch-size 6"):
        job_config.validate(
            parser.parse_args(["--setup", "deepspeed", "--deepspeed-config", path, "--batch-size", "6"]), {}
        )


def test_clip_grad_norm_is_recorded_and_reaches_deepspeed():
    parser = job_config.build_parser()
    plan = job_config.validate(parser.parse_args(["--clip-grad-norm", "1.0"]), env={})
    assert job_config.optimizer_config(plan.args, None)["clip_grad_norm"] == 1.0
    assert "clip_grad_norm" not in job_config.optimizer_config(
        job_config.validate(parser.parse_args([]), {}).args, None
    )
    with pytest.raises(job_config.UsageError, match="--clip-grad-norm"):
        job_config.validate(parser.parse_args(["--clip-grad-norm", "-1"]), env={})
    args = parser.parse_args(["--setup", "deepspeed", "--clip-grad-norm", "0.5"])
    args.lr, args.batch_size = 0.05, 16
    filled, _ = fill_config({"gradient_clipping": 1.0, "optimizer": {"type": "SM3"}}, args, world_size=2)
    assert filled["gradient_clipping"] == 0.5


@pytest.mark.parametrize(
    ("given", "expected"), [([], 1.0), (["--update-clip", "0.5"], 0.5), (["--update-clip", "0"], 0.0)]
)
def test_update_clip_reaches_the_optimizer_and_deepspeed(given, expected):
    import torch
    from sm3_dist.launch.backends.base import make_optimizer

    parser = job_config.build_parser()
    plan = job_config.validate(parser.parse_args(given), env={})
    assert job_config.optimizer_config(plan.args, None)["update_clip"] == expected
    opt = make_optimizer("sm3", [torch.nn.Parameter(torch.zeros(3, 2))], plan.args)
    assert opt.param_groups[0]["update_clip"] == expected
    args = parser.parse_args(["--setup", "deepspeed", *given])
    args.lr, args.batch_size = 0.05, 16
    filled, _ = fill_config({"optimizer": {"type": "SM3"}}, args, world_size=2)
    assert filled["optimizer"]["params"]["update_clip"] == expected


@pytest.mark.parametrize("value", ["-1", "nan", "inf"])
def test_bad_update_clip_is_a_usage_error(value):
    parser = job_config.build_parser()
    with pytest.raises(job_config.UsageError, match="--update-clip"):
        job_config.validate(parser.parse_args(["--update-clip", value]), env={})


def test_the_run_summary_names_the_update_clip():
    from sm3_dist.launch.launcher import describe

    parser = job_config.build_parser()
    assert "update clip 1" in describe(job_config.validate(parser.parse_args([]), env={}).args)
    assert "update clip" not in describe(job_config.validate(parser.parse_args(["--update-clip", "0"]), env={}).args)
