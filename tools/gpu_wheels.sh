#!/usr/bin/env bash
# Every wheel the offline GPU machine lacks (docs/doctor.md, ../shared/GPU.md), built into one folder to carry:
# hjson, pydantic with the pydantic_core it pins, annotated-types, typing-inspection, pytorch_optimizer,
# expecttest (binary wheels for the target interpreter), deepspeed (an sdist, built here) and this project.
#
#   tools/gpu_wheels.sh [OUT]            # OUT defaults to .whl (git-ignored through .git/info/exclude)
#
# Settings (environment): PY_VERSION (default 3.12, the GPU machine's Python), PLATFORMS (default the
# manylinux x86_64 tags), PIP (default .venv/bin/pip), DEEPSPEED (default 0.19.8).
# On the GPU machine, with OUT sent along with the repository:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
OUT=${1:-.whl}
PY_VERSION=${PY_VERSION:-3.12}
PLATFORMS=${PLATFORMS:-manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64}
PIP=${PIP:-.venv/bin/pip}
DEEPSPEED=${DEEPSPEED:-0.19.8}

mkdir -p "$OUT"
if [ "$OUT" = ".whl" ] && [ -d .git/info ] && ! grep -qx '/.whl/' .git/info/exclude 2>/dev/null; then
    echo /.whl/ >> .git/info/exclude
fi
target=(--only-binary=:all: --python-version "$PY_VERSION" --implementation cp)
for p in $PLATFORMS; do target+=(--platform "$p"); done

$PIP download -q --no-deps "${target[@]}" -d "$OUT" hjson pydantic annotated-types typing-inspection \
    pytorch_optimizer expecttest
# pydantic pins one pydantic_core: take that one
pydantic=$(ls -t "$OUT"/pydantic-[0-9]*.whl | head -1)
core=$("${PIP%/pip}/python" - "$pydantic" <<'PY'
import re, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
    for line in z.read(meta).decode().splitlines():
        m = re.match(r"Requires-Dist: pydantic[-_]core\s*\(?==\s*([^\s;,)]+)", line)
        if m:
            print(m.group(1))
            break
PY
)
$PIP download -q --no-deps "${target[@]}" -d "$OUT" "pydantic_core${core:+==$core}"
# deepspeed (pure Python once built, its ops compiled at run time) and this project, against the local torch
$PIP wheel -q --no-deps --no-build-isolation -w "$OUT" "deepspeed==$DEEPSPEED" "$ROOT"
ls -1 "$OUT"
