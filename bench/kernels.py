"""The fused Triton kernels (``lrpc.kernels``) against their plain-torch references, on the layer shapes of
the benchmark models: time, achieved memory bandwidth as a share of the card's, and matmul throughput.

    python bench/kernels.py                    # CUDA: every kernel, float32 and bfloat16
    python bench/kernels.py --sweep            # also time launch choices (tiles, warps, stages) of the matmuls
    python bench/kernels.py --out kernels.md   # the Markdown table into a file as well
    TRITON_INTERPRET=1 python bench/kernels.py --smoke   # CPU: tiny shapes through the interpreter

Per kernel and shape: the kernel's median time (``triton.testing.do_bench``: warm-up excluded, L2 flushed
between calls), the eager reference's and the Inductor-compiled reference's (torch.compile of the
``*_reference`` function: cuBLAS plus fused pointwise kernels, what the "inductor" backend would run), the
bytes the step must move at least (each input read once, each output written once) over the kernel's time
as a share of the card's bandwidth (measured with a device-to-device copy in the same run, and the
nominal figure where the card is known), and for the matmul kernels TFLOP/s beside ``torch.mm``'s on the
same shape and dtype. Each result is checked against the eager reference before it is timed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import torch
from lrpc.kernels import linear as klinear

from lrpc import kernels

# Nominal memory bandwidth (bytes/s) of cards we may meet, by a substring of torch's device name.
NOMINAL_BANDWIDTH = {
    "H200": 4.8e12,
    "H100 80GB HBM3": 3.35e12,
    "H100 PCIe": 2.0e12,
    "A100-SXM4-80GB": 2.04e12,
}


@dataclass
class Case:
    kernel: str
    shape: str
    run: Callable[[], object]
    reference: Callable[[], object]
    compiled: Callable[[], object]
    bytes: int  # the least traffic: inputs read once, outputs written once
    flops: int = 0  # matmul work (0: an elementwise / row-wise kernel)
    mm: Callable[[], object] | None = None  # torch.mm of the same matmul, for its TFLOP/s


def nbytes(*ts: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


def timer(device: torch.device) -> Callable[[Callable[[], object]], float]:
    """Median seconds of one call."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return lambda fn: do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3

    def cpu(fn: Callable[[], object]) -> float:
        fn()
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    return cpu


