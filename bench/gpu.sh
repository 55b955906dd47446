#!/usr/bin/env bash
# The checks that need a GPU, in one go, within a time budget (a lent GPU machine is short-lived):
#   bash bench/gpu.sh OUT_DIR [SECONDS]
# 1. the kernel tests with the kernels compiled for the GPU (and the CUDA-only tests),
# 2. bench/kernels.py: each fused kernel against its references, bandwidth share (KERNELS_ARGS, default
#    `--sweep`: the block-size, warp and stage sweep too),
# 3. bench/backend_agreement.py --device cuda (AGREEMENT=0 skips it): each backend's ViT-B/16 relevance, block
#    by block, against float64,
# 4. bench/speed.py --device cuda on MODELS (default: all six): the model benchmark against gradient x input,
#    Zennit, LXT, Captum, written into BENCHMARKS.md after every model (a run cut short keeps what it measured).
# Each step's output lands in OUT_DIR (log files, kernels.md, BENCHMARKS.md).
# The peers must be importable: Zennit, Captum, LXT 2.1 and the transformers 4.51 that LXT 2.1 needs (a
# GPU image may hold transformers 5). On a machine without an index, bring them in a folder .whl of the
# checkout (wheels of transformers 4.51.3, tokenizers 0.21.x, huggingface_hub 0.x, zennit 0.5.1, captum; LXT 2.1
# as its package folder and dist-info under .whl/pkgs; `bash bench/gpu-wheels.sh` gathers them here, 15 MB, and
# the device tool's carry=[".whl"] takes them along): this script installs them into /tmp/site, first on
# PYTHONPATH, and installs lrpc itself so that lrpc.kernels resolves.
# Measured on an H200 (2026-11-27): set-up 10 s, tests ~55 s, kernels ~40 s in float32 alone (~140 s with the
# sweep and bfloat16), speed ~150 s per CNN and ~100 s per transformer with --parallel-first: 550 s covered
# the tests, the float32 kernels and the four transformers.
set -uo pipefail
out=${1:?usage: bash bench/gpu.sh OUT_DIR [SECONDS]}
budget=${2:-560}
models=${MODELS:-vgg16,resnet50,llama,bert,vit_b_16,gpt2}
mkdir -p "$out"
start=$SECONDS
left() { echo $((budget - (SECONDS - start))); }
export PYTHONUNBUFFERED=1

if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && cp -r .whl/pkgs/. /tmp/site/ && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -m pip install -q --no-deps --no-build-isolation . 2>&1 | tail -2
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" | tee -a "$out/gpu.txt"
echo "set up in $((SECONDS - start)) s"

timeout 100 python3 -m pytest -q -p no:cacheprovider -m "slow or not slow" -n 8 tests/test_kernels.py tests/test_cuda.py 2>&1 | tail -15 | tee "$out/tests.log"
echo "tests done at $((SECONDS - start)) s"

timeout $(( $(left) < 130 ? $(left) : 130 )) python3 bench/kernels.py ${KERNELS_ARGS:---sweep} --out "$out/kernels.md" 2>&1 | tail -40 > "$out/kernels.log"
echo "kernels bench done at $((SECONDS - start)) s"

if [ "${AGREEMENT:-1}" = 1 ]; then  # where ViT-B/16's CP-LRP under Inductor parts from float64 (BENCHMARKS.md)
    timeout 200 python3 bench/backend_agreement.py --device cuda 2>/dev/null > "$out/agreement.log"
    echo "backend agreement done at $((SECONDS - start)) s"
fi

timeout $(( $(left) - 15 )) python3 bench/speed.py --device cuda --parallel-first --no-overhead --reps 10 \
    --timeout 300 --write --models "$models" 2> "$out/speed.log" | tail -5
echo "speed bench ended at $((SECONDS - start)) s"
cp BENCHMARKS.md "$out/BENCHMARKS.md"
