"""ShardedSM3 (ZeRO-1-style SM3 for DDP), exact against single-process SM3.

Every multi-rank run feeds all ranks the same global gradients (or, inside
DistributedDataParallel, the gradients DDP averaged), and its parameters and
consolidated accumulators must be ``torch.equal`` to a plain ``sm3_dist.SM3``
fed the same gradients. The model's sizes are chosen so that at world sizes 2,
3 and 4 a slice boundary cuts a weight mid-row (asserted).
"""

from __future__ import annotations

import copy
import math
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sm3_dist import MOMENTUM_KEY, SM3, STEP_KEY, ShardedSM3, accumulator_key, local_state_bytes
from sm3_dist.sharded import FlatPartition
from tests.common import run_distributed

# the multi-process sessions are shared by the tests of this file: keep them on one xdist worker
pytestmark = pytest.mark.xdist_group("sharded")

LR = 0.05
STEPS = 10
HYPER = [(m, b) for m in (0.0, 0.9) for b in (0.0, 0.9)]
WORLD_SIZES = [2, 3, 4]
VOCAB = 11


class Attention(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.qkv = nn.Parameter(torch.randn(3, dim, dim) / math.sqrt(dim))
        self.qkv_b = nn.Parameter(torch.zeros(3, dim))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (torch.einsum("btd,sed->sbte", x, self.qkv) + self.qkv_b[:, None, None, :]).unbind(0)
        return self.proj(F.scaled_dot_product_attention(q, k, v, is_causal=True))


class TinyTransformer(nn.Module):
    """Embedding, a rank-3 attention weight, rank-2 weights, biases, a scalar."""

    def __init__(self, vocab: int = VOCAB, context: int = 6, dim: int = 6, hidden: int = 10) -> None:
        super().__init__()
        self.pos = nn.Parameter(torch.randn(context, dim) * 0.1)
        self.scale = nn.Parameter(torch.tensor(1.0))
        self.emb = nn.Embedding(vocab, dim)
        self.attn = Attention(dim)
        self.ln = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, hidden)
        self.out = nn.Linear(hidden, dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.emb(tokens[:, :-1]) + self.pos[: tokens.shape[1] - 1]
        x = x + self.attn(x)
        x = x + self.out(F.gelu(self.fc(self.ln(x))))
        logits = self.head(x) * self.scale
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


class Wide(nn.Module):
    """One weight larger than a 4-rank slice (ranks own only part of it), a bf16 parameter; bf16 momentum."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(9, 13))
        self.mix = nn.Parameter(torch.randn(2, 3, 5))
        self.low = nn.Parameter(torch.randn(4, 7).to(torch.bfloat16))
        self.b = nn.Parameter(torch.randn(3))


MODELS = {"transformer": TinyTransformer, "wide": Wide}
EXTRA = {"wide": dict(momentum_dtype=torch.bfloat16)}


def make_model(kind: str = "transformer", seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return MODELS[kind]()


def param_groups(model: nn.Module) -> list[dict]:
    """Two groups: the second with its own lr and weight decay (a scheduler scales both)."""
    params = list(model.parameters())
    return [{"params": params[:-3]}, {"params": params[-3:], "lr": 2 * LR, "weight_decay": 0.01}]


def global_grads(params: list[torch.Tensor], step: int) -> list[torch.Tensor | None]:
    gen = torch.Generator().manual_seed(7919 * (step + 1))
    grads: list[torch.Tensor | None] = []
    for p in params:
        g = torch.randn(p.shape, generator=gen).to(p.dtype)
        if step == 0 and g.dim() >= 2:
            g[0] = 0.0  # a zero slab: accumulator entries that stay 0
        grads.append(g)
    if step == 3:
        grads[1] = None  # a parameter without gradient on every rank: left alone
    return grads


def train(opt, params, steps, start=0, scheduler=None) -> None:
    for step in range(start, start + steps):
        for p, g in zip(params, global_grads(params, step)):
            p.grad = None if g is None else g.clone()
        opt.step()
        if scheduler is not None:
            scheduler.step()


def reference_run(kind: str, momentum: float, beta: float, steps: int = STEPS) -> tuple[list[torch.Tensor], dict]:
    model = make_model(kind)
    opt = SM3(param_groups(model), lr=LR, momentum=momentum, beta=beta, **EXTRA.get(kind, {}))
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5)
    params = list(model.parameters())
    train(opt, params, steps, scheduler=scheduler)
    return [p.detach().clone() for p in params], opt.state_dict()


def cut_mid_row(numels_shapes: list[tuple[int, ...]], world_size: int) -> list[int]:
    """Indices of rank>=2 parameters that a slice boundary cuts inside a row."""
    partition = FlatPartition(numels=tuple(math.prod(s) for s in numels_shapes), world_size=world_size)
    cut = []
    offset = 0
    for k, shape in enumerate(numels_shapes):
        n = math.prod(shape)
        for b in partition.bounds()[1:-1]:
            if len(shape) >= 2 and offset < b < offset + n and (b - offset) % shape[-1]:
                cut.append(k)
        offset += n
    return cut


def expected_local_bytes(shapes: list[tuple[int, ...]], owned, momentum: bool) -> int:
    """Momentum for the owned elements plus the hull of touched indices per accumulator, computed per element."""
    total = 0
    for shape, (a, b) in zip(shapes, owned):
        if b == a:
            continue
        if momentum:
            total += 4 * (b - a)
        if len(shape) <= 1:
            total += 4 * (b - a)
            continue
        idx = torch.unravel_index(torch.arange(a, b), shape)
        total += 4 * sum(int(i.max() - i.min() + 1) for i in idx)
    return total


def assert_state_equal(ours: dict, ref: dict) -> None:
    assert ours["param_groups"] == ref["param_groups"]
    assert sorted(ours["state"]) == sorted(ref["state"])
    for k, entry in ref["state"].items():
        assert sorted(ours["state"][k]) == sorted(entry), k
        for key, value in entry.items():
            assert ours["state"][k][key].dtype == value.dtype, (k, key)
            assert torch.equal(ours["state"][k][key], value), (k, key)


# ---------------------------------------------------------------------- distributed sessions
#
# Spawning processes dominates the run time on a small CPU machine, so each world size runs one session
# that does every job for it: world size 2 also trains the first half of the resume runs and checkpoints
# them; world size 3 resumes from the DCP checkpoint, world size 4 from the consolidated state_dict.

K = 4  # resume: steps before the checkpoint


def _count_collectives() -> dict[str, int]:
    """Wrap the collectives ShardedSM3 issues so that a test can count them."""
    import sm3_dist.comm
    import sm3_dist.sharded

    counts = {"all_gather": 0, "all_reduce": 0, "all_gather_bytes": 0, "all_reduce_bytes": 0}
    gather, launch = sm3_dist.sharded.all_gather_flat, sm3_dist.comm.MaxReducer.launch

    def counted_gather(local, output, group):
        counts["all_gather"] += 1
        counts["all_gather_bytes"] += output.numel() * output.element_size()
        return gather(local, output, group)

    def counted_launch(self):
        counts["all_reduce"] += 1
        counts["all_reduce_bytes"] += self.buffer.numel() * self.buffer.element_size()
        return launch(self)

    sm3_dist.sharded.all_gather_flat = counted_gather
    sm3_dist.comm.MaxReducer.launch = counted_launch
    return counts


def _exactness_job(counts: dict[str, int], runs: list[tuple[str, float, float]]) -> dict:
    results = {}
    for kind, momentum, beta in runs:
        model = make_model(kind)
        params = list(model.parameters())
        opt = ShardedSM3(param_groups(model), lr=LR, momentum=momentum, beta=beta, **EXTRA.get(kind, {}))
        scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5)
        train(opt, params, 1, scheduler=scheduler)
        before = dict(counts)
        train(opt, params, STEPS - 1, start=1, scheduler=scheduler)
        per_step = {key: (counts[key] - before[key]) / (STEPS - 1) for key in counts}
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

    model = make_model()
    ddp = DDP(model)
    opt = ShardedSM3(ddp.parameters(), lr=LR, momentum=0.9, beta=0.9)
    plain = make_model()
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
    model = make_model(seed=123)  # other initial values: everything must come from the checkpoint
    return model, ShardedSM3(param_groups(model), lr=1.0, momentum=0.9, beta=0.9)


def _resume_first_half_job(rank: int, checkpoint_dir: str) -> dict:
    """Train K steps, checkpoint (DCP and a torch.save'd state_dict), then restart the model and optimizer
    objects at the same world size from the file and train on."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    model = make_model()
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
    model = make_model()
    opt = ShardedSM3(param_groups(model), process_group=group, lr=LR, momentum=0.9, beta=0.9)
    assert (opt.world_size, opt.rank) == (2, rank % 2)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5)
    train(opt, list(model.parameters()), STEPS, scheduler=scheduler)
    return dict(
        params=[p.detach().clone() for p in model.parameters()], state=opt.state_dict(), owned=opt.owned_ranges()
    )


def _session_worker(rank: int, world_size: int, jobs: dict) -> dict:
    counts = _count_collectives()
    out = {}
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
EXACT_RUNS = [("transformer", m, b) for m, b in HYPER] + [("wide", 0.9, 0.0)]


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
    shapes = [tuple(p.shape) for p in make_model().parameters()]
    names = [n for n, _ in make_model().named_parameters()]
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
        assert run["per_step"] == {
            "all_gather": 2,
            "all_reduce": 1,
            "all_gather_bytes": comm.allgather_bytes,
            "all_reduce_bytes": comm.allreduce_bytes,
        }
        assert run["state"]["state"][0][MOMENTUM_KEY].dtype == torch.bfloat16


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize(("momentum", "beta"), HYPER, ids=lambda v: str(v))
def test_per_rank_state_bytes(sessions, world_size, momentum, beta):
    shapes = [tuple(p.shape) for p in make_model().parameters()]
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


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_one_bucketed_collective_of_each_kind_per_step(sessions, world_size):
    shapes = [tuple(p.shape) for p in make_model().parameters()]
    for by_run in sessions.exact(world_size):
        run = by_run[("transformer", 0.9, 0.9)]
        comm = run["comm"]
        assert run["per_step"] == {
            "all_gather": 1,
            "all_reduce": 1,
            "all_gather_bytes": comm.allgather_bytes,
            "all_reduce_bytes": comm.allreduce_bytes,
        }
        # the MAX all-reduce carries the sum of the dimensions (fp32); a gradient all-reduce carries numel
        assert comm.allreduce_bytes == 4 * sum(sum(s or (1,)) for s in shapes)
        assert comm.allreduce_bytes < 4 * sum(math.prod(s) for s in shapes)
        chunk = math.ceil(sum(math.prod(s) for s in shapes) / world_size)
        assert comm.allgather_bytes == 4 * world_size * chunk


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

    model = make_model()
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
    model = make_model()
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
    model = make_model(seed=5)
    model.load_state_dict(saved["model"])
    plain = SM3(param_groups(model), lr=LR, momentum=0.9, beta=0.9)
    plain.load_state_dict(copy.deepcopy(saved["optim"]))
    train(plain, list(model.parameters()), STEPS - K, start=K)
    assert all(torch.equal(p.detach(), r) for p, r in zip(model.parameters(), ref_params))
    assert_state_equal(plain.state_dict(), ref_state)

    model = make_model(seed=6)
    model.load_state_dict(saved["model"])
    sharded = ShardedSM3(param_groups(model), lr=LR, momentum=0.9, beta=0.9)
    sharded.load_state_dict(copy.deepcopy(saved["optim"]))
    train(sharded, list(model.parameters()), STEPS - K, start=K)
    assert all(torch.equal(p.detach(), r) for p, r in zip(model.parameters(), ref_params))
    assert_state_equal(sharded.state_dict(), ref_state)


# ---------------------------------------------------------------------- single process: the torch.optim contract


def test_single_process_is_plain_sm3_with_schedulers_and_zero_grad():
    for momentum, beta in HYPER:
        ref_params, ref_state = reference_run("transformer", momentum, beta)
        model = make_model()
        opt = ShardedSM3(param_groups(model), lr=LR, momentum=momentum, beta=beta)
        assert isinstance(opt, torch.optim.Optimizer)
        assert opt.param_groups[0]["params"][0] is next(model.parameters())
        scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5)
        train(opt, list(model.parameters()), STEPS, scheduler=scheduler)
        assert opt.param_groups[0]["lr"] == LR * 0.25
        assert all(torch.equal(p.detach(), r) for p, r in zip(model.parameters(), ref_params))
        assert_state_equal(opt.state_dict(), ref_state)
        opt.zero_grad()
        assert all(p.grad is None for p in model.parameters())
        assert local_state_bytes(opt) == expected_local_bytes(
            [tuple(p.shape) for p in model.parameters()], opt.owned_ranges(), momentum > 0
        )


