"""A CUDA-graph capture of a ``capturable=True`` SM3 step (``python -m sm3_dist.tools.doctor.graph --json PATH``).

The step (fused, momentum 0.9, beta 0.9 with bias correction) is warmed up on a side stream, captured once and
replayed; an eager twin takes the same steps, and the two must end bitwise equal. Run in a process of its own by
``sm3-dist doctor --full`` (a failed capture can leave the CUDA context unusable)."""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

__all__ = ["capture_check"]


def capture_check(replays: int = 5, warmup: int = 3) -> dict:
    from sm3_dist import SM3

    if not torch.cuda.is_available():
        return {"ok": None, "error": "no CUDA device"}
    device = torch.device("cuda")
    torch.manual_seed(0)
    shapes = [(2048, 512), (512,), (64, 96, 3), (7,)]
    start = [torch.randn(s, device=device) for s in shapes]
    grads = [torch.randn(s, device=device) for s in shapes]

    def make():
        params = [torch.nn.Parameter(p.clone()) for p in start]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt = SM3(params, lr=0.01, momentum=0.9, beta=0.9, bias_correction=True, fused=True, capturable=True)
        return params, opt

    t0 = time.perf_counter()
    captured, opt = make()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            opt.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    for _ in range(replays):
        graph.replay()
    torch.cuda.synchronize()
    eager, twin = make()
    for _ in range(warmup + replays):
        twin.step()
    torch.cuda.synchronize()
    same = all(torch.equal(a, b) for a, b in zip(captured, eager))
    moved = all(not torch.equal(a, s) for a, s in zip(captured, start))
    return {
        "ok": same and moved,
        "bitwise_equal_to_eager": same,
        "parameters_changed": moved,
        "replays": replays,
        "seconds": time.perf_counter() - t0,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sm3_dist.tools.doctor.graph", description=__doc__.splitlines()[0])
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    try:
        result = capture_check()
    except Exception as exc:
        result = {"ok": False, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}
    print(json.dumps(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0 if result.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
