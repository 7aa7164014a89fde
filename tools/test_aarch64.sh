#!/bin/sh
# The native kernel's aarch64 (NEON) build, bitwise against the eager kernel under qemu-user emulation
# (tests/test_native_isa.py::test_aarch64_*; they skip in CI, where the cross compiler is not installed).
# Debian/Ubuntu: installs g++-aarch64-linux-gnu and qemu-user when missing (needs root), then runs the tests.
set -e
if ! command -v aarch64-linux-gnu-g++ >/dev/null || ! command -v qemu-aarch64 >/dev/null; then
    apt-get install -y g++-aarch64-linux-gnu qemu-user
fi
exec "${PY:-.venv/bin/python}" -m pytest tests/test_native_isa.py -k aarch64 -q "$@"
