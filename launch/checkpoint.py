"""Preemption-safe checkpoints for the training job: atomic step directories, each with a manifest.

A checkpoint of step ``N`` is the directory ``CHECKPOINT_DIR/step_000000N``::

    step_0000006/
        manifest.json    what was saved (below), and every file's size and sha256
        complete         an empty marker, written just before the directory gets its final name
        trainer.pt       the job's own state (step, learning-rate schedule, Polyak average)
        dcp/ | deepspeed/ | accelerate/    the framework's checkpoint

**Writing** (:class:`CheckpointWriter`): rank 0 clears what interrupted saves
left behind and creates an empty staging directory ``.staging.step_000000N``;
after a barrier every rank writes its part there; after a second barrier the
file list is split across the ranks, each rank hashes (sha256) and ``fsync``s
its share, and rank 0 writes the manifest and the ``complete`` marker, syncs
them, renames the staging directory to ``step_000000N`` (``os.replace``, atomic
on POSIX) and syncs the parent directory. Only then are older checkpoints
removed, keeping the newest ``keep``. A process killed at any point leaves
either the previous checkpoints untouched plus a hidden staging directory
(removed by the next save, never resumed from), or the new checkpoint complete.

**The manifest** records the step, world size, setup, optimizer name, model
size and shape, ZeRO stage, the optimizer configuration (hyperparameters and
learning-rate schedule) with its sha256, and the files. :func:`verify` checks a
checkpoint against the run that wants to resume from it (:class:`Expected`)
before anything is loaded, cheap checks first and file hashes last, and raises
:class:`CheckpointError` naming the file and the mismatch. :func:`resolve`
picks the checkpoint for ``--resume``: a named one must pass; with ``auto`` the
newest that passes is taken and the newer ones are reported as skipped.

The test-only fault points (``staged``, ``manifest``, ``renamed``) of a save are
:func:`sm3_dist.launch.faults.fault` calls.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sm3_dist.launch.faults import fault

from sm3_dist import comm

__all__ = [
    "DONE_FILE",
    "FORMAT",
    "MANIFEST_FILE",
    "PREFIX",
    "CheckpointError",
    "CheckpointWriter",
    "Expected",
    "config_hash",
    "list_checkpoints",
    "resolve",
    "step_of",
    "verify",
]

PREFIX = "step_"
MANIFEST_FILE = "manifest.json"
DONE_FILE = "complete"
FORMAT = 1
"""Version of the manifest's layout."""
STAGING_PREFIX = ".staging."
REPLACED_PREFIX = ".replaced."
_CHUNK = 1 << 20


class CheckpointError(Exception):
    """A checkpoint this run cannot resume from; the message names the file and the mismatch."""


# ---------------------------------------------------------------------------------------------- identity


