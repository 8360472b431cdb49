#!/usr/bin/env bash
# Fetch, on this machine, the wheels the GPU machine lacks for scripts/gpu_check.sh (its image has torch,
# transformers, typer, rich, einops, imageio and safetensors, but not diffusers). Run from the repo root;
# they land in .whl/ (in .gitignore). Then: device run `bash scripts/gpu_check.sh`, carry [".whl"].
set -euo pipefail
cd "$(dirname "$0")/.."
for pkg in "diffusers==0.42.1" "importlib_metadata==10.2.0"; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl "$pkg"
done
ls -la .whl
