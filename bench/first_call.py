"""First-call time of lrpc in a new process, with Inductor's on-disk cache empty and then warm.

A serving process or a notebook kernel that restarts compiles its programs again; Inductor's compiled-graph
and AOTAutograd caches (``TORCHINDUCTOR_CACHE_DIR``, by default under the system's temp directory) let the
second process skip most of that. Each model runs its first call in two fresh processes that share one
empty cache directory: the first fills it, the second reads it. Same models, inputs and weights as
``bench/speed.py``; prints a Markdown table of the first call split into its stages.

    python bench/first_call.py                          # ResNet-50 and BERT-base, backend "inductor"
    python bench/first_call.py --models vgg16,gpt2 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from speed import FAMILY, LABELS, MODELS, PRESETS, SIZES


def child(model_name: str, preset: str, backend: str, threads: int) -> None:
    """One process: build the model, time the first and a second call, print the stages as JSON."""
    import speed_worker as w
    import torch

    if threads:
        torch.set_num_threads(threads)
    model = w.build_model(model_name)
    inputs, target = w.build_inputs(model_name, SIZES["cpu"][FAMILY[model_name]], model)
    call = w.lrpc_method(model_name, model, inputs, target, preset, backend)
    start = time.perf_counter()
    call()
    first = time.perf_counter() - start
    start = time.perf_counter()
    call()
    second = time.perf_counter() - start
    timings = w.lrpc_method.attributor.report().timings
    print(json.dumps({"first": first, "second": second, **timings}))


def run(model_name: str, preset: str, backend: str, threads: int, cache: Path) -> dict[str, float]:
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(cache / "inductor"), TRITON_CACHE_DIR=str(cache / "triton"))
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, __file__, "--child", model_name, preset, backend, str(threads)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{model_name} {preset}: the child process failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet50,bert", help=f"comma-separated, from {','.join(MODELS)}")
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (0: torch's default)")
    args = parser.parse_args()
    rows = [
        "| model | rules | cache | first call | trace | plan | codegen | compile + run | next call |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name in args.models.split(","):
        if name not in PRESETS:
            parser.error(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
        preset = PRESETS[name][0]
        with tempfile.TemporaryDirectory(prefix="lrpc-first-call-") as tmp:
            for state in ("empty", "warm"):
                t = run(name, preset, args.backend, args.threads, Path(tmp))
                rows.append(
                    f"| {LABELS[name]} | {preset} | {state} | {t['first']:.1f} s | {t['trace']:.1f} s | "
                    f"{t['plan']:.1f} s | {t['codegen']:.1f} s | {t['first_call']:.1f} s | {t['second'] * 1e3:.0f} ms |"
                )
                print(rows[-1], flush=True)
    print("\n" + "\n".join(rows))


if __name__ == "__main__":
    main()
