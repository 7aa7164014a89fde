"""``sm3-dist train``: a GPT-2 language model trained with SM3 (or a baseline) on byte-level text.

With no arguments it starts 2 CPU processes (gloo), trains a tiny GPT-2 on
``pydoc_data.topics`` with plain DDP and prints its metrics. The same file is a
script for the usual launchers, which it detects from ``RANK``/``WORLD_SIZE``
(it then starts no processes of its own)::

    sm3-dist train                                         # 2 CPU processes, DDP, SM3
    sm3-dist train --compare sm3,adamw                     # both at equal steps, one PNG
    torchrun --nproc-per-node 2 launch/train.py --setup fsdp2
    deepspeed --num_gpus 2 launch/train.py --setup deepspeed --deepspeed-config launch/deepspeed/zero2.json
    accelerate launch --config_file launch/accelerate/deepspeed_zero2.yaml launch/train.py

Every run writes ``metrics.jsonl`` and ``loss.png`` into ``--out``
(:mod:`.metrics`); bad input is reported before any process group starts, with
exit code 2 (:mod:`.config`). ``--checkpoint-every N`` writes atomic,
verified checkpoints and ``--resume auto`` restarts a killed job from the
newest good one (:mod:`.checkpoint`); ``--pg-timeout`` and ``--step-timeout``
bound every wait (:mod:`.watchdog`). How a setup distributes the model is its
backend's business (:mod:`.backends`); the loop is :mod:`.loop`.
"""

from __future__ import annotations

import sys

from sm3_dist.launch import launcher, loop
from sm3_dist.launch.config import UsageError, build_parser, validate

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        plan = validate(args)
    except UsageError as e:
        print(f"sm3-dist train: error: {e}", file=sys.stderr)
        return 2
    if plan.args.compare:
        return launcher.compare(args, plan)
    if plan.launched:  # a rank started by torchrun, accelerate or deepspeed: it ends its process when done
        return loop.run(plan, exit_after=True)
    return launcher.spawn(plan)


if __name__ == "__main__":
    sys.exit(main())
