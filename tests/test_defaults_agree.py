"""One source of truth for SM3's recommended setting: ``launch/defaults.py``.

The training job's defaults, the shipped DeepSpeed JSON and accelerate YAML
configs, the ``SM3WarmupCooldown`` scheduler entries in them, and README's
snippets (the first Python example, every DeepSpeed ``"type": "SM3"`` snippet)
must all say what :data:`sm3_dist.launch.defaults.SM3_RECOMMENDED`,
:data:`~sm3_dist.launch.defaults.SCHEDULE` and
:func:`~sm3_dist.launch.defaults.default_lr` say. Change the setting there and
these tests name every place that still says the old one.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from sm3_dist.launch import config as job_config
from sm3_dist.launch.defaults import SCHEDULE, SM3_PAPER, SM3_RECOMMENDED, deepspeed_sm3_params, default_lr

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
JSONS = sorted((LAUNCH / "deepspeed").glob("*.json"))
YAMLS = sorted((LAUNCH / "accelerate").glob("*.yaml"))
README = ROOT / "README.md"
SM3_KEYS = ("lr", "momentum", "beta", "bias_correction", "eps", "update_clip")
"""The hyperparameters a config or snippet must state (the others keep SM3's own defaults)."""


# ---------------------------------------------------------------------------------------------- the job


def test_job_defaults_are_the_recommended_setting():
    args = job_config.build_parser().parse_args([])
    assert args.optimizer == "sm3"
    for key in ("momentum", "beta", "bias_correction", "update_clip"):
        assert getattr(args, key) == SM3_RECOMMENDED[key], key
    assert args.warmup_fraction == SCHEDULE["warmup_fraction"]
    assert args.cooldown_fraction == SCHEDULE["cooldown_fraction"]
    plan = job_config.validate(args, env={})
    assert plan.args.lr == default_lr("sm3", "tiny") == deepspeed_sm3_params()["lr"]
    recorded = job_config.optimizer_config(plan.args, None)
    assert recorded["bias_correction"] is True and recorded["beta"] == SM3_RECOMMENDED["beta"]
    assert recorded["update_clip"] == SM3_RECOMMENDED["update_clip"]


def test_beta_zero_is_the_papers_form_at_its_own_rate():
    args = job_config.build_parser().parse_args(["--beta", "0"])
    plan = job_config.validate(args, env={})
    assert plan.args.beta == SM3_PAPER["beta"]
    assert plan.args.lr == default_lr("sm3", "tiny", beta=0.0) != default_lr("sm3", "tiny")
    assert job_config.optimizer_config(plan.args, None)["bias_correction"] is False  # no effect at beta 0
    args = job_config.build_parser().parse_args(["--no-bias-correction"])
    assert job_config.validate(args, env={}).args.bias_correction is False


def test_every_optimizer_gets_the_schedule():
    for name in ("adamw", "adafactor", "adagrad"):
        args = job_config.build_parser().parse_args(["--optimizer", name])
        config = job_config.optimizer_config(job_config.validate(args, env={}).args, None)
        assert config["warmup_fraction"] == SCHEDULE["warmup_fraction"], name
        assert config["cooldown_fraction"] == SCHEDULE["cooldown_fraction"], name


def test_job_builds_the_recommended_optimizer():
    import torch
    from sm3_dist.launch.backends.base import make_optimizer

    plan = job_config.validate(job_config.build_parser().parse_args([]), env={})
    opt = make_optimizer("sm3", [torch.nn.Parameter(torch.zeros(3, 2))], plan.args)
    group = opt.param_groups[0]
    for key in SM3_KEYS:
        expected = plan.args.lr if key == "lr" else SM3_RECOMMENDED[key]
        assert group[key] == expected, key


# ---------------------------------------------------------------------------------------------- shipped configs


@pytest.mark.parametrize("path", JSONS, ids=[p.name for p in JSONS])
def test_deepspeed_json_uses_the_recommended_setting(path):
    config = json.loads(path.read_text())
    section = config["optimizer"]
    assert section["type"] == "SM3"
    expected = deepspeed_sm3_params()
    assert {k: section["params"].get(k) for k in SM3_KEYS} == {k: expected[k] for k in SM3_KEYS}, path.name
    scheduler = config.get("scheduler")
    if scheduler is not None:
        assert scheduler["type"] == "SM3WarmupCooldown"
        assert {k: scheduler["params"].get(k) for k in SCHEDULE} == SCHEDULE, path.name


@pytest.mark.parametrize("path", JSONS, ids=[p.name for p in JSONS])
def test_job_under_a_deepspeed_json_runs_its_setting(path):
    """The job reads the config's rate, and its own defaults give the config's SM3 form: the two agree."""
    from sm3_dist.launch.backends.deepspeed import fill_config

    args = job_config.build_parser().parse_args(["--setup", "deepspeed", "--deepspeed-config", str(path)])
    plan = job_config.validate(args, env={})
    config = json.loads(path.read_text())
    filled, from_config = fill_config(json.loads(path.read_text()), plan.args, world_size=2)
    assert from_config
    assert {k: filled["optimizer"]["params"].get(k) for k in SM3_KEYS} == {
        k: config["optimizer"]["params"][k] for k in SM3_KEYS
    }


@pytest.mark.parametrize("path", YAMLS, ids=[p.name for p in YAMLS])
def test_accelerate_yaml_leaves_the_setting_to_the_job(path):
    """The accelerate configs state no optimizer hyperparameters: the job's defaults (or a referenced JSON) apply."""
    config = yaml.safe_load(path.read_text())
    text = json.dumps(config)
    for key in ("lr", "learning_rate", "beta", "momentum", "bias_correction", "update_clip"):
        assert f'"{key}"' not in text, (path.name, key)
    file = (config.get("deepspeed_config") or {}).get("deepspeed_config_file")
    if file:
        section = json.loads((ROOT / file).read_text())["optimizer"]
        assert {k: section["params"].get(k) for k in SM3_KEYS} == {k: deepspeed_sm3_params()[k] for k in SM3_KEYS}


# ---------------------------------------------------------------------------------------------- README


def _blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


def _kwargs(call: str) -> dict[str, str]:
    return dict(re.findall(r"(\w+)\s*=\s*([^,()]+)", call))


def test_readme_first_example_shows_the_recommended_setting():
    """README's first code example builds SM3 with the recommended setting spelled out, and its schedule."""
    blocks = [b for b in _blocks(README.read_text(), "python") if "SM3(" in b]
    assert blocks, "README has no Python example that builds SM3"
    first = blocks[0]
    call = re.search(r"SM3\(model\.parameters\(\),([^\n]*)\)", first)
    assert call, first
    kwargs = {k: v.strip() for k, v in _kwargs(call.group(1)).items()}
    assert float(kwargs.get("lr", "nan")) == default_lr("sm3", "tiny"), kwargs
    assert float(kwargs.get("momentum", "nan")) == SM3_RECOMMENDED["momentum"], kwargs
    assert float(kwargs.get("beta", "nan")) == SM3_RECOMMENDED["beta"], kwargs
    assert kwargs.get("bias_correction") == str(SM3_RECOMMENDED["bias_correction"]), kwargs
    assert float(kwargs.get("update_clip", "nan")) == SM3_RECOMMENDED["update_clip"], kwargs
    schedule = re.search(r"warmup_cooldown\(([^\n]*)\)", first)
    assert schedule, first
    given = {k: float(v) for k, v in _kwargs(schedule.group(1)).items() if k in SCHEDULE}
    assert given.get("cooldown_fraction") == SCHEDULE["cooldown_fraction"], given
    assert given.get("warmup_fraction", SCHEDULE["warmup_fraction"]) == SCHEDULE["warmup_fraction"], given


def test_readme_deepspeed_snippets_use_the_recommended_setting():
    """Every ``"type": "SM3"`` snippet with numeric parameters in README states the recommended setting."""
    text = README.read_text()
    found = 0
    for match in re.finditer(r'"optimizer":\s*(\{"type":\s*"SM3",\s*"params":\s*\{[^{}]*\}\})', text):
        params = json.loads(match.group(1))["params"]
        if not isinstance(params.get("lr"), (int, float)):
            continue  # "lr": "auto" (HF Trainer fills it in) names no setting
        found += 1
        expected = deepspeed_sm3_params()
        stated = [k for k in SM3_KEYS if k != "eps" or k in params]  # eps may be left at SM3's default
        assert {k: params.get(k) for k in stated} == {k: expected[k] for k in stated}, params
    assert found, "README shows no DeepSpeed SM3 config with a numeric rate"
    for match in re.finditer(r'"scheduler":\s*(\{"type":\s*"SM3WarmupCooldown",\s*"params":\s*\{[^{}]*\}\})', text):
        params = json.loads(match.group(1))["params"]
        assert params.get("cooldown_fraction") == SCHEDULE["cooldown_fraction"], params
