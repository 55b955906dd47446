"""What every kernel module shares: the optional Triton import, a ``jit`` that decides between compiled
and interpreted kernels at launch time (not at import), argument checks, and block sizes."""

import os
import types
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

try:  # Triton is optional: the references (and lrpc itself) work without it.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None  # type: ignore[assignment]
    # kernel signatures annotate ``tl.constexpr`` at definition time; the bodies never run without triton
    tl = types.SimpleNamespace(constexpr=None)  # type: ignore[assignment]
    HAS_TRITON = False

#: Floating dtypes the kernels accept; they accumulate in float32 whatever the storage dtype.
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``), read now."""
    if not HAS_TRITON:
        return False
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"  # pragma: no cover - triton < 3.4


def available() -> bool:
    """True when Triton imports and a CUDA device exists (the kernels can run compiled)."""
    return HAS_TRITON and torch.cuda.is_available()


class jit:
    """``triton.jit`` applied when the kernel is first launched, not when the module is imported: the kernel
    modules import without triton (the references need only torch), and a missing triton is an error at
    launch.

    The mode (interpreter or compiler) is ``TRITON_INTERPRET`` at that launch, kept per mode. In practice
    one process runs one mode: Triton jits its own library functions for the mode in force when triton is
    first imported, and kernels of the other mode fail on them (seen with Triton 3.6 on an H200: compiled
    kernels failed in a process that had imported triton with ``TRITON_INTERPRET=1``). So set the variable
    before anything imports triton, as ``tests/conftest.py`` does on CPU-only machines. Kernels decorated
    this way must not call other jitted functions (they are plain functions here).
    """

    def __init__(self, fn: Callable[..., Any]):
        self.fn = fn
        self._by_mode: dict[bool, Any] = {}

    def __getitem__(self, grid: Any) -> Callable[..., Any]:
        if not HAS_TRITON:
            raise RuntimeError("triton is not installed: lrpc.kernels can only run the *_reference functions")
        mode = interpreting()
        kernel = self._by_mode.get(mode)
        if kernel is None:
            if mode:
                _interpreter_scalar_index()
            kernel = self._by_mode[mode] = triton.jit(self.fn)
        return kernel[grid]


def _interpreter_scalar_index() -> None:
    """Triton <= 3.6's interpreter turns a scalar kernel argument into a Python index (``range(0, N, B)``)
    with ``int()`` of a one-element array, which numpy >= 2.4 refuses (TypeError); later Triton squeezes the
    array first. Do the same on the older versions, where the interpreter patches ``tl.tensor`` per run."""
    from triton.runtime import interpreter

    patch = getattr(interpreter, "_patch_lang_tensor", None)
    if patch is None or getattr(patch, "lrpc_squeezes", False):
        return

    def patched(tensor: Any, scope: Any) -> None:
        patch(tensor, scope)
        scope.set_attr(
            tensor, "__index__", lambda self: int(self.handle.data.squeeze())
        )  # restored with the rest

    patched.lrpc_squeezes = True  # type: ignore[attr-defined]
    interpreter._patch_lang_tensor = patched


def check(
    fn: str, tensors: dict[str, Tensor | None], *, dims: dict[str, int] | None = None
) -> tuple[torch.dtype, torch.device]:
    """Validate the tensor arguments of kernel wrapper ``fn``: tensors, one floating dtype out of
    :data:`DTYPES`, one device that the kernels can run on, and ``dims[name]`` dimensions where given
    (``-1``: at least one). ``None`` entries (optional arguments) are skipped. Returns dtype and device."""
    present = {k: t for k, t in tensors.items() if t is not None}
    for name, t in present.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
        want = (dims or {}).get(name)
        if want == -1 and t.dim() == 0:
            raise ValueError(f"{fn}: {name} must have at least one dimension, got a scalar")
        if want is not None and want != -1 and t.dim() != want:
            raise ValueError(f"{fn}: {name} must have {want} dims, got shape {tuple(t.shape)}")
    dtypes = {t.dtype for t in present.values()}
    if len(dtypes) != 1:
        listing = ", ".join(f"{k}={t.dtype}" for k, t in present.items())
        raise TypeError(f"{fn}: all tensors must share one dtype, got {listing}")
    (dtype,) = dtypes
    if dtype not in DTYPES:
        raise TypeError(f"{fn}: dtype {dtype} is not supported (float32, float16, bfloat16)")
    devices = {t.device for t in present.values()}
    if len(devices) != 1:
        listing = ", ".join(f"{k}={t.device}" for k, t in present.items())
        raise ValueError(f"{fn}: all tensors must be on one device, got {listing}")
    (device,) = devices
    if not HAS_TRITON:
        raise RuntimeError(f"{fn}: triton is not installed; use {fn}_reference")
    if device.type != "cuda" and not interpreting():
        raise ValueError(
            f"{fn}: Triton kernels run on CUDA tensors (or on CPU under TRITON_INTERPRET=1), "
            f"got device {device}"
        )
    return dtype, device


def block(n: int, low: int, high: int) -> int:
    """A power-of-two block size covering ``n`` when small, between ``low`` and ``high``."""
    return max(low, min(high, 1 << max(0, int(n) - 1).bit_length()))


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s input precision for float32 operands, following torch's matmul setting, so that the
    fused step rounds like the ``aten.mm`` it replaces ("highest": IEEE; "high"/"medium": TF32)."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


def upcast_dot(dtype: torch.dtype) -> bool:
    """Whether ``tl.dot`` should take float32 operands: under the interpreter for bfloat16, whose ``dot``
    multiplies the raw bf16 bit patterns (Triton 3.8). Exact: a product of two bf16 values fits in fp32."""
    return dtype == torch.bfloat16 and interpreting()


def rows(t: Tensor, last: int) -> Tensor:
    """``t`` as a 2-D ``(rows, last)`` matrix (a view where the layout allows, else a copy)."""
    return t.reshape(-1, last)
