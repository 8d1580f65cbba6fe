#!/usr/bin/env bash
# Build the wheels the GPU machine lacks (it has torch, torchvision, einops, scipy, numpy, tqdm,
# matplotlib, huggingface_hub, safetensors, pillow; not hydra-core, omegaconf, diffusers, piq),
# into .whl/ (git-ignored), to carry with the device call: see benchmarks/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -c requirements/ci.txt -d .whl hydra-core omegaconf diffusers piq
# antlr4-python3-runtime 4.9.3 (what omegaconf 2.3 needs) is an sdist only: build a wheel of it.
python3 -m pip wheel --no-deps -c requirements/ci.txt -w .whl antlr4-python3-runtime
# The device call carries only the working tree: the fixtures that the parity check reads travel as
# .shared (git-ignored; device_env.sh links it to ../shared there). Carry [".whl", ".shared"].
mkdir -p .shared/fixtures && cp -r ../shared/fixtures/daps_ref .shared/fixtures/
ls -la .whl && du -sh .shared
