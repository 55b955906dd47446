"""The ``lrpc`` command line. ``lrpc demo`` compiles a small built-in model, explains a batch and prints
the report and timings."""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from . import backends
from .attributor import compile as lrpc_compile
from .errors import LRPCError
from .models import small_cnn, tiny_transformer


def _median_seconds(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _gradient_x_input(model: nn.Module, x: Tensor) -> Tensor:
    """The eager baseline: gradient x input of each sample's top logit."""
    x = x.detach().requires_grad_(True)
    out = model(x)
    out.gather(-1, out.argmax(-1, keepdim=True)).sum().backward()
    return x.grad * x


def demo(args: argparse.Namespace) -> int:
    torch.manual_seed(0)
    if args.model == "cnn":
        model, x = small_cnn(), torch.randn(args.batch, 1, 28, 28)
    else:
        model, x = tiny_transformer(), torch.randint(0, 64, (args.batch, 16))
    print(f"lrpc demo: {type(model).__name__}, input {tuple(x.shape)}, rules {args.rules}, backend {args.backend}")
    attributor = lrpc_compile(model, rules=args.rules, backend=args.backend)
    start = time.perf_counter()
    res = attributor(x)
    first = time.perf_counter() - start
    print(f"first call (trace + plan + codegen + compile + run): {first:.2f} s")
    per_call = _median_seconds(lambda: attributor(x), args.repeat)
    print(f"explained targets: {res.target.tolist() if res.target is not None else '-'}")
    print(f"relevance {tuple(res.relevance.shape)}, per-sample sums {[round(v, 4) for v in res.relevance.flatten(1).sum(1).tolist()]}")
    print(attributor.report())
    line = f"time per batch: lrpc {per_call * 1e3:.2f} ms"
    if x.is_floating_point():
        baseline = _median_seconds(lambda: _gradient_x_input(model, x), args.repeat)
        line += f", eager gradient x input {baseline * 1e3:.2f} ms, ratio {per_call / baseline:.2f}x"
    print(line + f"  (median of {args.repeat})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lrpc", description="LRP explanations for PyTorch models, compiled.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="explain a batch on a small built-in model and print the report")
    p.add_argument("--model", choices=["cnn", "transformer"], default="cnn")
    p.add_argument("--rules", default="epsilon")
    p.add_argument("--backend", default="auto", choices=backends.names())
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeat", type=int, default=10, help="timed repetitions after the first call")
    p.set_defaults(func=demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except LRPCError as e:
        print(f"lrpc: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
