"""The sm3-dist command: train, benchmark and study SM3 (one subcommand per entry of SUBCOMMANDS).

Each subcommand lives in its own module and is imported only when called, so
``sm3-dist bench`` never imports transformers and ``sm3-dist memory`` never
starts a process group.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = {
    "train": ("sm3_dist.launch.train", "train a GPT-style language model with SM3 (default: 2 CPU processes)"),
    "bench": ("sm3_dist.tools.bench", "time one optimizer step: SM3 kernels vs Adam, Adagrad and a peer SM3"),
    "memory": ("sm3_dist.tools.memory", "per-rank memory model and the largest model/batch a budget allows"),
    "quality": ("sm3_dist.launch.quality", "learning-rate sweeps: SM3 vs AdamW and Adafactor on held-out loss"),
    "doctor": ("sm3_dist.tools.doctor", "check this installation: environment, kernel correctness, speed; --full"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="sm3-dist", description=__doc__.splitlines()[0])
    parser.add_argument(
        "command", choices=sorted(SUBCOMMANDS), help="; ".join(f"{k}: {v[1]}" for k, v in SUBCOMMANDS.items())
    )
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else 2
    if argv[0] not in SUBCOMMANDS:
        parser.parse_args(argv[:1])  # prints the error and exits 2
    module = importlib.import_module(SUBCOMMANDS[argv[0]][0])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
