"""``python -m sm3_dist._triton``: the same command as ``python -m sm3_dist.kernels.cuda``."""

from sm3_dist.kernels.cuda.__main__ import main

if __name__ == "__main__":
    raise SystemExit(main())