def test_closure_and_state_keys():
    model = make_model()
    opt = ShardedSM3(model.parameters(), lr=LR, momentum=0.9)
    tokens = torch.randint(0, 11, (2, 6), generator=torch.Generator().manual_seed(0))

    def closure():
        opt.zero_grad()
        loss = model(tokens)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert torch.is_tensor(loss) and loss.dim() == 0
    state = opt.state[model.attn.qkv]
    assert set(state) == {STEP_KEY, MOMENTUM_KEY, *(accumulator_key(d) for d in range(3))}


def test_state_dict_hooks_run():
    model = make_model()
    opt = ShardedSM3(model.parameters(), lr=LR, momentum=0.9)
    train(opt, list(model.parameters()), 2)
    calls = []
    opt.register_state_dict_pre_hook(lambda o: calls.append("pre"))
    opt.register_state_dict_post_hook(lambda o, sd: {**sd, "extra": 1})
    opt.register_load_state_dict_pre_hook(lambda o, sd: {k: v for k, v in sd.items() if k != "extra"})
    opt.register_load_state_dict_post_hook(lambda o: calls.append("load-post"))
    state = opt.state_dict()
    assert state["extra"] == 1
    opt.load_state_dict(state)
    assert calls == ["pre", "load-post"]


def test_flat_partition_geometry():
    part = FlatPartition(numels=(3, 100, 2, 0, 1), world_size=4)
    assert part.bounds() == (0, 26, 53, 79, 106)
    assert part.owned(0) == ((0, 3), (0, 23), (0, 0), (0, 0), (0, 0))
    assert part.owned(1) == ((3, 3), (23, 50), (0, 0), (0, 0), (0, 0))  # only the middle of one parameter
    assert part.owned(3) == ((3, 3), (76, 100), (0, 2), (0, 0), (0, 1))
    with pytest.raises(ValueError, match="rank 4 is outside"):
        part.owned(4)


