"""ShardedSM3 (ZeRO-1-style SM3 for DDP), exact against single-process SM3.

Every multi-rank run feeds all ranks the same global gradients (or, inside
DistributedDataParallel, the gradients DDP averaged), and its parameters and
consolidated accumulators must be ``torch.equal`` to a plain ``sm3_dist.SM3``
fed the same gradients. The model's sizes are chosen so that at world sizes 2,
3 and 4 a slice boundary cuts a weight mid-row (asserted).

Multi-process here; the single-process contract and bad input: ``test_sharded_single.py``.
"""

from __future__ import annotations

import copy
import math
import os

import pytest
import torch

from sm3_dist import MOMENTUM_KEY, SM3, ShardedSM3, local_state_bytes
from sm3_dist.sharded import FlatPartition
from tests.common import count_collectives, counts_between, run_distributed
from tests.sharded_cases import (
    EXTRA,
    HYPER,
    LR,
    STEPS,
    VOCAB,
    WORLD_SIZES,
    assert_state_equal,
    cut_mid_row,
    expected_local_bytes,
    make_sharded_model,
    param_groups,
    reference_run,
    train,
)

# the multi-process sessions are shared by the tests of this file: keep them on one xdist worker
pytestmark = pytest.mark.xdist_group("sharded")


# ---------------------------------------------------------------------- distributed sessions
#
# Spawning processes dominates the run time on a small CPU machine, so each world size runs one session
# that does every job for it: world size 2 also trains the first half of the resume runs and checkpoints
# them; world size 3 resumes from the DCP checkpoint, world size 4 from the consolidated state_dict.

K = 4  # resume: steps before the checkpoint


def _exactness_job(counts: dict[str, int], runs: list[tuple[str, float, float]]) -> dict:
    results = {}
    for kind, momentum, beta in runs:
        model = make_sharded_model(kind)
        params = list(model.parameters())
        opt = ShardedSM3(param_groups(model), lr=LR, momentum=momentum, beta=beta, **EXTRA.get(kind, {}))
        scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5)
        train(opt, params, 1, scheduler=scheduler)
        before = dict(counts)
        train(opt, params, STEPS - 1, start=1, scheduler=scheduler)
        per_step = counts_between(before, counts, per=STEPS - 1)
        results[(kind, momentum, beta)] = dict(
            params=[p.detach().clone() for p in params],
            local_bytes=local_state_bytes(opt),
            owned=opt.owned_ranges(),
            comm=opt.comm_volume(),
            per_step=per_step,
            state=opt.state_dict(),
        )
    return results


