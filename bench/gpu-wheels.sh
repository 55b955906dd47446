#!/usr/bin/env bash
# Gathers the peers that bench/gpu.sh measures against into .whl/ (git ignores it), from this machine's
# package indexes and its installed LXT, for a GPU machine that reaches no index:
#   bash bench/gpu-wheels.sh
# then, with the `device` tool: run(command="bash bench/gpu.sh $OUT 560", carry=[".whl"]).
# Wheels without dependencies: the GPU image has torch, numpy and the rest; transformers is pinned to the
# 4.51 that LXT 2.1 needs (the image may hold transformers 5).
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl && mkdir -p .whl/pkgs
python3 -m pip download -q --no-deps -d .whl \
    "transformers==4.51.3" "tokenizers==0.21.*" "huggingface_hub<1" "zennit==0.5.1" "captum"
lxt=$(python3 -c "import lxt, os; print(os.path.dirname(lxt.__file__))")
cp -r "$lxt" .whl/pkgs/ && cp -r "$(dirname "$lxt")"/lxt-*.dist-info .whl/pkgs/
find .whl/pkgs -name __pycache__ -prune -exec rm -rf {} +
ls .whl && du -sh .whl  # carry takes 64 MiB in all
