"""``sm3-dist quality`` (``launch/quality.py``, ``launch/quality_run.py``) and the stdlib corpus.

The pieces run in-process on a tiny configuration (a few steps of a 2-layer
model on short windows): the corpus loader and its split, the variant and rate
parsing, the sweep plan, the selection of the best setting (from synthetic
results, so the rule is checked exactly), one run per optimizer (deterministic
given the seed), the resumable runner and the command end to end.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from sm3_dist.launch import data, quality, quality_run
from sm3_dist.launch.quality import grid, parse_lrs, plan_runs, summarize
from sm3_dist.launch.quality_run import RunSpec, Setup, parse_variant

TINY = dict(steps=6, batch_size=4, seq_len=16, eval_every=3, eval_windows=4)


# ---------------------------------------------------------------------------------------------- stdlib corpus


def _fake_stdlib(root):
    files = {
        "a.py": "A" * 10,
        "pkg/__init__.py": "I",
        "pkg/b.py": "B" * 5,
        "pkg/tests/test_b.py": "skip",
        "test/test_x.py": "skip",
        "idlelib/idle_test/t.py": "skip",
        "encodings/cp.py": "skip",
        "pydoc_data/topics.py": "skip",
        "site-packages/x/y.py": "skip",
        "notes.txt": "skip",
    }
    files.update({f"m{i:02d}.py": f"#{i}" for i in range(12)})
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_stdlib_files_follow_the_documented_rules(tmp_path):
    _fake_stdlib(tmp_path)
    names = [f.relative_to(tmp_path).as_posix() for f in data.stdlib_files(tmp_path)]
    assert names == sorted(names)
    assert names[:3] == ["a.py", "m00.py", "m01.py"] and names[-2:] == ["pkg/__init__.py", "pkg/b.py"]
    assert len(names) == 15 and not any("skip" in (tmp_path / n).read_text() for n in names)


def test_stdlib_split_holds_out_every_tenth_file(tmp_path):
    _fake_stdlib(tmp_path)
    corpus = data.stdlib_corpus(tmp_path)
    files = data.stdlib_files(tmp_path)
    held = b"".join(f.read_bytes() + b"\n" for i, f in enumerate(files) if i % data.HOLDOUT_EVERY == 0)
    train = b"".join(f.read_bytes() + b"\n" for i, f in enumerate(files) if i % data.HOLDOUT_EVERY)
    assert bytes(corpus.held_out.tolist()) == held == b"A" * 10 + b"\n" + b"#9\n"
    assert bytes(corpus.train.tolist()) == train


def test_stdlib_bad_roots(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.stdlib_corpus(tmp_path / "missing")
    (tmp_path / "a.py").write_text("a")
    with pytest.raises(ValueError, match="fewer than"):
        data.stdlib_corpus(tmp_path)


def test_real_stdlib_corpus_is_deterministic_and_split():
    a, b = data.load_corpus("stdlib"), data.load_corpus(data.STDLIB)
    assert torch.equal(a.train, b.train) and torch.equal(a.held_out, b.held_out)
    assert a.name.startswith("stdlib (") and a.train.dtype == torch.uint8
    assert a.train.numel() > 1_000_000 and a.held_out.numel() > 100_000
    assert 0.05 < a.held_out.numel() / (a.train.numel() + a.held_out.numel()) < 0.2
    first_held = data.stdlib_files()[0].read_bytes()
    assert bytes(a.held_out[: len(first_held)].tolist()) == first_held


def test_spread_windows_cover_the_text():
    tokens = torch.arange(100, dtype=torch.uint8)
    w = data.spread_windows(tokens, seq_len=9, count=4)
    assert w.dtype == torch.int64 and w.shape == (4, 10)
    assert w[:, 0].tolist() == [0, 30, 60, 90] and w[-1, -1] == 99
    for bad in (dict(count=0), dict(count=2, seq_len=100)):
        with pytest.raises(ValueError):
            data.spread_windows(tokens, **{"seq_len": 9, **bad})


# ---------------------------------------------------------------------------------------------- parsing and plan


@pytest.mark.parametrize(
    ("text", "name"),
    [
        ("warmup", "warmup"),
        ("cooldown", "cooldown"),
        ("bc+ema+cooldown", "cooldown+ema+bc"),
        ("bf16+cooldown", "cooldown+bf16"),
        ("uclip+bc+ema+cooldown", "cooldown+ema+bc+uclip"),
    ],
)
def test_variant_names_are_canonical(text, name):
    assert parse_variant(text).name == name


@pytest.mark.parametrize("text", ["", "cool", "ema+ema", "bc", "cooldown+bc", "keepmax", "bf16+nomom", "cooldown+"])
def test_bad_variants(text):
    with pytest.raises(ValueError):
        parse_variant(text)


def test_sm3_only_variants():
    assert parse_variant("cooldown+ema").applies_to("sm3") and not parse_variant("cooldown+ema").applies_to("adamw")
    assert parse_variant("cooldown").applies_to("adafactor")
    assert not parse_variant("cooldown+uclip").applies_to("adamw")


def test_uclip_builds_sm3_with_the_update_clip():
    import torch
    from sm3_dist.launch.quality_run import UPDATE_CLIP, RunSpec, Setup, make_optimizer

    setup = Setup(data="default")
    params = [torch.nn.Parameter(torch.zeros(3, 2))]
    clipped = make_optimizer(RunSpec("sm3", "cooldown+ema+bc+uclip", 1e-3, 0), setup, params)
    plain = make_optimizer(RunSpec("sm3", "cooldown+ema+bc", 1e-3, 0), setup, params)
    assert clipped.param_groups[0]["update_clip"] == UPDATE_CLIP > 0
    assert plain.param_groups[0]["update_clip"] == 0.0


def test_grid_spans_two_decades():
    assert grid(0.01, 1.0, 4) == (0.01, 0.046, 0.22, 1.0)
    assert grid(3e-4, 3e-2, 5) == (3e-4, 9.5e-4, 3e-3, 9.5e-3, 3e-2)
    for lows, highs in quality.DEFAULT_GRIDS.values():
        assert highs / lows >= 100
    with pytest.raises(ValueError):
        grid(1.0, 0.1, 4)


def test_parse_lrs():
    assert parse_lrs(["sm3=0.1,0.3", "sm3:ema+cooldown=1e-3"]) == {"sm3": (0.1, 0.3), "sm3:cooldown+ema": (1e-3,)}
    for bad in ("sgd=0.1", "sm3", "sm3=x", "adamw=-1", "sm3:nope=0.1"):
        with pytest.raises(ValueError):
            parse_lrs([bad])


def test_plan_skips_sm3_only_variants_for_the_others():
    specs = plan_runs(["sm3", "adamw"], ["cooldown", "cooldown+ema"], {"adamw": (1e-3, 3e-3)}, [0, 1])
    counts = {}
    for s in specs:
        counts[(s.optimizer, s.variant)] = counts.get((s.optimizer, s.variant), 0) + 1
    assert counts == {("sm3", "cooldown"): 8, ("sm3", "cooldown+ema"): 8, ("adamw", "cooldown"): 4}
    only = plan_runs(["sm3", "adamw"], ["sm3:ema+bc+cooldown", "adamw:cooldown"], {}, [0])
    assert {(s.optimizer, s.variant) for s in only} == {("sm3", "cooldown+ema+bc"), ("adamw", "cooldown")}
    ema = {s.lr for s in specs if s.variant == "cooldown+ema"}
    assert ema == set(grid(*quality.DEFAULT_GRIDS["sm3:ema"], quality.DEFAULT_POINTS))


@pytest.mark.parametrize(
    "bad", [dict(steps=0), dict(warmup_fraction=0.6, cooldown_fraction=0.5), dict(beta=1.0), dict(device="tpu")]
)
def test_bad_setups(bad):
    with pytest.raises(ValueError):
        Setup(data="default", **bad)


# ---------------------------------------------------------------------------------------------- selection


def _record(optimizer, variant, lr, seed, final, polyak=0.0, steps_run=TINY["steps"]):
    return {
        "steps_run": steps_run,
        "optimizer": optimizer,
        "variant": variant,
        "lr": lr,
        "seed": seed,
        "final": final,
        "final_polyak": None if final is None else final + 0.5 if polyak == 0.0 else polyak,
        "diverged": final is None,
        "evals": [[1, 9.0, 9.0], [2, final or 9.0, final or 9.0]],
        "corpus": "c",
    }


def _runs(*records):
    return {RunSpec(r["optimizer"], r["variant"], r["lr"], r["seed"]).key: r for r in records}


def test_best_is_scored_on_the_common_seeds():
    runs = _runs(
        _record("adamw", "cooldown", 1e-3, 0, 2.0),
        _record("adamw", "cooldown", 3e-3, 0, 1.9),
        # the best rate's extra seed is worse, but cannot demote it: selection is on seed 0 only
        _record("adamw", "cooldown", 3e-3, 1, 2.5),
    )
    best = summarize(runs)["best"]["adamw"]
    assert (best["lr"], best["reading"]) == (3e-3, "last")
    assert best["mean"] == pytest.approx(2.2) and best["spread"] == pytest.approx(0.6)
    assert best["seeds"] == {"0": 1.9, "1": 2.5}


def test_polyak_reading_and_divergence():
    runs = _runs(
        _record("sm3", "cooldown", 0.1, 0, 2.0, polyak=1.8),
        _record("sm3", "cooldown", 1.0, 0, None, polyak=None),
        _record("adafactor", "cooldown", 0.01, 0, 1.9),
        _record("adamw", "cooldown", 0.001, 0, 1.7),
    )
    summary = summarize(runs)
    assert (summary["best"]["sm3"]["lr"], summary["best"]["sm3"]["reading"]) == (0.1, "polyak")
    assert summary["best"]["sm3"]["spread"] is None  # one seed: no spread
    diverged = [r for r in summary["rows"] if r["lr"] == 1.0]
    assert all(math.isinf(r["score"]) for r in diverged)
    assert summary["gap"]["relative"] == pytest.approx(1.8 / 1.7 - 1)
    assert summary["gap"]["vs_adafactor"] == pytest.approx(1.8 / 1.9 - 1)
    md = quality.markdown(summary, Setup(data="default"), "sm3-dist quality", "c")
    assert "| sm3 | cooldown | 0.1 | polyak | **1.8000** | - |" in md and "1: diverged" in md


# ---------------------------------------------------------------------------------------------- runs


@pytest.mark.parametrize(
    ("optimizer", "variant", "lr"),
    [("sm3", "cooldown", 0.1), ("sm3", "cooldown+ema", 3e-3), ("sm3", "bf16", 0.1), ("adamw", "cooldown", 3e-3),
     ("adafactor", "warmup", 0.03), ("adagrad", "cooldown", 0.03)],
)  # fmt: skip
def test_run_is_deterministic_and_learns(optimizer, variant, lr):
    torch.set_num_threads(1)
    setup = Setup(data="default", **TINY)
    a = quality_run.run(RunSpec(optimizer, variant, lr, 0), setup)
    b = quality_run.run(RunSpec(optimizer, variant, lr, 0), setup)
    c = quality_run.run(RunSpec(optimizer, variant, lr, 1), setup)
    assert a["evals"] == b["evals"] and a["evals"] != c["evals"]
    assert [e[0] for e in a["evals"]] == [3, 6] and not a["diverged"]
    assert a["final"] == a["evals"][-1][1] < math.log(256) and math.isfinite(a["final_polyak"])


def test_run_refuses_a_variant_the_optimizer_lacks():
    with pytest.raises(ValueError, match="SM3 only"):
        quality_run.run(RunSpec("adamw", "ema", 1e-3, 0), Setup(data="default", **TINY))
    with pytest.raises(ValueError, match="canonical"):
        quality_run.run(RunSpec("sm3", "ema+cooldown", 1e-3, 0), Setup(data="default", **TINY))


def test_the_progress_bar_counts_training_steps_and_a_diverged_runs_missing_ones(tmp_path, monkeypatch, capsys):
    setup = Setup(data="default", **TINY)

    def fake(spec, setup, on_step=None):
        steps = 2 if spec.lr > 5e-3 else setup.steps  # the larger rate "diverges" after 2 steps
        for _ in range(steps):
            on_step()
        final = None if steps < setup.steps else 2.0
        return _record(spec.optimizer, spec.variant, spec.lr, spec.seed, final, steps_run=steps)

    monkeypatch.setattr(quality, "run", fake)
    quality.execute(plan_runs(["adamw"], ["cooldown"], {"adamw": (1e-3, 1e-2)}, [0]), setup, tmp_path, workers=1)
    bar = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]
    assert "12/12" in bar and "step" in bar and "2/2 runs" in bar and "diverged" in bar


def test_the_progress_bar_counts_the_steps_of_parallel_workers(tmp_path, capsys):
    setup = Setup(data="default", **TINY)
    runs = quality.execute(plan_runs(["adamw"], ["cooldown"], {"adamw": (1e-3, 2e-3)}, [0]), setup, tmp_path, workers=2)
    assert len(runs) == 2 and all(r["steps_run"] == TINY["steps"] for r in runs.values())
    bar = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]
    assert "12/12" in bar and "2/2 runs" in bar


def test_execute_resumes_from_results(tmp_path, monkeypatch):
    setup = Setup(data="default", **TINY)
    calls = []

    def fake(spec, setup, on_step=None):
        calls.append(spec.key)
        return _record(spec.optimizer, spec.variant, spec.lr, spec.seed, 2.0 + spec.lr)

    monkeypatch.setattr(quality, "run", fake)
    specs = plan_runs(["adamw"], ["cooldown"], {"adamw": (1e-3, 1e-2)}, [0])
    quality.execute(specs, setup, tmp_path, workers=1)
    assert len(calls) == 2
    more = plan_runs(["adamw"], ["cooldown"], {"adamw": (1e-3, 1e-2, 0.1)}, [0])
    runs = quality.execute(more, setup, tmp_path, workers=1)
    assert len(calls) == 3 and len(runs) == 3
    assert json.loads((tmp_path / quality.RESULTS_FILE).read_text())["setup"] == setup.to_json()
    with pytest.raises(ValueError, match="another setup"):
        quality.execute(specs, Setup(data="stdlib", **TINY), tmp_path, workers=1)
    # a results file written before a setup field existed (here: device) is read with that field's default
    saved = json.loads((tmp_path / quality.RESULTS_FILE).read_text())
    del saved["setup"]["device"]
    (tmp_path / quality.RESULTS_FILE).write_text(json.dumps(saved))
    assert len(quality.load_results(tmp_path / quality.RESULTS_FILE, setup)) == 3


def test_command_end_to_end(tmp_path, capsys):
    out = tmp_path / "q"
    argv = ["--steps", "4", "--batch-size", "4", "--seq-len", "16", "--eval-every", "2", "--eval-windows", "4",
            "--optimizers", "sm3,adamw", "--lrs", "sm3=0.1,0.3", "--lrs", "adamw=1e-3", "--seeds", "0",
            "--best-seeds", "1", "--workers", "1", "--out", str(out)]  # fmt: skip
    assert quality.main(argv) == 0
    runs = json.loads((out / quality.RESULTS_FILE).read_text())["runs"]
    assert len(runs) == 3 + 2  # the sweep, then seed 1 at each optimizer's best rate
    summary = json.loads((out / quality.SUMMARY_FILE).read_text())
    assert set(summary["best"]) == {"sm3", "adamw"} and summary["best"]["adamw"]["seeds"].keys() == {"0", "1"}
    assert (out / quality.PLOT_FILE).stat().st_size > 1000
    assert "Best per optimizer" in (out / quality.TABLE_FILE).read_text()
    assert quality.main([*argv, "--report-only"]) == 0


def _margin_record(optimizer, variant, lr, seed, final):
    return {"optimizer": optimizer, "variant": variant, "lr": lr, "seed": seed, "final": final, "final_polyak": final,
            "diverged": final is None, "evals": []}  # fmt: skip


def test_margin_runs_each_default_form_at_multiples_of_its_rate():
    from sm3_dist.launch.defaults import default_lr

    specs, rates = quality.margin_runs(["sm3", "adamw"], [0.5, 1.0, 2.0], [0, 1], "tiny")
    assert len(specs) == 2 * 3 * 2
    assert {s.variant for s in specs if s.optimizer == "sm3"} == {"cooldown+ema+bc+uclip"}
    assert {s.variant for s in specs if s.optimizer == "adamw"} == {"cooldown"}
    assert rates[("sm3", 1.0)] == default_lr("sm3", "tiny")
    assert rates[("adamw", 2.0)] == pytest.approx(2 * default_lr("adamw", "tiny"))
    runs = {
        s.key: _margin_record(s.optimizer, s.variant, s.lr, s.seed, None if (s.optimizer, s.lr) == ("sm3", rates[("sm3", 2.0)]) and s.seed else 2.0 + s.lr)
        for s in specs
    }  # fmt: skip
    text = quality.margin_markdown(runs, rates, [0, 1], Setup(data="stdlib"), "cmd")
    rows = {
        tuple(c.strip() for c in line.split("|")[1:5]): line for line in text.splitlines() if line.startswith("| sm3")
    }
    assert "diverged" in rows[("sm3", "cooldown+ema+bc+uclip", f"{rates[('sm3', 1.0)]:g}", "1")]
    one, two = 2.0 + rates[("sm3", 1.0)], 2.0 + rates[("sm3", 2.0)]
    assert f"{(two / one - 1) * 100:+.1f}%" in rows[("sm3", "cooldown+ema+bc+uclip", f"{rates[('sm3', 1.0)]:g}", "0")]


def test_margin_command_end_to_end(tmp_path):
    out = tmp_path / "m"
    argv = ["--steps", "4", "--batch-size", "4", "--seq-len", "16", "--eval-every", "2", "--eval-windows", "4",
            "--optimizers", "sm3,adamw", "--margin", "1,2", "--seeds", "0", "--workers", "1", "--out", str(out)]  # fmt: skip
    assert quality.main(argv) == 0
    runs = json.loads((out / quality.RESULTS_FILE).read_text())
    assert len(runs["runs"]) == 4 and runs["setup"]["beta"] == 0.99
    table = (out / quality.MARGIN_FILE).read_text()
    assert "| sm3 | cooldown+ema+bc+uclip |" in table and "| adamw | cooldown |" in table and "2x vs 1x" in table
    assert quality.main([*argv, "--report-only"]) == 0


@pytest.mark.parametrize(
    "bad",
    [["--margin", "1,x"], ["--margin", "0"], ["--optimizers", "sgd"], ["--variants", "cooldown+nope"], ["--variants", "sgd:cooldown"], ["--lrs", "sm3=0"], ["--seeds", "a"], ["--workers", "0"],
     ["--data", "/no/such/file"], ["--model-size", "huge"], ["--steps", "0"]],
)  # fmt: skip
def test_command_refuses_bad_input(bad, tmp_path, capsys):
    assert quality.main([*bad, "--out", str(tmp_path)]) == 2
    assert "sm3-dist quality: error:" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- defaults


def test_default_lr_scales_with_width():
    from sm3_dist.launch import defaults

    for optimizer in ("sm3", "adamw", "adagrad"):
        tiny = defaults.default_lr(optimizer, "tiny", beta=0.0)
        assert tiny == defaults.TINY_LR[optimizer]
        assert defaults.default_lr(optimizer, "gpt2", beta=0.0) == pytest.approx(tiny / 6, rel=0.03)
        assert defaults.default_lr(optimizer, "xl", beta=0.0) < defaults.default_lr(optimizer, "small", beta=0.0) < tiny
    assert defaults.default_lr("adafactor", "xl") == defaults.default_lr("adafactor", "tiny")
    assert defaults.default_lr("sm3", "tiny", beta=0.999) == defaults.TINY_LR["sm3-ema"]
    assert defaults.default_lr("sm3", "tiny") == defaults.TINY_LR["sm3-ema"]  # the job's default form: beta > 0
    assert defaults.default_lr("sm3", 256, beta=0.0) == pytest.approx(defaults.TINY_LR["sm3"] / 2, rel=0.03)
    for bad in (("sgd", "tiny"), ("adamw", "huge"), ("adamw", 0)):
        with pytest.raises(ValueError):
            defaults.default_lr(*bad)
