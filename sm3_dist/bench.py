"""``sm3-dist bench``: time one optimizer step, side by side, against the memory-bandwidth bound.

All optimizers step the same parameters and gradients of a GPT-style parameter
set (by default: embedding 16384x512 and 6 blocks of width 512, ~27M
parameters), interleaved round by round so that they share the machine's noise.
For each: the median and interquartile range of the step time, the ratio to
``torch.optim.Adam(fused=True)``, the optimizer state, the bytes the step must
move at the least (its algorithm's reads and writes of per-parameter tensors),
and the time those bytes take at the bandwidth of a large tensor copy measured
in the same run. On CUDA also the kernel launches of one step (counted with
``torch.profiler``) and its host synchronizations (warnings of
``torch.cuda.set_sync_debug_mode("warn")``); ``--sync-error`` runs one more step
of every SM3 row under ``set_sync_debug_mode("error")``, ``--check`` first
compares the CUDA kernels with the eager CPU kernel on a few shapes, and
``--fsdp2`` adds the parameter set FSDP2-sharded on a one-rank mesh.

``sm3-dist bench --distributed ...`` runs :mod:`sm3_dist.bench_distributed` instead.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

from sm3_dist.optimizer import SM3

__all__ = ["PRESETS", "Row", "gpt_shapes", "main", "plot", "run"]

PRESETS = {"gpt": (16384, 512, 6), "small": (4096, 256, 4), "tiny": (256, 32, 1)}
"""Parameter sets as ``(vocab, width, blocks)``."""


def gpt_shapes(vocab: int, d: int, blocks: int) -> list[tuple[int, ...]]:
    """Parameter shapes of a GPT-style model: embedding, blocks (qkv, proj, MLP, biases, layernorms), final norm."""
    shapes: list[tuple[int, ...]] = [(vocab, d)]
    for _ in range(blocks):
        shapes += [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,)]  # ln1, attention
        shapes += [(d,), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,)]  # ln2, MLP
    shapes += [(d,), (d,)]
    return shapes


def parse_params(spec: str) -> list[tuple[int, ...]]:
    """A preset name (``gpt``, ``small``, ``tiny``) or ``VOCAB,WIDTH,BLOCKS``."""
    if spec in PRESETS:
        return gpt_shapes(*PRESETS[spec])
    try:
        vocab, d, blocks = (int(x) for x in spec.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--params must be one of {sorted(PRESETS)} or VOCAB,WIDTH,BLOCKS, got {spec!r}"
        ) from None
    return gpt_shapes(vocab, d, blocks)


@dataclass(slots=True)
class Candidate:
    name: str
    make: Callable[[list[Tensor]], torch.optim.Optimizer]
    bytes_per_param: float
    """Bytes per parameter the step's algorithm reads and writes at the least (fp32 parameters and gradients)."""


@dataclass(slots=True)
class Row:
    name: str
    median_ms: float
    iqr_ms: float
    min_ms: float
    ratio_to_adam_fused: float | None
    state_mib: float
    moved_mb: float
    bound_ms: float
    pct_of_bound: float
    samples: int
    times_ms: list[float] = field(default_factory=list, repr=False)
    launches: int | None = None
    """CUDA kernels one step launches (``None`` off CUDA)."""
    syncs: int | None = None
    """Host synchronizations in one step (``None`` off CUDA)."""
    sync_error: str | None = None
    """With ``--sync-error``: ``"ok"``, or the error a step raised under ``set_sync_debug_mode("error")``."""


