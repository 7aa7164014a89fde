"""One rank of a training run: the process group, model, backend and schedule; the loop; evaluation; checkpoints.

:class:`Trainer` never asks which setup runs: the backend
(:mod:`sm3_dist.launch.backends`) builds the distributed model and optimizer
and does the backward pass, the step, the framework's checkpoint and the full
weights. The batches are a pure function of ``(seed, step)``
(:mod:`sm3_dist.launch.data`), so a run resumed from a checkpoint repeats the
uninterrupted one exactly.
"""

from __future__ import annotations

import datetime
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from sm3_dist.launch import checkpoint, faults, metrics
from sm3_dist.launch.backends import backend_for
from sm3_dist.launch.config import Plan, expected_checkpoint
from sm3_dist.launch.data import eval_windows, load_corpus, train_batch
from sm3_dist.launch.defaults import SCHEDULE
from sm3_dist.launch.model import build_model
from sm3_dist.launch.plot import plot_runs
from sm3_dist.launch.watchdog import Watchdog, collectives

import sm3_dist
from sm3_dist import comm
from sm3_dist.averaging import averaged_weights
from sm3_dist.schedules import warmup_cooldown

__all__ = ["TRAINER_FILE", "Trainer", "run"]

TRAINER_FILE = "trainer.pt"
"""In a checkpoint: the job's own state (step, learning-rate schedule, what the backend adds)."""
STARTUP_TIMEOUT_S = 1800.0
"""The watchdog's allowance for startup (imports, DeepSpeed's op builds, loading a checkpoint), if above
``--step-timeout``."""


