"""The ``lrpc`` command line. ``lrpc demo`` compiles a small built-in model, explains a batch and prints
the report and timings; ``lrpc coverage MODEL`` prints how every op of a model is covered."""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
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


def load_model(spec: str, input_shape: Sequence[int] | None = None) -> tuple[nn.Module, tuple, dict]:
    """A model and an example call from a CLI spec: ``zoo:NAME`` (or a bare zoo name),
    ``torchvision:NAME``, ``hf:PATH`` (a local config file or folder, or a model type such as ``bert``
    for its default config; random weights) or
    ``package.module:factory`` (returning a model or ``(model, args, kwargs)``)."""
    from . import zoo

    kind, _, rest = spec.partition(":")
    if not rest and kind in zoo.names():
        kind, rest = "zoo", kind
    if kind == "zoo":
        try:
            return zoo.build(rest)
        except KeyError as e:
            raise LRPCError(str(e.args[0])) from None
    if kind == "torchvision":
        import torchvision

        try:
            model = torchvision.models.get_model(rest, weights=None)
        except ValueError as e:
            raise LRPCError(f"torchvision has no model '{rest}': {e}") from None
        shape = tuple(input_shape or (1, 3, 224, 224))
        return model.eval(), (torch.randn(*shape),), {}
    if kind == "hf":
        import transformers

        try:
            if Path(rest).exists():
                config = transformers.AutoConfig.from_pretrained(rest, local_files_only=True)
            else:  # a model type ("bert", "gpt2", "llama"): its default config, no download
                config = transformers.AutoConfig.for_model(rest)
        except (OSError, ValueError) as e:
            raise LRPCError(
                f"'{rest}' is neither a local Hugging Face config (file or folder) nor a model type: {e}"
            ) from None
        auto = transformers.AutoModelForCausalLM if any("CausalLM" in a for a in config.architectures or []) else transformers.AutoModel
        model = auto.from_config(config).eval()
        shape = tuple(input_shape or (1, 16))
        ids = torch.randint(0, getattr(config, "vocab_size", 100), shape)
        return model, (), {"input_ids": ids}
    module, _, factory = spec.rpartition(":")
    if not module:
        raise LRPCError(f"unknown model '{spec}': use zoo:NAME, torchvision:NAME, hf:PATH or package.module:factory")
    import importlib

    try:
        made = getattr(importlib.import_module(module), factory)()
    except (ImportError, AttributeError) as e:
        raise LRPCError(f"cannot load '{spec}': {e}") from None
    if isinstance(made, nn.Module):
        if input_shape is None:
            raise LRPCError(f"'{spec}' returned a bare model: give --input SHAPE (e.g. --input 1 3 224 224)")
        return made.eval(), (torch.randn(*input_shape),), {}
    return made


def coverage(args: argparse.Namespace) -> int:
    model, call_args, call_kwargs = load_model(args.model, args.input)
    attributor = lrpc_compile(model, rules=args.rules, backend="eager", on_unsupported="warn")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        attributor(*call_args, **call_kwargs)
    report = attributor.report()
    print(report)
    return 0 if report.coverage == 1.0 else 1


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
    c = sub.add_parser("coverage", help="trace a model, print which rule covers each op, coverage and fallbacks")
    c.add_argument("model", help="zoo:NAME | torchvision:NAME | hf:CONFIG-PATH-OR-MODEL-TYPE | package.module:factory")
    c.add_argument("--rules", default="epsilon")
    c.add_argument("--input", type=int, nargs="+", help="input shape for models built without an example")
    c.set_defaults(func=coverage)
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
