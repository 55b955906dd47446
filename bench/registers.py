"""Registers and spills of the fused matmul kernels (``lrpc.kernels.linear``), as Triton and ptxas compile
them for a GPU. No GPU is needed: each wrapper is called on fake CUDA tensors of a large layer's shape with its
launches captured instead of run, and each captured launch is compiled as Triton's JIT would (its binder
specializes the arguments) for the target architecture, with the ``ptxas`` that Triton ships, whose ``-v``
report gives the registers per thread and the bytes spilled.

    python bench/registers.py                 # every matmul kernel, float32 (IEEE, TF32) and bfloat16
    python bench/registers.py --arch 80       # for an A100 (default 90: H100 / H200)
    python bench/registers.py --check         # exit 1 if a launch spills (tests/test_kernels.py)

A kernel that spills keeps part of its accumulators in local memory: the float32 sign-split kernels did,
20-42 KB per thread, and ran 40x slower than cuBLAS on an H200 (BENCHMARKS.md, Kernels). Run it in a
process where ``TRITON_INTERPRET`` is unset: Triton compiles nothing for a GPU under its interpreter.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from lrpc.kernels import _common, linear
from torch._subclasses.fake_tensor import FakeTensorMode

# (what, wrapper call on x, R, z, W, b): the wrappers lrpc's fusion pass uses
WRAPPERS: dict[str, Callable[..., Any]] = {
    "epsilon": lambda x, R, z, W, b: linear.linear_epsilon(x, R, z, W),
    "z+": lambda x, R, z, W, b: linear.linear_zplus(x, R, W, b),
    "alpha-beta": lambda x, R, z, W, b: linear.linear_alpha_beta(x, R, W, b),
    "gamma": lambda x, R, z, W, b: linear.linear_gamma(x, R, z, W, b),
}
# float32 under torch's two matmul precisions, and bfloat16
MODES = {"float32 IEEE": (torch.float32, "highest"), "float32 TF32": (torch.float32, "high"),
         "bfloat16": (torch.bfloat16, "highest")}
ROWS, IN, OUT = 4096, 768, 3072  # BERT-base's FFN up at batch 8 x 512: every tile at its cap


def launches(wrapper: Callable[..., Any], dtype: torch.dtype) -> list[tuple[Callable, tuple, dict]]:
    """The kernel launches ``wrapper`` makes on a large layer: ``(kernel function, args, keyword args)``."""
    made: list[tuple[Callable, tuple, dict]] = []

    def capture(kernel: _common.jit, grid: Any) -> Callable[..., None]:
        return lambda *args, **kwargs: made.append((kernel.fn, args, kwargs))

    # fake CUDA tensors: the wrappers see the device they launch on, and nothing is allocated
    with FakeTensorMode(), mock.patch.object(_common.jit, "__getitem__", capture):
        x, W = torch.empty(ROWS, IN, dtype=dtype, device="cuda"), torch.empty(OUT, IN, dtype=dtype, device="cuda")
        R, b = torch.empty(ROWS, OUT, dtype=dtype, device="cuda"), torch.empty(OUT, dtype=dtype, device="cuda")
        wrapper(x, R, torch.empty_like(R), W, b)
    return made


def compile_report(fn: Callable, args: tuple, kwargs: dict, arch: int) -> tuple[int, int]:
    """Registers per thread and bytes spilled (stores + loads) of one launch, compiled for ``sm_<arch>``
    with the specialization Triton's JIT would give these arguments (unit strides as constants, sizes and
    16-byte aligned pointers marked divisible by 16): its own binder makes the signature."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import JITFunction

    try:  # the JIT's own binder: internal API (Triton 3.8 has it)
        from triton.runtime.jit import create_function_from_signature
    except ImportError:
        sys.exit(f"bench/registers.py: Triton {triton.__version__} has no create_function_from_signature")
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    kernel = JITFunction(fn)
    # real (tiny) tensors for the binder, which reads each pointer's alignment: allocations are aligned
    real = [torch.empty(16, dtype=a.dtype) if isinstance(a, torch.Tensor) else a for a in args]
    bound, specialization, options = create_function_from_signature(kernel.signature, kernel.params, backend)(
        *real, **kwargs
    )
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=options.__dict__)
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    with tempfile.TemporaryDirectory() as tmp:
        ptx = Path(tmp) / "kernel.ptx"
        ptx.write_text(compiled.asm["ptx"])
        suffix = "a" if arch >= 90 else ""
        report = subprocess.run(
            [str(ptxas), f"-arch=sm_{arch}{suffix}", "-v", str(ptx), "-o", os.devnull],
            capture_output=True, text=True, check=True,
        ).stderr
    registers = int(re.search(r"Used (\d+) registers", report).group(1))
    spills = sum(map(int, re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report).groups()))
    return registers, spills


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (default 90)")
    parser.add_argument("--check", action="store_true", help="exit 1 if a launch spills")
    args = parser.parse_args()
    if _common.interpreting():
        parser.error("TRITON_INTERPRET is set: Triton compiles nothing for a GPU under its interpreter")
    print(f"sm_{args.arch}, Triton {__import__('triton').__version__}; layer x {ROWS}x{IN}, W {OUT}x{IN}\n")
    print("| rule | dtype | kernel | blocks (BLOCK_M x BLOCK_N x BLOCK_K) | warps | stages | registers | spilled bytes |")
    print("| --- | --- | --- | --- | ---: | ---: | ---: | ---: |")
    failed = []
    saved = torch.get_float32_matmul_precision()
    try:
        for mode, (dtype, precision) in MODES.items():
            torch.set_float32_matmul_precision(precision)
            for rule, wrapper in WRAPPERS.items():
                for fn, largs, kwargs in launches(wrapper, dtype):
                    tiles = "x".join(str(kwargs[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
                    warps, stages = kwargs.get("num_warps", 4), kwargs.get("num_stages", 3)
                    registers, spills = compile_report(fn, largs, dict(kwargs), args.arch)
                    print(f"| {rule} | {mode} | {fn.__name__} | {tiles} | {warps} | {stages} | {registers} | {spills} |",
                          flush=True)
                    if spills:
                        failed.append(f"{rule} {fn.__name__} ({mode})")
    finally:
        torch.set_float32_matmul_precision(saved)
    if args.check and failed:
        print(f"\nspills: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