def _candidates(lr: float) -> list[Candidate]:
    def sm3(**kw):
        return lambda ps: SM3(ps, lr=lr, **kw)

    # SM3's default nonfinite="skip" reads every gradient once more (4 bytes) before the update

    rows = [
        Candidate("sm3 eager m=0", sm3(foreach=False), 16),
        Candidate("sm3 eager m=0.9", sm3(foreach=False, momentum=0.9), 24),
        Candidate("sm3 eager m=0.9 bf16-mom", sm3(foreach=False, momentum=0.9, momentum_dtype=torch.bfloat16), 20),
        Candidate("sm3 foreach m=0", sm3(foreach=True), 16),
        Candidate("sm3 foreach m=0.9", sm3(foreach=True, momentum=0.9), 24),
        Candidate("sm3 fused m=0", sm3(fused=True), 16),
        Candidate("sm3 fused m=0.9", sm3(fused=True, momentum=0.9), 24),
        Candidate("sm3 fused m=0.9 nonfinite=ignore", sm3(fused=True, momentum=0.9, nonfinite="ignore"), 20),
        Candidate("sm3 fused m=0.9 bf16-mom", sm3(fused=True, momentum=0.9, momentum_dtype=torch.bfloat16), 20),
        Candidate("adam fused", lambda ps: torch.optim.Adam(ps, lr=lr, fused=True), 28),
        Candidate("adam foreach", lambda ps: torch.optim.Adam(ps, lr=lr, foreach=True), 28),
        Candidate("adagrad", lambda ps: torch.optim.Adagrad(ps, lr=lr), 20),
    ]
    try:
        from pytorch_optimizer import SM3 as PeerSM3
    except ImportError:
        print("[bench] pytorch_optimizer not installed: its SM3 row is left out", file=sys.stderr)
    else:
        rows.append(Candidate("pytorch_optimizer sm3 m=0.9", lambda ps: PeerSM3(ps, lr=lr, momentum=0.9), 20))
    return rows


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def count_launches(step: Callable[[], object], device: torch.device) -> int | None:
    """CUDA kernels launched by one call of ``step`` (memory copies and sets not counted); ``None`` off CUDA."""
    if device.type != "cuda":
        return None
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    _sync(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        _sync(device)
    return sum(
        1
        for e in prof.events()
        if e.device_type == DeviceType.CUDA and not e.name.startswith(("Memcpy", "Memset", "[memory]"))
    )


def count_syncs(step: Callable[[], object], device: torch.device) -> int | None:
    """Host synchronizations in one call of ``step`` (``set_sync_debug_mode("warn")`` warnings); ``None`` off CUDA."""
    if device.type != "cuda":
        return None
    _sync(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    _sync(device)
    return sum(1 for w in caught if "synchroniz" in str(w.message))


def sync_error(step: Callable[[], object], device: torch.device) -> str | None:
    """``"ok"`` if one call of ``step`` runs under ``set_sync_debug_mode("error")``, else the error; ``None`` off
    CUDA."""
    if device.type != "cuda":
        return None
    _sync(device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    except RuntimeError as exc:
        return f"error: {str(exc).splitlines()[0][:160]}"
    finally:
        torch.cuda.set_sync_debug_mode(0)
        _sync(device)
    return "ok"


FSDP2_ROW = "sm3 fused m=0.9 fsdp2 world-1"
_STARTED_GROUP: list[bool] = []


def _fsdp2_candidate(lr: float, device: torch.device) -> Candidate:
    """SM3 on the parameter set sharded by FSDP2's ``fully_shard`` over a one-rank mesh (its own copies of the
    parameters and gradients, as DTensors): the sharded path, with its reduction of maxima, through the same
    block plan and fused kernel."""

    def make(params: list[Tensor]) -> torch.optim.Optimizer:
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor import distribute_tensor

        from sm3_dist.comm import free_port

        if not dist.is_initialized():
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(free_port()))
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
            _STARTED_GROUP.append(True)
        mesh = init_device_mesh(device.type, (1,))
        module = torch.nn.ParameterList([torch.nn.Parameter(p.detach().clone()) for p in params])
        fully_shard(module, mesh=mesh)
        sharded = list(module.parameters())
        for p, q in zip(sharded, params):
            p.grad = distribute_tensor(q.grad, mesh, p.placements, src_data_rank=None)
        opt = SM3(sharded, lr=lr, momentum=0.9, fused=True)
        opt._bench_module = module  # kept alive with the optimizer
        return opt

    return Candidate(FSDP2_ROW, make, 24)


class CopyBandwidth:
    """Bytes per second of ``dst.copy_(src)`` on large fp32 tensors, counting the read and the write.

    Sampled before the timed rounds and once in every round, so that it sees the machine as the steps do.
    """

    def __init__(self, device: torch.device, mib: int = 128) -> None:
        self.device = device
        self.src = torch.ones(mib * 2**20 // 4, dtype=torch.float32, device=device)
        self.dst = torch.empty_like(self.src)
        self.dst.copy_(self.src)
        self.seconds: list[float] = []

    def sample(self, reps: int = 1) -> None:
        for _ in range(reps):
            _sync(self.device)
            t0 = time.perf_counter()
            self.dst.copy_(self.src)
            _sync(self.device)
            self.seconds.append(time.perf_counter() - t0)

    @property
    def bytes_per_second(self) -> float:
        return 2 * self.src.numel() * 4 / statistics.median(self.seconds)


def _state_bytes(opt: torch.optim.Optimizer) -> int:
    total = 0
    for state in opt.state.values():
        for key, value in state.items():
            if isinstance(value, Tensor) and key != "step":
                total += value.numel() * value.element_size()
    return total


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) < 2:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def run(
    shapes: list[tuple[int, ...]],
    *,
    device: torch.device,
    rounds: int,
    steps_per_round: int,
    warmup: int,
    only: list[str] | None = None,
    fsdp2: bool = False,
    check_syncs: bool = False,
    progress: Callable[[str], None] = lambda s: None,
) -> dict:
    """Build, warm up and time every candidate; returns the table as a dict (see ``--json``)."""
    torch.manual_seed(0)
    params = [torch.randn(s, device=device, requires_grad=True) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p)
    numel = sum(p.numel() for p in params)
    sum_dims = sum(sum(p.shape) for p in params)
    candidates = _candidates(lr=1e-4) + ([_fsdp2_candidate(1e-4, device)] if fsdp2 else [])
    candidates = [c for c in candidates if only is None or any(o in c.name for o in only)]
    if not candidates:
        raise ValueError(f"--only {only} matches no optimizer")
    progress(f"bandwidth: copying 128 MiB tensors on {device}")
    copy = CopyBandwidth(device)
    copy.sample(reps=5)
    optimizers = []
    for c in candidates:
        progress(f"warm-up ({warmup} steps, the first compiles/builds): {c.name}")
        opt = c.make(params)
        t0 = time.perf_counter()
        for _ in range(warmup):
            opt.step()
        _sync(device)
        progress(f"  {c.name}: warm-up took {time.perf_counter() - t0:.1f} s")
        optimizers.append(opt)
    counted = []
    for c, opt in zip(candidates, optimizers):
        launches, syncs = count_launches(opt.step, device), count_syncs(opt.step, device)
        error = sync_error(opt.step, device) if check_syncs and c.name.startswith("sm3") else None
        counted.append((launches, syncs, error))
        if launches is not None:
            progress(
                f"  {c.name}: {launches} kernel launches, {syncs} host syncs per step" + (f"; {error}" if error else "")
            )
    times: list[list[float]] = [[] for _ in candidates]
    for r in range(rounds):
        progress(f"round {r + 1}/{rounds}")
        copy.sample()
        for k, opt in enumerate(optimizers):
            for _ in range(steps_per_round):
                _sync(device)
                t0 = time.perf_counter()
                opt.step()
                _sync(device)
                times[k].append((time.perf_counter() - t0) * 1e3)
    bandwidth = copy.bytes_per_second
    del copy
    if _STARTED_GROUP:  # the FSDP2 row's one-rank process group
        import torch.distributed as dist

        _sync(device)
        dist.destroy_process_group()
        _STARTED_GROUP.clear()
    medians = {c.name: statistics.median(t) for c, t in zip(candidates, times)}
    adam = medians.get("adam fused")
    rows = []
    for c, opt, t, (launches, syncs, error) in zip(candidates, optimizers, times, counted):
        q1, q2, q3 = _quartiles(t)
        # the per-parameter streams, plus the accumulators' read and the maxima's write for SM3
        moved = c.bytes_per_param * numel + (8 * sum_dims if "sm3" in c.name else 0)
        bound_ms = moved / bandwidth * 1e3
        rows.append(
            Row(
                name=c.name,
                median_ms=q2,
                iqr_ms=q3 - q1,
                min_ms=min(t),
                ratio_to_adam_fused=None if adam is None else q2 / adam,
                state_mib=_state_bytes(opt) / 2**20,
                moved_mb=moved / 1e6,
                bound_ms=bound_ms,
                pct_of_bound=100 * bound_ms / q2,
                samples=len(t),
                times_ms=t,
                launches=launches,
                syncs=syncs,
                sync_error=error,
            )
        )
    return {
        "device": str(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "parameters": numel,
        "tensors": len(params),
        "bandwidth_gb_s": bandwidth / 1e9,
        "rounds": rounds,
        "steps_per_round": steps_per_round,
        "rows": [asdict(r) for r in rows],
    }


def format_table(result: dict) -> str:
    head = (
        f"{result['parameters'] / 1e6:.1f}M parameters in {result['tensors']} tensors on {result['device']} "
        f"({result['threads']} threads, torch {result['torch']}); copy bandwidth {result['bandwidth_gb_s']:.1f} GB/s "
        f"(read + write); {result['rounds']} rounds x {result['steps_per_round']} steps"
    )
    lines = [
        head,
        "",
        "| optimizer | ms/step (median) | IQR ms | min ms | vs Adam fused | state MiB | MB moved/step | bound ms "
        "| % of bound | launches/step | syncs/step |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        ratio = "-" if r["ratio_to_adam_fused"] is None else f"{r['ratio_to_adam_fused']:.2f}x"
        launches = "-" if r.get("launches") is None else str(r["launches"])
        syncs = "-" if r.get("syncs") is None else str(r["syncs"])
        lines.append(
            f"| {r['name']} | {r['median_ms']:.2f} | {r['iqr_ms']:.2f} | {r['min_ms']:.2f} | {ratio} | {r['state_mib']:.1f} "
            f"| {r['moved_mb']:.0f} | {r['bound_ms']:.2f} | {r['pct_of_bound']:.0f}% | {launches} | {syncs} |"
        )
    errors = [(r["name"], r["sync_error"]) for r in result["rows"] if r.get("sync_error")]
    if errors:
        lines += ["", 'One more step of each SM3 row under torch.cuda.set_sync_debug_mode("error"):']
        lines += [f"- {name}: {error}" for name, error in errors]
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    """Each optimizer's step time (median, bar; interquartile range, whisker) against the time its bytes take at
    the measured copy bandwidth (tick), from :func:`run`'s result or its ``--json`` file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"][::-1]
    fig, ax = plt.subplots(figsize=(9, 0.32 * len(rows) + 1.6))
    ys = range(len(rows))
    colors = ["tab:blue" if r["name"].startswith("sm3") else "tab:gray" for r in rows]
    ax.barh(ys, [r["median_ms"] for r in rows], xerr=[r["iqr_ms"] / 2 for r in rows], color=colors, alpha=0.8)
    ax.scatter([r["bound_ms"] for r in rows], ys, marker="|", s=200, color="black", label="bandwidth bound", zorder=3)
    adam = next((r["median_ms"] for r in rows if r["name"] == "adam fused"), None)
    if adam is not None:
        ax.axvline(adam, color="tab:red", lw=1, ls="--", label="Adam(fused=True)")
    ax.set_yticks(list(ys), [r["name"] for r in rows], fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("ms per optimizer step (median; log scale)")
    ax.grid(True, axis="x", which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(
        f"{result['parameters'] / 1e6:.1f}M parameters on {result['device']}, {result['threads']} threads, "
        f"copy {result['bandwidth_gb_s']:.1f} GB/s",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--distributed" in argv:
        rest = [a for a in argv if a != "--distributed"]
        return int(importlib.import_module("sm3_dist.bench_distributed").main(rest) or 0)
    parser = argparse.ArgumentParser(prog="sm3-dist bench", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--params", default="gpt", type=parse_params, help="gpt (default, ~27M), small, tiny, or VOCAB,WIDTH,BLOCKS"
    )
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--rounds", type=int, default=15, help="timed rounds; every optimizer steps in each")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per optimizer per round")
    parser.add_argument("--warmup", type=int, default=8, help="untimed steps first (the first fused step compiles)")
    parser.add_argument("--only", nargs="+", help="only optimizers whose name contains one of these")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads before timing")
    parser.add_argument("--json", metavar="PATH", help="also write the results (with every sample) as JSON")
    parser.add_argument("--plot", metavar="PNG", help="also draw the step times against their bounds (matplotlib)")
    parser.add_argument("--distributed", action="store_true", help="run sm3_dist.bench_distributed instead")
    parser.add_argument(
        "--check", action="store_true", help="first compare the CUDA kernels with the eager CPU kernel (needs CUDA)"
    )
    parser.add_argument(
        "--sync-error",
        action="store_true",
        help='one more step of every SM3 row under torch.cuda.set_sync_debug_mode("error") (CUDA)',
    )
    parser.add_argument("--fsdp2", action="store_true", help=f"add the row {FSDP2_ROW!r}")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = parser.parse_args(argv)
    shapes = args.params
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA device is available")
    if args.threads:
        torch.set_num_threads(args.threads)
    if min(args.rounds, args.steps) < 1 or args.warmup < 0:
        parser.error("--rounds and --steps must be >= 1, --warmup >= 0")
    start = time.perf_counter()

    def progress(msg: str) -> None:
        if not args.quiet:
            print(f"[bench {time.perf_counter() - start:6.1f}s] {msg}", file=sys.stderr, flush=True)

    status = 0
    if args.check:
        status = check(device, progress)
    result = run(
        shapes,
        device=device,
        rounds=args.rounds,
        steps_per_round=args.steps,
        warmup=args.warmup,
        only=args.only,
        fsdp2=args.fsdp2,
        check_syncs=args.sync_error,
        progress=progress,
    )
    result["command"] = "sm3-dist bench " + " ".join(argv)
    print(format_table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    if args.plot:
        plot(result, args.plot)
    if any(r.get("sync_error") not in (None, "ok") for r in result["rows"]):
        status = 1
    return status if all(math.isfinite(r["median_ms"]) for r in result["rows"]) else 1


def check(device: torch.device, progress: Callable[[str], None] = lambda s: None) -> int:
    """The fused CUDA kernels against the eager CPU kernel on a few shapes (:func:`sm3_dist._triton.check`);
    prints one line per case and returns 0 when all are bitwise equal."""
    if device.type != "cuda":
        print(f"--check compares the CUDA kernels with the eager CPU kernel: nothing to check on {device}")
        return 0
    try:
        from sm3_dist import _triton
    except ImportError as exc:
        print(f"--check: the Triton kernel is unavailable ({exc}); install the gpu extra")
        return 1
    progress("check: the Triton kernels against the eager CPU kernel")
    results = _triton.check(device)
    for r in results:
        detail = "" if r["ok"] else f": {r.get('error') or r.get('mismatches')}"
        print(f"check {'ok  ' if r['ok'] else 'FAIL'} {r['name']}{detail}")
    failed = sum(1 for r in results if not r["ok"])
    print(f"check: {len(results) - failed}/{len(results)} cases bitwise equal to the eager CPU kernel\n")
    return 1 if failed else 0