def config_hash(config: Mapping[str, Any]) -> str:
    """sha256 of a configuration's canonical JSON (sorted keys, no whitespace)."""
    text = json.dumps(config, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _plain(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists)."""
    return json.loads(json.dumps(value))


@dataclass(frozen=True, slots=True)
class Expected:
    """What a checkpoint must match for this run to resume from it."""

    setup: str
    """``ddp``, ``sharded``, ``fsdp2`` or ``deepspeed``."""
    optimizer: str
    """The optimizer's name (``sm3``, ``adamw``, ...)."""
    model_size: str
    """The ``--model-size`` name."""
    model: Mapping[str, Any]
    """The model's shape: layers, width, heads, vocabulary, positions."""
    optimizer_config: Mapping[str, Any]
    """Hyperparameters and learning-rate schedule; compared through :func:`config_hash`."""
    world_size: int
    """Processes of this run."""
    reshardable: bool
    """Whether this setup loads a checkpoint saved at another world size (DCP: yes; DeepSpeed: no)."""
    zero_stage: int | None = None
    """DeepSpeed's ZeRO stage (``None`` for other setups, or when a launcher fixes it later)."""

    def manifest(self, step: int, files: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """The manifest of a checkpoint of ``step`` that this run writes."""
        return {
            "format": FORMAT,
            "step": step,
            "world_size": self.world_size,
            "setup": self.setup,
            "optimizer": self.optimizer,
            "model_size": self.model_size,
            "model": _plain(self.model),
            "zero_stage": self.zero_stage,
            "reshardable": self.reshardable,
            "optimizer_config": _plain(self.optimizer_config),
            "optimizer_config_sha256": config_hash(_plain(self.optimizer_config)),
            "created_unix": time.time(),
            "files": list(files),
        }


# ---------------------------------------------------------------------------------------------- reading


def step_of(path: Path) -> int | None:
    """The step of a ``step_N`` directory name, or ``None`` for any other name."""
    name = path.name
    if not name.startswith(PREFIX) or not name[len(PREFIX) :].isdigit():
        return None
    return int(name[len(PREFIX) :])


def list_checkpoints(root: Path) -> list[Path]:
    """The ``step_N`` directories under ``root``, newest (highest step) first; hidden staging ones excluded."""
    if not root.is_dir():
        return []
    found = [d for d in root.iterdir() if d.is_dir() and step_of(d) is not None]
    return sorted(found, key=lambda d: step_of(d) or 0, reverse=True)


def _sha256(path: Path, *, sync: bool = False) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
        if sync:
            os.fsync(f.fileno())
    return digest.hexdigest()


def _read_manifest(path: Path) -> dict[str, Any]:
    file = path / MANIFEST_FILE
    if not file.is_file():
        raise CheckpointError(f"{file}: no manifest (deleted, or the save never finished)")
    try:
        manifest = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: not valid JSON ({e}): the manifest is corrupted") from None
    if not isinstance(manifest, dict):
        raise CheckpointError(f"{file}: not a JSON object: the manifest is corrupted")
    return manifest


def _need(manifest: Mapping[str, Any], key: str, file: Path) -> Any:
    if key not in manifest:
        raise CheckpointError(f"{file}: the manifest lacks {key!r} (corrupted, or written by another tool)")
    return manifest[key]


def verify(path: Path, expected: Expected) -> dict[str, Any]:
    """The manifest of ``path`` if this run can resume from it; else :class:`CheckpointError`.

    Nothing is loaded: the identity is checked first (setup, optimizer, model,
    world size where the setup cannot reshard, optimizer configuration), then
    every file the manifest lists (present, same size, same sha256).
    """
    path = Path(path)
    file = path / MANIFEST_FILE
    if not (path / DONE_FILE).exists():
        raise CheckpointError(f"{path / DONE_FILE}: missing: the checkpoint is incomplete")
    manifest = _read_manifest(path)
    for key, mine in (
        ("setup", expected.setup),
        ("optimizer", expected.optimizer),
        ("model_size", expected.model_size),
    ):
        saved = _need(manifest, key, file)
        if saved != mine:
            raise CheckpointError(f"{file}: checkpoint saved with {key}={saved!r}, this run has {mine!r}")
    step = _need(manifest, "step", file)
    if step_of(path) is not None and step != step_of(path):
        raise CheckpointError(f"{file}: the manifest says step {step}, the directory name says {step_of(path)}")
    world = _need(manifest, "world_size", file)
    reshardable = manifest.get("reshardable", manifest["setup"] != "deepspeed")
    if not (reshardable and expected.reshardable) and world != expected.world_size:
        raise CheckpointError(
            f"{file}: checkpoint holds {manifest['setup']} state of {world} ranks, which this setup cannot "
            f"reshard; resume it on {world} processes (this run has {expected.world_size})"
        )
    saved_stage = manifest.get("zero_stage")
    if expected.zero_stage is not None and saved_stage is not None and saved_stage != expected.zero_stage:
        raise CheckpointError(
            f"{file}: checkpoint saved with ZeRO stage {saved_stage}, this run has stage {expected.zero_stage}"
        )
    model = _need(manifest, "model", file)
    mine_model = _plain(expected.model)
    if model != mine_model:
        diff = _differences(model, mine_model)
        raise CheckpointError(f"{file}: checkpoint of another model: {diff}")
    saved_hash = _need(manifest, "optimizer_config_sha256", file)
    mine_config = _plain(expected.optimizer_config)
    if saved_hash != config_hash(mine_config):
        saved_config = manifest.get("optimizer_config")
        diff = _differences(saved_config, mine_config) if isinstance(saved_config, dict) else "(not recorded)"
        raise CheckpointError(
            f"{file}: optimizer config hash {saved_hash[:12]}... differs from this run's "
            f"{config_hash(mine_config)[:12]}...: {diff}"
        )
    files = _need(manifest, "files", file)
    if not isinstance(files, list) or not files:
        raise CheckpointError(f"{file}: the manifest lists no files (corrupted)")
    for entry in files:
        _verify_file(path, entry, file)
    return manifest


def _differences(saved: Mapping[str, Any], mine: Mapping[str, Any]) -> str:
    keys = sorted(set(saved) | set(mine))
    parts = [f"{k}={saved.get(k, '<absent>')!r} in the checkpoint, {mine.get(k, '<absent>')!r} in this run"
             for k in keys if saved.get(k) != mine.get(k)]  # fmt: skip
    return "; ".join(parts) or "(the recorded values agree; the hash does not)"


def _verify_file(root: Path, entry: Any, manifest_file: Path) -> None:
    try:
        name, size, digest = entry["path"], int(entry["bytes"]), str(entry["sha256"])
    except (TypeError, KeyError, ValueError):
        raise CheckpointError(f"{manifest_file}: malformed file entry {entry!r}") from None
    file = (root / name).resolve()
    if root.resolve() not in file.parents:
        raise CheckpointError(f"{manifest_file}: file entry {name!r} points outside the checkpoint")
    if not file.is_file():
        raise CheckpointError(f"{root / name}: missing (the manifest lists it)")
    found = file.stat().st_size
    if found != size:
        raise CheckpointError(f"{root / name}: {found} bytes, the manifest says {size} (truncated or overwritten)")
    if _sha256(file) != digest:
        raise CheckpointError(f"{root / name}: sha256 differs from the manifest (corrupted)")


def resolve(spec: str, root: Path, expected: Expected) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The checkpoint ``--resume spec`` names, verified, and the newer ones skipped (``auto`` only).

    ``auto``: the newest checkpoint under ``root`` that passes :func:`verify`
    (``None`` when there is none yet); when every one fails, the error lists them.
    A step directory, or a checkpoint directory (its newest): that one must pass.
    """
    if spec == "auto":
        skipped: list[tuple[Path, str]] = []
        for path in list_checkpoints(root):
            try:
                verify(path, expected)
            except CheckpointError as e:
                skipped.append((path, str(e)))
                continue
            return path, skipped
        if skipped:
            reasons = "\n  ".join(reason for _, reason in skipped)
            raise CheckpointError(f"--resume auto: no usable checkpoint in {root}:\n  {reasons}")
        return None, []
    path = Path(spec)
    if not ((path / DONE_FILE).exists() or (path / MANIFEST_FILE).exists() or step_of(path) is not None):
        found = list_checkpoints(path)
        if not found:
            raise CheckpointError(
                f"--resume {spec!r}: no complete checkpoint there (a {PREFIX}N directory is expected)"
            )
        path = found[0]
    if not path.is_dir():
        raise CheckpointError(f"--resume {spec!r}: no complete checkpoint there (a {PREFIX}N directory is expected)")
    verify(path, expected)
    return path, []


# ---------------------------------------------------------------------------------------------- writing


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _files_under(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


class CheckpointWriter:
    """Writes step directories atomically from every rank of a job (protocol in the module docstring).

    ``save`` is collective: every rank calls it with the same step. ``write(staging)``
    is called on every rank and writes that rank's part into ``staging``.
    """

    def __init__(self, root: Path, *, rank: int, world_size: int, keep: int) -> None:
        self.root = Path(root)
        self.rank = rank
        self.world_size = world_size
        self.keep = keep

    def staging(self, step: int) -> Path:
        return self.root / f"{STAGING_PREFIX}{PREFIX}{step:07d}"

    def final(self, step: int) -> Path:
        return self.root / f"{PREFIX}{step:07d}"

    def save(self, step: int, write: Callable[[Path], None], expected: Expected) -> Path:
        staging = self.staging(step)
        if self.rank == 0:
            self._clear_leftovers()
            staging.mkdir(parents=True)
        comm.barrier()
        write(staging)
        comm.barrier()
        fault("staged", step, self.rank)
        names = comm.broadcast_object(_files_under(staging) if self.rank == 0 else None)
        mine = [
            {"path": name, "bytes": (staging / name).stat().st_size, "sha256": _sha256(staging / name, sync=True)}
            for name in names[self.rank :: self.world_size]
        ]
        gathered = comm.all_gather_object(mine)
        if self.rank == 0:
            files = sorted((e for part in gathered for e in part), key=lambda e: e["path"])
            self._commit(step, staging, expected.manifest(step, files))
        comm.barrier()
        return self.final(step)

    def _clear_leftovers(self) -> None:
        if not self.root.is_dir():
            return
        for d in self.root.iterdir():
            if d.name.startswith((STAGING_PREFIX, REPLACED_PREFIX)):
                shutil.rmtree(d, ignore_errors=True)

    def _commit(self, step: int, staging: Path, manifest: dict[str, Any]) -> None:
        _write_synced(staging / MANIFEST_FILE, json.dumps(manifest, indent=1) + "\n")
        _write_synced(staging / DONE_FILE, "")
        for d in {staging} | {(staging / e["path"]).parent for e in manifest["files"]}:
            _fsync_dir(d)
        fault("manifest", step, self.rank)
        final = self.final(step)
        replaced = None
        if final.exists():  # a checkpoint of this step from before a resume from an older one
            replaced = self.root / f"{REPLACED_PREFIX}{final.name}"
            shutil.rmtree(replaced, ignore_errors=True)
            os.replace(final, replaced)
        os.replace(staging, final)
        _fsync_dir(self.root)
        fault("renamed", step, self.rank)
        if replaced is not None:
            shutil.rmtree(replaced, ignore_errors=True)
        self._prune(step)

    def _prune(self, step: int) -> None:
        """Keep this step's checkpoint and the ``keep - 1`` newest older ones (0: keep all).

        Newer ones (left by a run that this one resumed before) are replaced when
        this run saves their step, not removed here.
        """
        if self.keep <= 0:
            return
        older = [d for d in list_checkpoints(self.root) if (step_of(d) or 0) < step]
        for d in older[self.keep - 1 :]:
            shutil.rmtree(d, ignore_errors=True)