def _ddp_job(rank: int, steps: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = make_sharded_model()
    ddp = DDP(model)
    opt = ShardedSM3(ddp.parameters(), lr=LR, momentum=0.9, beta=0.9)
    plain = make_sharded_model()
    grads, local_grads, losses = [], [], []
    for step in range(steps):
        gen = torch.Generator().manual_seed(1000 * step + rank)
        tokens = torch.randint(0, VOCAB, (3, 6), generator=gen)
        loss = ddp(tokens)
        loss.backward()
        plain.load_state_dict(model.state_dict())
        plain.zero_grad()
        plain(tokens).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        local_grads.append([p.grad.clone() for p in plain.parameters()])
        losses.append(loss.item())
        opt.step()
        opt.zero_grad()
    return dict(
        params=[p.detach().clone() for p in model.parameters()],
        grads=grads,
        local_grads=local_grads,
        losses=losses,
        state=opt.state_dict(),
    )


def _fresh_model_and_optimizer():
    model = make_sharded_model(seed=123)  # other initial values: everything must come from the checkpoint
    return model, ShardedSM3(param_groups(model), lr=1.0, momentum=0.9, beta=0.9)


def _resume_first_half_job(rank: int, checkpoint_dir: str) -> dict:
    """Train K steps, checkpoint (DCP and a torch.save'd state_dict), then restart the model and optimizer
    objects at the same world size from the file and train on."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    model = make_sharded_model()
    opt = ShardedSM3(param_groups(model), lr=LR, momentum=0.9, beta=0.9)
    train(opt, list(model.parameters()), K)
    dcp.save({"model": model.state_dict(), "optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=checkpoint_dir)
    saved = dict(model=model.state_dict(), optim=opt.state_dict())
    path = os.path.join(checkpoint_dir, "state_dict.pt")
    if rank == 0:
        torch.save(saved, path)
    dist.barrier()
    del model, opt
    model, opt = _fresh_model_and_optimizer()
    loaded = torch.load(path)
    model.load_state_dict(loaded["model"])
    opt.load_state_dict(loaded["optim"])
    train(opt, list(model.parameters()), STEPS - K, start=K)
    return dict(saved=saved, params=[p.detach().clone() for p in model.parameters()], state=opt.state_dict())


def _resume_second_half_job(saved: dict | None, checkpoint_dir: str | None) -> dict:
    """Restart at another world size, from the consolidated state_dict or from the DCP checkpoint."""
    model, opt = _fresh_model_and_optimizer()
    if saved is not None:
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optim"])
    else:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

        template = {"model": model.state_dict(), "optim": get_optimizer_state_dict(model, opt)}
        dcp.load(template, checkpoint_id=checkpoint_dir)
        model.load_state_dict(template["model"])
        set_optimizer_state_dict(model, opt, template["optim"])
    train(opt, list(model.parameters()), STEPS - K, start=K)
    return dict(params=[p.detach().clone() for p in model.parameters()], state=opt.state_dict())


def _subgroup_job(rank: int, world_size: int) -> dict:
    """Two data-parallel groups of two ranks each (as beside tensor or pipeline parallelism)."""
    import torch.distributed as dist

    groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # every rank creates every group
    group = groups[rank // 2]
    model = make_sharded_model()
    opt = ShardedSM3(param_groups(model), process_group=group, lr=LR, momentum=0.9, beta=0.9)
    assert (opt.world_size, opt.rank) == (2, rank % 2)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5)
    train(opt, list(model.parameters()), STEPS, scheduler=scheduler)
    return dict(
        params=[p.detach().clone() for p in model.parameters()], state=opt.state_dict(), owned=opt.owned_ranges()
    )


def _comm_job(counts: dict[str, int]) -> dict:
    """Every collective sm3_dist.comm issues, per phase: ShardedSM3 under each ``nonfinite`` policy (construction,
    first step, a later step, ``state_dict``, ``load_state_dict``) and a plain SM3 on replicated parameters (as
    beside DDP), which reduces nothing."""
    out = {}
    for nonfinite in ("skip", "raise", "ignore"):
        model = make_sharded_model()
        params = list(model.parameters())
        before = dict(counts)
        opt = ShardedSM3(param_groups(model), lr=LR, momentum=0.9, beta=0.9, nonfinite=nonfinite)
        phases = {"construction": counts_between(before, counts)}
        for phase, start in (("first step", 0), ("step", 1)):
            before = dict(counts)
            train(opt, params, 1, start=start)
            phases[phase] = counts_between(before, counts)
        before = dict(counts)
        state = opt.state_dict()
        phases["state_dict"] = counts_between(before, counts)
        before = dict(counts)
        opt.load_state_dict(state)
        phases["load_state_dict"] = counts_between(before, counts)
        out[("sharded", nonfinite)] = phases
    model = make_sharded_model()
    params = list(model.parameters())
    before = dict(counts)
    train(SM3(param_groups(model), lr=LR, momentum=0.9, beta=0.9), params, 2)
    out[("plain", "skip")] = {"construction and 2 steps": counts_between(before, counts)}
    return out


def _session_worker(rank: int, world_size: int, jobs: dict) -> dict:
    counts = count_collectives()
    out = {"comm": _comm_job(counts)}
    if "exact" in jobs:
        out["exact"] = _exactness_job(counts, jobs["exact"])
    if "ddp" in jobs:
        out["ddp"] = _ddp_job(rank, jobs["ddp"])
    if "resume_first" in jobs:
        out["resume_first"] = _resume_first_half_job(rank, jobs["resume_first"])
    if "resume_second" in jobs:
        out["resume_second"] = _resume_second_half_job(*jobs["resume_second"])
    if "subgroup" in jobs:
        out["subgroup"] = _subgroup_job(rank, world_size)
    return out


DDP_STEPS = 6
EXACT_RUNS = [("transformer", m, b) for m, b in HYPER] + [("wide", 0.9, 0.0), ("clipped", 0.9, 0.99)]


class Sessions:
    """One spawned session per world size, run on first use and kept for the module."""

    def __init__(self, checkpoint_dir: str) -> None:
        self.checkpoint_dir = checkpoint_dir
        self._results: dict[int, list[dict]] = {}

    def __call__(self, world_size: int) -> list[dict]:
        if world_size not in self._results:
            jobs: dict = {"exact": EXACT_RUNS}
            if world_size == 2:
                jobs["resume_first"] = self.checkpoint_dir
            elif world_size == 3:
                jobs["ddp"] = DDP_STEPS
                jobs["resume_second"] = (None, self.checkpoint_dir)
            elif world_size == 4:
                jobs["resume_second"] = (self.saved(), None)
                jobs["subgroup"] = True
            if world_size in (3, 4):
                self(2)  # the checkpoint comes first
            self._results[world_size] = run_distributed(_session_worker, world_size, jobs)
        return self._results[world_size]

    def exact(self, world_size: int) -> list[dict]:
        return [r["exact"] for r in self(world_size)]

    def saved(self) -> dict:
        return self(2)[0]["resume_first"]["saved"]


@pytest.fixture(scope="module")
def sessions(tmp_path_factory) -> Sessions:
    return Sessions(str(tmp_path_factory.mktemp("sharded_checkpoint")))


# ---------------------------------------------------------------------- exactness


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_partition_cuts_a_weight_mid_row(world_size):
    shapes = [tuple(p.shape) for p in make_sharded_model().parameters()]
    names = [n for n, _ in make_sharded_model().named_parameters()]
    cut = cut_mid_row(shapes, world_size)
    assert cut, f"no slice boundary cuts a weight mid-row at world size {world_size}"
    if world_size in (3, 4):
        assert names.index("attn.qkv") in cut  # the rank-3 weight straddles two ranks mid-row


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize(("momentum", "beta"), HYPER, ids=lambda v: str(v))
def test_sharded_equals_single_process(sessions, world_size, momentum, beta):
    ref_params, ref_state = reference_run("transformer", momentum, beta)
    for rank, by_run in enumerate(sessions.exact(world_size)):
        run = by_run[("transformer", momentum, beta)]
        for k, (p, r) in enumerate(zip(run["params"], ref_params)):
            assert torch.equal(p, r), f"rank {rank}: parameter {k} differs from single-process SM3"
        assert_state_equal(run["state"], ref_state)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_update_clip_sharded_equals_single_process(sessions, world_size):
    """The update clipped (with bias correction): bitwise single-process SM3, and the clip binds."""
    ref_params, ref_state = reference_run("clipped", 0.9, 0.99)
    unclipped, _ = reference_run("clipped", 0.9, 0.99, update_clip=0.0)
    assert any(not torch.equal(p, q) for p, q in zip(ref_params, unclipped)), "the clip had no effect"
    for rank, by_run in enumerate(sessions.exact(world_size)):
        run = by_run[("clipped", 0.9, 0.99)]
        for k, (p, r) in enumerate(zip(run["params"], ref_params)):
            assert torch.equal(p, r), f"rank {rank}: parameter {k} differs from single-process SM3"
        assert_state_equal(run["state"], ref_state)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_param_larger_than_a_slice_and_bf16_buckets(sessions, world_size):
    ref_params, ref_state = reference_run("wide", 0.9, 0.0)
    results = sessions.exact(world_size)
    owned = [run[("wide", 0.9, 0.0)]["owned"] for run in results]
    if world_size == 4:
        # 178 elements, bounds 0/44/89/133/178: rank 1 owns only the middle of the (9, 13) weight
        assert owned[1] == ((44, 89), (0, 0), (0, 0), (0, 0))
        assert owned[2] == ((89, 117), (0, 16), (0, 0), (0, 0))
    for rank, by_run in enumerate(results):
        run = by_run[("wide", 0.9, 0.0)]
        for k, (p, r) in enumerate(zip(run["params"], ref_params)):
            assert p.dtype == r.dtype
            assert torch.equal(p, r), f"rank {rank}: parameter {k} differs"
        assert_state_equal(run["state"], ref_state)
        comm = run["comm"]
        assert comm.allgather_calls == 2  # one fp32 bucket, one bf16 bucket
        assert run["per_step"] == _per_step(comm, nonfinite="skip")
        assert run["state"]["state"][0][MOMENTUM_KEY].dtype == torch.bfloat16


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize(("momentum", "beta"), HYPER, ids=lambda v: str(v))
def test_per_rank_state_bytes(sessions, world_size, momentum, beta):
    shapes = [tuple(p.shape) for p in make_sharded_model().parameters()]
    results = sessions.exact(world_size)
    full = sum(math.prod(s) for s in shapes)
    covered = 0
    for rank, by_run in enumerate(results):
        run = by_run[("transformer", momentum, beta)]
        assert run["owned"] == FlatPartition(tuple(math.prod(s) for s in shapes), world_size).owned(rank)
        assert run["local_bytes"] == expected_local_bytes(shapes, run["owned"], momentum > 0)
        covered += sum(b - a for a, b in run["owned"])
    assert covered == full
    sizes = [sum(b - a for a, b in by_run[("transformer", momentum, beta)]["owned"]) for by_run in results]
    assert max(sizes) - min(sizes) <= 1  # balanced


MAXIMA = "MaxReducer.launch: all_reduce MAX"
FLAG = "all_reduce_flag_: all_reduce MAX"
GATHER = "all_gather_flat: all_gather"


def _per_step(comm, nonfinite: str) -> dict:
    """Every collective one ShardedSM3 step issues through sm3_dist.comm, and its bytes: the MAX all-reduce of the
    accumulator maxima, the all-gather(s) of the updated parameters and, unless ``nonfinite="ignore"``, the MAX
    all-reduce of the 4-byte non-finite flag (``comm_volume()`` counts the first two only)."""
    out = {
        MAXIMA: comm.allreduce_calls,
        f"{MAXIMA} bytes": comm.allreduce_bytes,
        GATHER: comm.allgather_calls,
        f"{GATHER} bytes": comm.allgather_bytes,
    }
    if nonfinite != "ignore":
        out.update({FLAG: 1, f"{FLAG} bytes": 4})
    return out


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_one_bucketed_collective_of_each_kind_per_step(sessions, world_size):
    """Every collective through sm3_dist.comm is counted (whichever comm function issues it), so an extra one
    fails here: per step one MAX all-reduce of the maxima, one all-gather per parameter dtype and one MAX
    all-reduce of the non-finite flag (not under ``nonfinite="ignore"``); none at construction."""
    shapes = [tuple(p.shape) for p in make_sharded_model().parameters()]
    for by_run in sessions.exact(world_size):
        run = by_run[("transformer", 0.9, 0.9)]
        comm = run["comm"]
        assert (comm.allreduce_calls, comm.allgather_calls) == (1, 1)
        assert run["per_step"] == _per_step(comm, nonfinite="skip")
        # the MAX all-reduce carries the sum of the dimensions (fp32); a gradient all-reduce carries numel
        assert comm.allreduce_bytes == 4 * sum(sum(s or (1,)) for s in shapes)
        assert comm.allreduce_bytes < 4 * sum(math.prod(s) for s in shapes)
        chunk = math.ceil(sum(math.prod(s) for s in shapes) / world_size)
        assert comm.allgather_bytes == 4 * world_size * chunk
    comm = sessions.exact(world_size)[0][("transformer", 0.9, 0.9)]["comm"]
    for rank, result in enumerate(sessions(world_size)):
        for nonfinite in ("skip", "raise", "ignore"):
            phases = result["comm"][("sharded", nonfinite)]
            step = _per_step(comm, nonfinite)
            assert phases["construction"] == {}, (rank, nonfinite)
            assert phases["first step"] == step, (rank, nonfinite)
            assert phases["step"] == step, (rank, nonfinite)
            # state_dict consolidates: the pending maxima are reduced (MaxReducer), the parameters gathered
            consolidate = {k: v for k, v in step.items() if not k.startswith(FLAG)}
            assert phases["state_dict"] == consolidate, (rank, nonfinite)
            assert phases["load_state_dict"] == {}, (rank, nonfinite)
        assert result["comm"][("plain", "skip")] == {"construction and 2 steps": {}}, rank


# ---------------------------------------------------------------------- inside DistributedDataParallel


def test_inside_distributed_data_parallel(sessions):
    """Each rank sees different data; DDP averages. Single-process SM3 fed DDP's averaged gradients matches
    exactly. (The averaged gradient itself equals a locally computed mean only up to rounding: DDP divides
    and sums in gloo's order, so that comparison is approximate; the optimizer's is exact.)"""
    results = [r["ddp"] for r in sessions(3)]
    for run in results[1:]:
        for p, q in zip(run["params"], results[0]["params"]):
            assert torch.equal(p, q)
        for g_step, h_step in zip(run["grads"], results[0]["grads"]):
            assert all(torch.equal(g, h) for g, h in zip(g_step, h_step))
    for step in range(DDP_STEPS):
        for k, g in enumerate(results[0]["grads"][step]):
            mean = sum(run["local_grads"][step][k] for run in results) / len(results)
            torch.testing.assert_close(g, mean, rtol=1e-5, atol=1e-7)
    assert results[0]["losses"] != results[1]["losses"]  # different data per rank

    model = make_sharded_model()
    opt = SM3(model.parameters(), lr=LR, momentum=0.9, beta=0.9)
    for step in range(DDP_STEPS):
        for p, g in zip(model.parameters(), results[0]["grads"][step]):
            p.grad = g.clone()
        opt.step()
    for p, q in zip(model.parameters(), results[0]["params"]):
        assert torch.equal(p.detach(), q)
    assert_state_equal(results[0]["state"], opt.state_dict())


def test_process_subgroups(sessions):
    """World size 4 split into two data-parallel groups of 2: each group is its own exact ShardedSM3."""
    ref_params, ref_state = reference_run("transformer", 0.9, 0.9)
    results = [r["subgroup"] for r in sessions(4)]
    assert results[0]["owned"] == results[2]["owned"] != results[1]["owned"] == results[3]["owned"]
    for run in results:
        assert all(torch.equal(p, r) for p, r in zip(run["params"], ref_params))
        assert_state_equal(run["state"], ref_state)


# ---------------------------------------------------------------------- resume at the same and another world size


def _uninterrupted():
    model = make_sharded_model()
    params = list(model.parameters())
    opt = SM3(param_groups(model), lr=LR, momentum=0.9, beta=0.9)
    train(opt, params, STEPS)
    return [p.detach().clone() for p in params], opt.state_dict()


@pytest.mark.parametrize(
    ("world_size", "job"),
    [(2, "resume_first"), (3, "resume_second"), (4, "resume_second")],
    ids=["2to2-state_dict-file", "2to3-dcp", "2to4-state_dict"],
)
def test_resume_equals_uninterrupted(sessions, world_size, job):
    ref_params, ref_state = _uninterrupted()
    results = sessions(world_size)
    for run in results:
        for p, r in zip(run[job]["params"], ref_params):
            assert torch.equal(p, r)
        assert_state_equal(run[job]["state"], ref_state)
    if world_size == 2:
        assert os.listdir(sessions.checkpoint_dir)
        for run in results[1:]:  # the consolidated state_dict is the same on every rank
            assert_state_equal(run[job]["saved"]["optim"], results[0][job]["saved"]["optim"])


def test_checkpoint_moves_between_sharded_and_plain_sm3(sessions):
    """A ShardedSM3 state_dict is a plain SM3 state_dict, and the other way round (world size 1 here)."""
    saved = sessions.saved()
    ref_params, ref_state = _uninterrupted()
    for cls, seed in ((SM3, 5), (ShardedSM3, 6)):  # other initial values: everything comes from the checkpoint
        model = make_sharded_model(seed=seed)
        model.load_state_dict(saved["model"])
        opt = cls(param_groups(model), lr=LR, momentum=0.9, beta=0.9)
        opt.load_state_dict(copy.deepcopy(saved["optim"]))
        train(opt, list(model.parameters()), STEPS - K, start=K)
        assert all(torch.equal(p.detach(), r) for p, r in zip(model.parameters(), ref_params)), cls.__name__
        assert_state_equal(opt.state_dict(), ref_state)
