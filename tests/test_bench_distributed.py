"""``sm3-dist bench --distributed`` on a tiny parameter set: the table's numbers are consistent."""

from __future__ import annotations

import json
import math

import pytest
from sm3_dist.tools.bench.distributed import format_table, main
from sm3_dist.tools.bench.shapes import gpt_shapes, parse_size

from sm3_dist.cli import main as cli_main
from sm3_dist.sharded import FlatPartition

# the multi-process sessions are shared by the tests of this file: keep them on one xdist worker
pytestmark = pytest.mark.xdist_group("bench_distributed")

SIZE = "64,8,1"  # vocab 64, width 8, one block
WORLD_SIZES = (1, 2, 4)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "result.json"
    argv = ["bench", "--distributed", "--size", SIZE, "--steps", "3", "--warmup", "1", "--json", str(path), "--quiet"]
    assert cli_main(argv) == 0
    return json.loads(path.read_text())


def test_parameter_set(bench):
    shapes = gpt_shapes(*parse_size(SIZE))
    assert bench["numel"] == sum(math.prod(s) for s in shapes)
    assert bench["sum_of_dims"] == sum(sum(s) for s in shapes)
    assert [r["world_size"] for r in bench["rows"]] == list(WORLD_SIZES)
    assert bench["threads"] == 1


def test_communication_bytes(bench):
    numel, sum_of_dims = bench["numel"], bench["sum_of_dims"]
    for row in bench["rows"]:
        w = row["world_size"]
        assert row["grad_allreduce_bytes"] == 4 * numel
        if w == 1:
            assert row["allreduce_bytes"] == row["allgather_bytes"] == 0
            assert row["allreduce_calls"] == row["allgather_calls"] == 0
            continue
        assert row["allreduce_bytes"] == 4 * sum_of_dims  # the MaxReducer buffer: fp32, sum of dims
        assert row["allreduce_bytes"] < row["grad_allreduce_bytes"]
        assert row["allreduce_calls"] == row["allgather_calls"] == 1  # bucketed: one of each per step
        assert row["allgather_bytes"] == 4 * w * math.ceil(numel / w)


def test_state_bytes(bench):
    shapes = gpt_shapes(*parse_size(SIZE))
    numel, sum_of_dims = bench["numel"], bench["sum_of_dims"]
    single = bench["rows"][0]
    assert single["momentum_bytes"] == [4 * numel]
    assert single["accumulator_bytes"] == [4 * sum_of_dims]
    for row in bench["rows"]:
        w = row["world_size"]
        owned = [
            sum(b - a for a, b in FlatPartition(tuple(math.prod(s) for s in shapes), w).owned(r)) for r in range(w)
        ]
        assert row["owned_numel"] == owned
        assert row["momentum_bytes"] == [4 * n for n in owned]  # momentum 0.9: one fp32 per owned element
        state = [m + a for m, a in zip(row["momentum_bytes"], row["accumulator_bytes"])]
        assert row["state_bytes_max"] == max(state)
        assert row["state_bytes_total"] == sum(state)
        # every accumulator entry is held by at least one rank; a slice boundary inside a parameter can
        # duplicate at most that parameter's sum of dims
        overlap = 4 * max(sum(s) for s in shapes) * (w - 1)
        assert 4 * sum_of_dims <= sum(row["accumulator_bytes"]) <= 4 * sum_of_dims + overlap
        if w > 1:
            assert row["state_bytes_max"] < single["state_bytes_max"]


def test_step_times(bench):
    for row in bench["rows"]:
        assert len(row["step_ms_samples"]) == 3
        assert row["step_ms_median"] > 0
        assert (row["grad_allreduce_ms_median"] > 0) == (row["world_size"] > 1)


def test_table_shows_the_numbers(bench):
    table = format_table(bench)
    lines = [line for line in table.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(lines) == len(WORLD_SIZES)
    for line, row in zip(lines, bench["rows"]):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[0] == str(row["world_size"])
        assert cells[7] == f"{row['step_ms_median']:.2f}"
    assert "1/" in lines[1]  # the reduction's share of a gradient all-reduce


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--size", "huge"], "--size must be one of"),
        (["--world-sizes", "0,2"], "positive integers"),
        (["--world-sizes", "two"], "--world-sizes"),
        (["--momentum", "1.5"], "--momentum and --beta"),
        (["--steps", "0"], "--steps must be >= 1"),
        (["--threads", "0"], "--threads must be >= 1"),
    ],
)
def test_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
