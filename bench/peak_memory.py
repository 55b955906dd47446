"""Peak memory of one call on the CPU, counted from the allocator's events rather than read from the
process: lrpc against gradient x input on the same model, batch and sequence length.

``bench/speed.py`` reads a CPU call's peak from the process's resident memory, which moves between runs
and hides differences of a few tens of MB. Here torch.profiler records every allocation and free of one
call (after a warm-up call), and the peak is the largest running sum of those bytes: the same number on
every run. The models are bench/speed.py's (random weights, seeded), their inputs too.

    python bench/peak_memory.py                                   # bert, gpt2, llama at 1 x 512 tokens
    python bench/peak_memory.py --models bert --seq 256 --backends eager,inductor
    python bench/peak_memory.py --models resnet50,vgg16,vit_b_16 --backends eager,inductor   # 224x224
    python bench/peak_memory.py --models vit_b_16,bert --seq 128 --min-repeats 12,1000   # lrpc.regions
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from speed_worker import HF, allocated_peak_mb, build_inputs, build_model, gradient_x_input, lrpc_method

from lrpc import regions

PRESET = {
    "bert": "attnlrp",
    "gpt2": "attnlrp",
    "llama": "attnlrp",
    "vit_b_16": "cp-lrp",
    "resnet50": "epsilon",
    "vgg16": "epsilon-gamma-box",
}


def median_ms(call: Callable[[], object], reps: int) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="bert,gpt2,llama", help=f"comma-separated, from {','.join(PRESET)}")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--backends", default="inductor")
    parser.add_argument("--reps", type=int, default=3, help="timed calls per method (the median is printed)")
    parser.add_argument(
        "--min-repeats",
        default="",
        help="comma-separated values of lrpc.regions.MIN_REPEATS, one lrpc row each (default: lrpc's own)",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| model (input) | method | peak MB in a call | vs gradient x input | median ms |")
    print("| --- | --- | ---: | ---: | ---: |")
    for name in args.models.split(","):
        model = build_model(name)
        inputs, target = build_inputs(name, {"batch": args.batch, "seq": args.seq, "image": 224}, model)
        label = f"{name} ({args.batch} x {args.seq})" if name in HF else f"{name} ({args.batch} x 224x224)"
        # method -> (call, lrpc.regions.MIN_REPEATS for its first call, which compiles; None: as it is)
        methods = {"gradient x input": (gradient_x_input(name, model, inputs, target), None)}
        for backend in args.backends.split(","):
            for repeats in args.min_repeats.split(",") if args.min_repeats else [None]:
                suffix = "" if repeats is None else f", regions from {repeats} repeats"
                call = lrpc_method(name, model, inputs, target, PRESET[name], backend)
                methods[f"lrpc {PRESET[name]} [{backend}]{suffix}"] = (call, repeats)
        floor = None
        for method, (call, repeats) in methods.items():
            if repeats is not None:
                regions.MIN_REPEATS = int(repeats)
            call()  # the first call compiles; the second warms the allocator
            call()
            peak = allocated_peak_mb(call)
            floor = floor or peak
            print(f"| {label} | {method} | {peak:.0f} | {peak / floor:.2f}x | {median_ms(call, args.reps):.0f} |", flush=True)


if __name__ == "__main__":
    main()
