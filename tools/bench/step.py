"""One optimizer step timed, every kernel side by side: the rows of ``sm3-dist bench`` and their measurement.

All optimizers step the same parameters and gradients, interleaved round by
round so that they share the machine's noise; :class:`CopyBandwidth` measures
the bound in the same run. On CUDA also the kernel launches (:func:`count_launches`)
and host synchronizations (:func:`count_syncs`, :func:`sync_error`) of one step,
and :func:`check` compares the CUDA kernels with the eager CPU kernel.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from sm3_dist import SM3, local_state_bytes

__all__ = ["FSDP2_ROW", "Candidate", "CopyBandwidth", "Row", "check", "count_launches", "count_syncs", "run"]


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


def _candidates(lr: float, cpu: bool = True) -> list[Candidate]:
    from sm3_dist.launch.defaults import SM3_RECOMMENDED

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
        # the recommended setting (moving average, bias correction, update clip): the same bytes, more arithmetic
        Candidate("sm3 fused recommended", sm3(fused=True, **SM3_RECOMMENDED), 24),
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
    if cpu:
        rows += _deepspeed_cpu_adam(lr)
    return rows


def _deepspeed_cpu_adam(lr: float) -> list[Candidate]:
    """DeepSpeed's ZeRO-Offload CPU Adam (its C++ op, JIT-built with the system compiler at first use), where
    deepspeed is installed."""
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        print("[bench] deepspeed not installed: its DeepSpeedCPUAdam row is left out", file=sys.stderr)
        return []
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # without CUDA, DeepSpeed's CPU accelerator builds the op

    def make(ps: list[Tensor]) -> torch.optim.Optimizer:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        warn_of_stale_build_lock("cpu_adam", "[bench]")
        return DeepSpeedCPUAdam(ps, lr=lr, adamw_mode=False)

    return [Candidate("deepspeed cpu adam", make, 28)]


def stale_build_lock(name: str) -> Path | None:
    """The lock file of torch's JIT extension build ``name``, where it exists (torch's ``FileBaton`` waits
    without end for a lock that a killed build left behind)."""
    from torch.utils.cpp_extension import _get_build_directory

    lock = Path(_get_build_directory(name, verbose=False)) / "lock"
    return lock if lock.exists() else None


def warn_of_stale_build_lock(name: str, tag: str) -> None:
    """Say on stderr (lines starting with ``tag``) where :func:`stale_build_lock` finds the lock of ``name``."""
    lock = stale_build_lock(name)
    if lock is not None:
        print(
            f"{tag} {lock} exists: a build of DeepSpeed's {name} op holds it or was killed mid-way; torch waits for "
            "it to go away, so if no build is running remove it",
            file=sys.stderr,
        )


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; ``platform.processor()`` elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "Model", "CPU part")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def native_kernel() -> dict | None:
    """The native CPU kernel's build (ISA, vector width, OpenMP, threads), or None with why."""
    from sm3_dist.kernels.cpu import library

    info = library.build_info()
    if info is None:
        return {"isa": None, "vector_width": None, "unavailable": library.unavailable_reason()}
    return {k: info[k] for k in ("isa", "vector_width", "openmp", "max_threads")}


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


def fsdp2_candidate(lr: float, device: torch.device) -> Candidate:
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
    candidates = _candidates(lr=1e-4, cpu=device.type == "cpu") + ([fsdp2_candidate(1e-4, device)] if fsdp2 else [])
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
                state_mib=local_state_bytes(opt) / 2**20,
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
        "cpu": cpu_model(),
        "native": native_kernel() if device.type == "cpu" else None,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "parameters": numel,
        "tensors": len(params),
        "bandwidth_gb_s": bandwidth / 1e9,
        "rounds": rounds,
        "steps_per_round": steps_per_round,
        "rows": [asdict(r) for r in rows],
    }


def check(device: torch.device, progress: Callable[[str], None] = lambda s: None) -> int:
    """The fused CUDA kernels against the eager CPU kernel on a few shapes (:func:`sm3_dist.kernels.cuda.check`);
    prints one line per case and returns 0 when all are bitwise equal."""
    if device.type != "cuda":
        print(f"--check compares the CUDA kernels with the eager CPU kernel: nothing to check on {device}")
        return 0
    try:
        from sm3_dist.kernels import cuda as _triton
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