def copy_bandwidth(device: torch.device, time_of: Callable[[Callable[[], object]], float]) -> float:
    """Bytes/s of a large device-to-device copy (read + write): what the card's memory delivers here."""
    n = (1 << 28) if device.type == "cuda" else (1 << 20)
    src = torch.empty(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes(src) / time_of(lambda: dst.copy_(src))


_COMPILED: dict[Callable, Callable] = {}


def compiled_reference(ref: Callable) -> Callable:
    """One Inductor compile per reference, shapes symbolic (cuBLAS takes any shape; a compile per shape
    would cost more time than the benchmark)."""
    if ref not in _COMPILED:
        _COMPILED[ref] = torch.compile(ref, dynamic=True)
    return _COMPILED[ref]


def linear_cases(
    dtype: torch.dtype, device: torch.device, shapes: list[tuple[str, int, int, int]]
) -> list[Case]:
    cases = []
    g = torch.Generator(device="cpu").manual_seed(0)
    for label, M, N, K in shapes:  # x (M, K) -> z (M, N): K inputs, N outputs

        def rand(*size: int) -> torch.Tensor:
            return torch.randn(*size, generator=g).to(device, dtype)

        x, W, b, R = rand(M, K), rand(N, K) / K**0.5, rand(N), rand(M, N)
        z = torch.nn.functional.linear(x, W, b)
        shape = f"{label}: x {M}x{K}, W {N}x{K}"
        mm_a, mm_b = rand(M, N), W
        for name, fn, ref, args, passes in (
            ("linear_epsilon", kernels.linear_epsilon, kernels.linear_epsilon_reference, (x, R, z, W), 1),
            ("linear_zplus", kernels.linear_zplus, kernels.linear_zplus_reference, (x, R, W, b), 2),
            ("linear_gamma", kernels.linear_gamma, kernels.linear_gamma_reference, (x, R, z, W, b), 4),
        ):
            compiled = compiled_reference(ref)
            io = nbytes(*(a for a in args if a is not None)) + nbytes(x)
            cases.append(
                Case(
                    name,
                    shape,
                    lambda fn=fn, args=args: fn(*args),
                    lambda ref=ref, args=args: ref(*args),
                    lambda c=compiled, args=args: c(*args),
                    io,
                    # epsilon: one (M,N)x(N,K) product; the sign-split rules: a forward and a backward
                    # product per weight matrix
                    2 * M * N * K * passes,
                    lambda a=mm_a, b=mm_b: a @ b,
                )
            )
    return cases


def rowwise_cases(
    dtype: torch.dtype,
    device: torch.device,
    shapes: list[tuple[str, tuple[int, ...]]],
    kernel: Callable[..., object],
    reference: Callable[..., object],
    inputs: Callable[[tuple[int, ...]], tuple[torch.Tensor, ...]],
    outputs: int,
) -> list[Case]:
    """The memory-bound kernels: ``kernel(*inputs(shape))`` against its reference; ``outputs`` tensors of
    the inputs' size are written."""
    cases = []
    for label, shape in shapes:
        args = tuple(t.to(device, dtype) for t in inputs(shape))
        compiled = compiled_reference(reference)
        cases.append(
            Case(
                kernel.__name__,
                f"{label}: {'x'.join(map(str, shape))}",
                lambda args=args: kernel(*args),
                lambda args=args: reference(*args),
                lambda args=args, c=compiled: c(*args),
                nbytes(*args) + outputs * nbytes(args[0]),
            )
        )
    return cases


def softmax_cases(dtype: torch.dtype, device: torch.device, shapes: list) -> list[Case]:
    def inputs(shape: tuple[int, ...]) -> tuple[torch.Tensor, ...]:
        x = torch.randn(shape)
        return x, torch.softmax(x, -1), torch.randn(shape)

    return rowwise_cases(
        dtype, device, shapes, kernels.softmax_relevance, kernels.softmax_relevance_reference, inputs, 1
    )


def product_cases(dtype: torch.dtype, device: torch.device, shapes: list) -> list[Case]:
    def inputs(shape: tuple[int, ...]) -> tuple[torch.Tensor, ...]:
        return tuple(torch.randn(shape) for _ in range(3))

    return rowwise_cases(
        dtype, device, shapes, kernels.uniform_product, kernels.uniform_product_reference, inputs, 2
    )


def first(out: object) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out  # type: ignore[return-value]


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def shapes_for(smoke: bool):
    if smoke:
        return (
            [("tiny", 8, 24, 16)],
            [("tiny", (2, 3, 8, 8))],
            [("tiny", (2, 3, 8, 4))],
        )
    # (label, M rows, N layer outputs, K layer inputs): the linear layers of the benchmark models
    linear = [
        ("BERT-base FFN up, batch 8x512", 4096, 3072, 768),
        ("BERT-base FFN down, batch 8x512", 4096, 768, 3072),
        ("Llama ~100M LM head, batch 8x512", 4096, 32000, 768),
        ("VGG16 fc6, batch 32", 32, 4096, 25088),
    ]
    softmax = [("BERT-base attention, batch 8x512", (8, 12, 512, 512))]
    product = [("attention scores x values operand, batch 8x512", (8, 12, 512, 512))]
    return linear, softmax, product


def sweep(dtype: torch.dtype, device: torch.device, time_of, shapes) -> list[str]:
    """Time launches of the matmul kernels (rows, output-columns, reduction; warps, pipeline stages) on each
    shape. Each launch is used by every matmul kernel while it is timed (the defaults: ``klinear.LAUNCH``,
    and ``klinear.LAUNCH_SIGNED_FMA`` for the sign-split kernels in float32)."""
    configs = [
        klinear.Launch(64, 64, 32, 4, 3),
        klinear.Launch(64, 128, 32, 4, 3),
        klinear.Launch(128, 64, 32, 4, 3),
        klinear.Launch(128, 128, 32, 8, 3),
        klinear.Launch(64, 64, 64, 4, 3),
        klinear.Launch(64, 64, 32, 4, 1),
        klinear.Launch(64, 64, 32, 8, 1),
        klinear.Launch(64, 64, 16, 8, 1),
        klinear.Launch(128, 64, 16, 8, 1),
    ]
    saved = klinear.LAUNCH, klinear.LAUNCH_SIGNED_FMA
    lines = [
        f"Launches ({dtype_name(dtype)}), ms per call: rows x columns x reduction / warps / stages",
        "",
        "| kernel | shape | " + " | ".join("{}x{}x{}/{}/{}".format(*c) for c in configs) + " |",
        "| --- | --- |" + " ---: |" * len(configs),
    ]
    try:
        for case in linear_cases(dtype, device, shapes):
            cells = []
            for config in configs:
                klinear.LAUNCH = klinear.LAUNCH_SIGNED_FMA = config
                try:
                    cells.append(f"{time_of(case.run) * 1e3:.3f}")
                except Exception as e:  # noqa: BLE001 - a config that does not fit (registers, shared memory)
                    cells.append(f"fails ({type(e).__name__})")
            lines.append(f"| {case.kernel} | {case.shape} | " + " | ".join(cells) + " |")
            print(lines[-1], file=sys.stderr, flush=True)
    finally:
        klinear.LAUNCH, klinear.LAUNCH_SIGNED_FMA = saved
    return lines


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--sweep", action="store_true", help="also time launch choices of the matmul kernels")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (CPU under TRITON_INTERPRET=1)")
    parser.add_argument("--out", type=Path, help="write the Markdown here too")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not (args.smoke and kernels.interpreting()):
        parser.error("no CUDA device: only --smoke under TRITON_INTERPRET=1 runs on CPU")
    time_of = timer(device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (Triton interpreter)"
    measured = copy_bandwidth(device, time_of)
    nominal = next((bw for key, bw in NOMINAL_BANDWIDTH.items() if key in name), None)
    peak = nominal or measured
    lines = [
        f"Command: `python {' '.join(['bench/kernels.py', *sys.argv[1:]])}`; {date.today().isoformat()}",
        f"Device: {name}; torch {torch.__version__}, triton {__import__('triton').__version__}; "
        f"device-to-device copy {measured / 1e12:.2f} TB/s"
        + (
            f", nominal {nominal / 1e12:.2f} TB/s"
            if nominal
            else " (nominal bandwidth unknown: shares are of the copy)"
        ),
        "",
        "| kernel | dtype | shape | kernel ms | eager ref. ms | Inductor ref. ms | vs Inductor | bandwidth (share of "
        + ("nominal" if nominal else "copy")
        + ") | TFLOP/s (torch.mm) | max rel. diff |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    linear, softmax, product = shapes_for(args.smoke)
    sweeps: list[str] = []
    for dtype in (getattr(torch, d) for d in args.dtypes.split(",")):
        cases = linear_cases(dtype, device, linear) + softmax_cases(dtype, device, softmax)
        cases += product_cases(dtype, device, product)
        for case in cases:
            diff = max_rel(first(case.run()), first(case.reference()))
            t_k, t_e, t_c = time_of(case.run), time_of(case.reference), time_of(case.compiled)
            bw = case.bytes / t_k
            flops = "-"
            if case.flops and case.mm:
                flops = f"{case.flops / t_k / 1e12:.1f} ({_mm_flops(case) / time_of(case.mm) / 1e12:.1f})"
            lines.append(
                f"| {case.kernel} | {dtype_name(dtype)} | {case.shape} | {t_k * 1e3:.3f} | {t_e * 1e3:.3f} | "
                f"{t_c * 1e3:.3f} | {t_c / t_k:.2f}x | {bw / 1e9:.0f} GB/s ({bw / peak:.0%}) | {flops} | {diff:.1e} |"
            )
            print(lines[-1], file=sys.stderr, flush=True)
        if args.sweep and not sweeps:  # the first dtype, two shapes: each launch is a new Triton compile
            sweeps += ["", *sweep(dtype, device, time_of, list(dict.fromkeys([linear[0], linear[-1]])))]
    lines += [
        "",
        (
            "vs Inductor: the Inductor-compiled reference's time over the kernel's (above 1: the kernel is faster). "
            "Bandwidth: the least bytes the step moves over the kernel's time; a matmul kernel is bounded by "
            "arithmetic rather than memory, so its TFLOP/s are given beside torch.mm's on the same matmul."
        ),
        *sweeps,
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


def _mm_flops(case: Case) -> int:
    """The flops of the one torch.mm the case's ``mm`` runs (the sign-split kernels do several)."""
    passes = {"linear_epsilon": 1, "linear_zplus": 2, "linear_gamma": 4}[case.kernel]
    return case.flops // passes


if __name__ == "__main__":
    main()
