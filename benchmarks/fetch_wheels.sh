#!/usr/bin/env bash
# Fetch, on a machine with network, the wheels that gpu_check.sh installs on a GPU machine
# without one: the parity reference (ps3-torch), the timm it works with, and what they need
# that the GPU image lacks. They land in benchmarks/wheels/ (ignored by git; carry it along).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
mkdir -p "$here/wheels"
python3 -m pip download -q --no-deps --only-binary=:all: -d "$here/wheels" \
    ps3-torch==0.1.3 timm==1.0.15 ftfy==6.3.1 wcwidth
ls -l "$here/wheels"