def _device() -> torch.device:
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        return device
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    given = os.environ.get("OMP_NUM_THREADS", "")
    # the CPU's cores shared among this machine's ranks, unless OMP_NUM_THREADS says (a busy machine: 1)
    torch.set_num_threads(
        int(given) if given.isdigit() and int(given) > 0 else max(1, (os.cpu_count() or 1) // local_world)
    )
    return torch.device("cpu")


class Trainer:
    """One rank of a run: builds the process group, model, optimizer and schedule; trains, evaluates, saves."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.args = args = plan.args
        self.device = _device()
        self.backend = backend_for(plan, self.device)
        self.backend.init_process_group(datetime.timedelta(seconds=args.pg_timeout))
        self.rank, self.world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        self.watchdog = Watchdog(args.step_timeout, self.rank)
        self.watchdog.beat("startup", timeout=max(args.step_timeout, STARTUP_TIMEOUT_S))
        self.out = Path(args.out)
        self.expected = expected_checkpoint(plan)
        self.writer = checkpoint.CheckpointWriter(
            Path(args.checkpoint_dir), rank=self.rank, world_size=self.world, keep=args.keep_checkpoints
        )
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
        self.corpus = load_corpus(args.data)
        model = build_model(args.model_size, n_positions=args.seq_len, seed=args.seed).to(self.device)
        self.n_params = sum(p.numel() for p in model.parameters())
        self.parts = self.backend.build(model)
        self.scheduler = warmup_cooldown(
            self.parts.state_optimizer,
            args.steps,
            warmup_fraction=args.warmup_fraction,
            power=SCHEDULE["power"],
            cooldown_fraction=args.cooldown_fraction,
        )
        self.start_step = 0
        if plan.resume is not None:
            self._load(plan.resume)
        self.log = metrics.MetricsLog(self.out / "metrics.jsonl", enabled=self.rank == 0)

    # ------------------------------------------------------------------ steps

    def _loss(self, windows: torch.Tensor, *, reduction: str = "mean") -> torch.Tensor:
        windows = windows.to(self.device, non_blocking=True)
        logits = self.parts.model(input_ids=windows[:, :-1]).logits
        return F.cross_entropy(logits.flatten(0, 1).float(), windows[:, 1:].flatten(), reduction=reduction)

    def train_step(self, step: int) -> float:
        """One optimizer step on this step's batch; the loss averaged over the ranks (NaN if not finite)."""
        args = self.args
        batch = train_batch(self.corpus.train, step=step, global_batch=args.batch_size, seq_len=args.seq_len,
                            seed=args.seed, rank=self.rank, world_size=self.world)  # fmt: skip
        faults.fault("step", step, self.rank)
        loss = self._loss(batch)
        self.backend.backward(loss)
        if self.backend.gradients_visible and faults.fault("grad", step, self.rank):
            faults.poison_gradients(self.parts.module)
        if self.backend.gradients_visible and args.clip_grad_norm > 0:  # DeepSpeed clips inside its step
            torch.nn.utils.clip_grad_norm_(self.parts.module.parameters(), args.clip_grad_norm)
        self.backend.step()
        self.scheduler.step()
        if self.parts.ema is not None:
            self.parts.ema.update_parameters(self.parts.module)
        value = comm.all_reduce_(loss.detach().float().reshape(1), "sum", None)
        return float(value.item()) / self.world if torch.isfinite(value).all() else float("nan")

    def skipped_steps(self) -> int | None:
        """The optimizer's count of steps skipped for a non-finite gradient (``None`` if it keeps none)."""
        value = getattr(self.parts.state_optimizer, "skipped_steps", None)
        return int(value) if value is not None else None

    def evaluate(self) -> float:
        """Mean held-out loss per token over every rank's windows."""
        args = self.args
        windows = eval_windows(self.corpus.held_out, seq_len=args.seq_len, max_windows=args.eval_windows,
                               rank=self.rank, world_size=self.world)  # fmt: skip
        model = self.parts.model
        model.eval()
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        with torch.no_grad():
            for chunk in windows.split(max(1, args.batch_size // self.world)):
                total[0] += self._loss(chunk, reduction="sum").double()
                total[1] += chunk[:, 1:].numel()
        model.train()
        self.backend.after_eval()
        comm.all_reduce_(total, "sum", None)
        return float(total[0] / total[1])

    def evaluate_polyak(self) -> float | None:
        if self.parts.ema is None:
            return None
        with averaged_weights(self.parts.module, self.parts.ema):
            return self.evaluate()

    # ------------------------------------------------------------------ checkpoints

    def save(self, step: int) -> Path:
        """A checkpoint of ``step``, written atomically with a manifest (collective)."""
        return self.writer.save(step, lambda staging: self._write_checkpoint(staging, step), self.expected)

    def _write_checkpoint(self, path: Path, step: int) -> None:
        extra = self.backend.save(path)
        if self.rank == 0:
            torch.save({"step": step, "scheduler": self.scheduler.state_dict(), **extra}, path / TRAINER_FILE)

    def _load(self, path: Path) -> None:
        trainer = torch.load(path / TRAINER_FILE, weights_only=False, map_location="cpu")
        self.backend.load(path)
        if self.parts.ema is not None and "polyak" in trainer:
            self.parts.ema.load_state_dict(trainer["polyak"])
        self.scheduler.load_state_dict(trainer["scheduler"])
        self.start_step = int(trainer["step"])

    def save_final_weights(self, path: Path) -> None:
        """The full model state dict, written by rank 0 (collective: FSDP2 and ZeRO-3 gather their shards)."""
        state = self.backend.full_weights()
        if self.rank == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save({k: v.detach().cpu().clone() for k, v in state.items()}, path)

    # ------------------------------------------------------------------ the loop

    def _start_record(self) -> dict[str, Any]:
        pids = comm.all_gather_object(os.getpid())
        if self.start_step == 0:
            record = {"kind": "config", "world_size": self.world, "n_params": self.n_params, **vars(self.args)}
        else:
            record = {"kind": "resume", "step": self.start_step, "from": str(self.plan.resume)}
            record["skipped"] = [{"path": path, "reason": reason} for path, reason in self.plan.skipped]
        return {**record, "pids": pids}

    def train(self) -> None:
        args = self.args
        tokens_per_step = args.batch_size * args.seq_len
        self.log.write(self._start_record())
        bar = metrics.progress_bar(total=args.steps, initial=self.start_step, enabled=self.rank == 0,
                                   desc=f"{args.optimizer}/{args.setup}")  # fmt: skip
        if self.rank == 0 and self.start_step == 0:
            bar.write(
                f"GPT-2 {args.model_size} ({self.n_params / 1e6:.2f}M params), {args.setup}, {self.world} "
                f"processes on {self.device.type}, {args.optimizer} lr {args.lr:g}, batch {args.batch_size} x "
                f"{args.seq_len}, {args.steps} steps, corpus {self.corpus.name} "
                f"({self.corpus.train.numel()} train / {self.corpus.held_out.numel()} held-out bytes) -> {self.out}"
            )
        started = time.perf_counter()
        recent: list[float] = []
        loss = eval_loss = float("nan")
        eval_polyak: float | None = float("nan")
        measured_tokens, measured_time = 0, 0.0
        for step in range(self.start_step + 1, args.steps + 1):
            self.watchdog.beat(f"step {step}")
            t0 = time.perf_counter()
            lr = float(self.parts.state_optimizer.param_groups[0]["lr"])
            with collectives(self.rank, step, "training step", args.pg_timeout):
                loss = self.train_step(step)
            dt = time.perf_counter() - t0
            if step > self.start_step + 1:  # the first step pays for warm-up work
                measured_tokens += tokens_per_step
                measured_time += dt
            recent = [*recent[-(args.log_every - 1) :], dt] if args.log_every > 1 else [dt]
            tps = tokens_per_step * len(recent) / sum(recent)
            record = {"kind": "train", "step": step, "loss": loss, "lr": lr, "tokens_per_s": tps, "step_s": dt,
                      "skipped_steps": self.skipped_steps(), **self.backend.step_metrics()}  # fmt: skip
            self.log.write({**record, "elapsed_s": time.perf_counter() - started})
            if not math.isfinite(loss):
                raise FloatingPointError(f"the loss is {loss} at step {step}")
            bar.update(1)
            if step % args.log_every == 0 or step == args.steps:
                bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.3g}", tok_s=f"{tps:.0f}")
            if (args.eval_every and step % args.eval_every == 0) or step == args.steps:
                self.watchdog.beat(f"evaluation at step {step}")
                with collectives(self.rank, step, "evaluation", args.pg_timeout):
                    eval_loss = self.evaluate()
                    eval_polyak = self.evaluate_polyak()
                self.log.write({"kind": "eval", "step": step, "eval_loss": eval_loss, "eval_loss_polyak": eval_polyak})
                if self.rank == 0:
                    extra = f", Polyak {eval_polyak:.4f}" if eval_polyak is not None else ""
                    bar.write(f"step {step}: train loss {loss:.4f}, held-out loss {eval_loss:.4f}{extra}")
            if args.checkpoint_every and (step % args.checkpoint_every == 0 or step == args.steps):
                self.watchdog.beat(f"checkpoint of step {step}")
                with collectives(self.rank, step, "checkpoint", args.pg_timeout):
                    saved = self.save(step)
                if self.rank == 0:
                    bar.write(f"step {step}: checkpoint {saved}")
        bar.close()
        self.watchdog.beat("the end of the run")
        if args.final_weights:
            with collectives(self.rank, args.steps, "final weights", args.pg_timeout):
                self.save_final_weights(Path(args.final_weights))
        wall = time.perf_counter() - started
        mine = (sm3_dist.local_state_bytes(self.parts.state_optimizer), metrics.peak_memory_bytes(self.device))
        per_rank = comm.all_gather_object(mine)
        summary = {
            "kind": "summary",
            "steps": args.steps,
            "final_loss": loss,
            "eval_loss": eval_loss,
            "eval_loss_polyak": eval_polyak,
            "tokens_per_s": measured_tokens / measured_time if measured_time else None,
            "wall_s": wall,
            "optimizer_state_bytes": [s for s, _ in per_rank],
            "peak_memory_bytes": [m for _, m in per_rank],
            "peak_memory_kind": "cuda_max_memory_allocated" if self.device.type == "cuda" else "max_rss",
            "skipped_steps": self.skipped_steps(),
        }
        self.log.write(summary)
        if self.rank == 0:
            print(metrics.summary_text(summary), flush=True)
            if not args.no_plot:
                plot_runs([(args.optimizer, self.out / "metrics.jsonl")], self.out / "loss.png")
                print(f"wrote {self.out / 'metrics.jsonl'} and {self.out / 'loss.png'}", flush=True)

    def close(self, *, destroy_process_group: bool = True) -> None:
        self.watchdog.stop()
        self.log.close()
        if destroy_process_group and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def run(plan: Plan, *, exit_after: bool = False) -> int:
    """Train this rank's part of ``plan`` (the process group comes from the environment).

    ``exit_after``: a rank of a multi-process run ends its process here once its work is closed
    (:func:`sm3_dist.comm.end_process`), leaving the process group to the exit: gloo's destructor holds the GIL
    while it waits for its worker threads, and a worker still releasing the last collective's tensors needs the
    GIL, so destroying the group could hang the rank.
    """
    trainer = Trainer(plan)
    try:
        trainer.train()
    finally:
        trainer.close(destroy_process_group=not exit_after)
    if exit_after:
        comm.end_process(0)
    return 0
