"""Backends ("executors"): what runs a generated relevance program. One seam: a backend takes the
``fx.GraphModule`` and returns a callable with the same signature. Register more with
:func:`register_backend` (the Triton backend plugs in here)."""

from __future__ import annotations

from typing import Callable

import torch
import torch.fx as fx

from .errors import LRPCError

Backend = Callable[[fx.GraphModule], Callable[..., tuple]]
_BACKENDS: dict[str, Backend] = {}

#: Runs the rules eagerly on real tensors without tracing: the reference, slow, for checking the others.
INTERPRET = "interpret"


def register_backend(name: str, backend: Backend) -> None:
    """Make ``backend`` available as ``lrpc.compile(..., backend=name)``."""
    _BACKENDS[name] = backend


def names() -> list[str]:
    return sorted([*_BACKENDS, INTERPRET, "auto"])


def resolve(name: str) -> str:
    """Validate a backend name; ``auto`` picks the default compiled backend (Inductor)."""
    if name == "auto":
        return "inductor"
    if name != INTERPRET and name not in _BACKENDS:
        raise LRPCError(f"unknown backend '{name}'; available: {', '.join(names())}")
    return name


def get(name: str) -> Backend:
    return _BACKENDS[name]


def _eager(gm: fx.GraphModule) -> Callable[..., tuple]:
    """Run the generated GraphModule as is: one aten call per node."""
    return gm


def _inductor(gm: fx.GraphModule) -> Callable[..., tuple]:
    """``torch.compile`` with Inductor: fused C++/OpenMP kernels on CPU, Triton on GPU."""
    return torch.compile(gm, backend="inductor", fullgraph=True, dynamic=None)


register_backend("eager", _eager)
register_backend("inductor", _inductor)
