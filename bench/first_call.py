"""First-call time of lrpc in a new process, with Inductor's on-disk cache empty and then warm.

A serving process or a notebook kernel that restarts compiles its programs again; Inductor's compiled-graph
and AOTAutograd caches (``TORCHINDUCTOR_CACHE_DIR``, by default under the system's temp directory) let the
second process skip most of that. Each model runs its first call in two fresh processes that share one
empty cache directory: the first fills it, the second reads it. Same models, inputs and weights as
``bench/speed.py``; prints a Markdown table of the first call split into its stages.

    python bench/first_call.py                          # ResNet-50 and BERT-base, backend "inductor"
    python bench/first_call.py --models vgg16,gpt2 --threads 1
    python bench/first_call.py --models llama --layers 24 --regions on,off --cache empty   # lrpc.regions

``--regions``: ``auto`` is lrpc's own choice (``lrpc.regions.worth_splitting``), ``on`` cuts a model with any
repeated block, however little its regions share, ``off`` compiles every program whole. ``--layers`` sets the depth of a
Hugging Face model (random weights as always). "next calls" is the median of ``--reps`` calls after the first.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from speed import FAMILY, LABELS, MODELS, PRESETS, SIZES


def child(options: dict) -> None:
    """One process: build the model, time the first call and the next ones, print the stages as JSON."""
    import speed_worker as w
    import torch

    from lrpc import regions

    name = options["model"]
    if options["threads"]:
        torch.set_num_threads(options["threads"])
    if options["regions"] != "auto":  # the two extremes of lrpc's choice
        always = options["regions"] == "on"
        regions.MIN_REPEATS, regions.MAX_DISTINCT_SHARE = (1, float("inf")) if always else (10**9, 0.0)
    if options["layers"]:
        cls, config = w.hf_class_and_config(name)
        config.num_hidden_layers = options["layers"]
        torch.manual_seed(0)
        model = cls(config).eval()
    else:
        model = w.build_model(name)
    inputs, target = w.build_inputs(name, SIZES["cpu"][FAMILY[name]], model)
    call = w.lrpc_method(name, model, inputs, target, options["preset"], options["backend"])
    start = time.perf_counter()
    call()
    first = time.perf_counter() - start
    times = []
    for _ in range(options["reps"]):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    timings = w.lrpc_method.attributor.report().timings
    print(json.dumps({"first": first, "next": statistics.median(times), **timings}))


def run(options: dict, cache: Path) -> dict[str, float]:
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(cache / "inductor"), TRITON_CACHE_DIR=str(cache / "triton"))
    if options["threads"]:
        env["OMP_NUM_THREADS"] = str(options["threads"])
    cmd = [sys.executable, __file__, "--child", json.dumps(options)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{options['model']} {options['preset']}: the child process failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(json.loads(sys.argv[2]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet50,bert", help=f"comma-separated, from {','.join(MODELS)}")
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (0: torch's default)")
    parser.add_argument("--layers", type=int, default=0, help="depth of the Hugging Face models (0: their own)")
    parser.add_argument("--regions", default="auto", help="comma-separated, from auto, on, off")
    parser.add_argument("--cache", default="empty,warm", help="Inductor's cache: comma-separated, from empty, warm")
    parser.add_argument("--reps", type=int, default=1, help="calls after the first (their median is shown)")
    args = parser.parse_args()
    if args.reps < 1:
        parser.error("--reps must be at least 1")
    rows = [
        "| model | rules | regions | cache | first call | trace | plan | codegen | compile + run | next calls |",
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name in args.models.split(","):
        if name not in PRESETS:
            parser.error(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
        preset = PRESETS[name][0]
        label = f"{LABELS[name].split(' ~')[0]}, {args.layers} layers" if args.layers else LABELS[name]
        for mode in args.regions.split(","):
            options = dict(
                model=name, preset=preset, backend=args.backend, threads=args.threads, layers=args.layers,
                regions=mode, reps=args.reps,
            )
            with tempfile.TemporaryDirectory(prefix="lrpc-first-call-") as tmp:
                for state in ("empty", "warm"):
                    t = run(options, Path(tmp))  # the empty run fills the cache the warm one reads
                    if state not in args.cache.split(","):
                        continue
                    rows.append(
                        f"| {label} | {preset} | {mode} | {state} | {t['first']:.1f} s | {t['trace']:.1f} s | "
                        f"{t['plan']:.1f} s | {t['codegen']:.1f} s | {t['first_call']:.1f} s | {t['next'] * 1e3:.0f} ms |"
                    )
                    print(rows[-1], flush=True)
                    if "warm" not in args.cache.split(","):
                        break
    print("\n" + "\n".join(rows))


if __name__ == "__main__":
    main()
