"""``python -m sm3_dist.kernels.cuda --check|--bench``: the kernels against the eager CPU kernel, and timed."""

from __future__ import annotations

from collections.abc import Sequence

import sm3_dist.kernels.cuda as package

from .benchmark import bench
from .checking import check


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m sm3_dist.kernels.cuda", description=package.__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="compare the kernels with the eager CPU kernel")
    parser.add_argument("--bench", action="store_true", help="time the step against Adam(fused=True)")
    parser.add_argument("--tune", action="store_true", help="with --bench: try a few tile shapes first")
    parser.add_argument("--params", default="50257,1024,24", help="VOCAB,WIDTH,BLOCKS of the GPT-like set")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dump", metavar="DIR", help="with --bench: write the update kernel's IR and PTX there")
    args = parser.parse_args(argv)
    if not (args.check or args.bench):
        parser.error("give --check and/or --bench")
    status = 0
    if args.check:
        results = check(args.device)
        for r in results:
            detail = r.get("error") or ", ".join(r.get("mismatches", []))
            print(f"[check] {'ok  ' if r['ok'] else 'FAIL'} {r['name']}{': ' + detail if detail else ''}", flush=True)
        status = 0 if all(r["ok"] for r in results) else 1
    if args.bench:
        from sm3_dist.tools.bench.shapes import gpt_shapes

        vocab, width, blocks = (int(x) for x in args.params.split(","))
        bench(
            gpt_shapes(vocab, width, blocks),
            device=args.device,
            steps=args.steps,
            rounds=args.rounds,
            tune=args.tune,
            dump=args.dump,
        )
    return status


if __name__ == "__main__":
    raise SystemExit(main())