# ---------------------------------------------------------------------- bad input


def _sparse_grad(opt, model):
    emb = nn.Embedding(4, 3, sparse=True)
    opt = ShardedSM3(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    opt.step()


def _add_group(opt, model):
    opt.add_param_group({"params": [nn.Parameter(torch.zeros(3))]})


def _append_param(opt, model):
    opt.param_groups[0]["params"].append(nn.Parameter(torch.zeros(3)))
    opt.step()


def _drop_param(opt, model):
    opt.param_groups[0]["params"].pop()
    opt.step()


def _replace_storage(opt, model):
    model.head.weight.data = torch.zeros_like(model.head.weight)
    opt.step()


def _other_model_state(opt, model):
    other = nn.Linear(3, 2)
    src = SM3(other.parameters())
    other.weight.grad = torch.ones_like(other.weight)
    other.bias.grad = torch.ones_like(other.bias)
    src.step()
    opt.load_state_dict(src.state_dict())


def _wrong_accumulator_shape(opt, model):
    state = opt.state_dict()
    k = 2
    state["state"][k] = {STEP_KEY: torch.tensor(1.0), "mu_0": torch.zeros(3), "mu_1": torch.zeros(6)}
    opt.load_state_dict(state)


BAD_USE = [
    (_sparse_grad, TypeError, "sparse gradients"),
    (_add_group, ValueError, "partitions its parameters once"),
    (_append_param, ValueError, "param_groups' parameters changed"),
    (_drop_param, ValueError, "param_groups' parameters changed"),
    (_replace_storage, RuntimeError, r"param_groups\[0\]\['params'\]\[13\].*storage was replaced"),
    (_other_model_state, ValueError, "another model"),
    (_wrong_accumulator_shape, ValueError, r"param_groups\[0\]\['params'\]\[2\].*'mu_0' has shape \(3,\)"),
]


@pytest.mark.parametrize(("use", "error", "match"), BAD_USE, ids=lambda v: getattr(v, "__name__", None))
def test_bad_use(use, error, match):
    model = make_model()
    opt = ShardedSM3(model.parameters(), lr=LR)
    for p, g in zip(model.parameters(), global_grads(list(model.parameters()), 0)):
        p.grad = g
    opt.step()
    with pytest.raises(error, match=match):
        use(opt, model)


BAD_CONSTRUCTION = [
    (lambda: ShardedSM3([torch.zeros(3, dtype=torch.float64, requires_grad=True)]), TypeError, "float32, bfloat16"),
    (lambda: ShardedSM3([torch.zeros(4, 3).t().requires_grad_()]), ValueError, r"\(shape \(3, 4\).*contiguous"),
    (lambda: ShardedSM3([torch.zeros(3, requires_grad=True)], lr=-1.0), ValueError, "Invalid lr"),
    (lambda: ShardedSM3([torch.zeros(3, requires_grad=True)], momentum=1.0), ValueError, "Invalid momentum"),
    (lambda: ShardedSM3([torch.zeros(3, requires_grad=True)], shard_resolver=None), TypeError, "no shard_resolver"),
    (lambda: ShardedSM3([torch.zeros(3, requires_grad=True)], process_group=object()), ValueError, "not initialized"),
    (lambda: ShardedSM3([]), ValueError, "empty parameter list"),
]


@pytest.mark.parametrize(("build", "error", "match"), BAD_CONSTRUCTION)
def test_bad_construction(build, error, match):
    with pytest.raises(error, match=match):
        build()
