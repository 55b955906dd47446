"""Watching a model for changes that make its traced programs stale: a replaced submodule, parameter or
buffer (``model.head = nn.Linear(...)``, ``load_state_dict(..., assign=True)``), a cast or a move.

Programs read the parameter objects they were traced with, so in-place updates (an optimizer step) are
seen, but a replaced object is not. Checking every member on every call would cost a large model tens of
microseconds; instead PyTorch's global registration hooks bump a counter whenever any module anywhere gets
a member assigned, and only then are the model's members compared with those seen before. A cast or move
changes no object: one floating-point member's dtype and device go into the cache key.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

from torch import Tensor, nn

_STRUCTURE_VERSION = [0]  # bumped whenever any module anywhere gets a submodule, parameter or buffer assigned
_VERSION_HOOKS: list[Any] = []
_HOOKS_LOCK = threading.Lock()
_TRACING = threading.local()  # set on a thread while lrpc traces: export swaps parameters in and out
_IN_TRACE: set[int] = set()  # ids of the models being traced, whose members are fakes meanwhile


def _bump(*_: Any) -> None:
    if not getattr(_TRACING, "active", False):
        _STRUCTURE_VERSION[0] += 1


@contextlib.contextmanager
def being_traced(model: nn.Module) -> Iterator[None]:
    """Assignments made by lrpc's own trace of ``model`` on this thread (export swaps the parameters for fake
    ones and back) leave the version alone, and the model's members are not compared meanwhile: another
    thread would see the fakes and drop its programs."""
    _TRACING.active = True
    _IN_TRACE.add(id(model))
    try:
        yield
    finally:
        _IN_TRACE.discard(id(model))
        _TRACING.active = False


class ModelState:
    """Notices a model whose parameters, buffers or submodules were replaced (``model.head = nn.Linear(...)``,
    ``load_state_dict(..., assign=True)``), or which was cast or moved, after programs were traced from it:
    they compute with what the trace saw, so they are dropped. Per call this costs a counter and one
    tensor's dtype and device: PyTorch's global registration hooks bump the counter on any assignment, and
    only then are the model's modules and tensors compared with those seen before."""

    def __init__(self, model: nn.Module, on_change: Callable[[], None]) -> None:
        with _HOOKS_LOCK:  # installed once per process
            if not _VERSION_HOOKS:
                from torch.nn.modules import module as m

                _VERSION_HOOKS.extend(
                    register(_bump)
                    for register in (
                        m.register_module_module_registration_hook,
                        m.register_module_parameter_registration_hook,
                        m.register_module_buffer_registration_hook,
                    )
                )
        self.model, self.on_change = model, on_change
        self.version = -1
        self.members: tuple[Any, ...] = ()
        self.probe = _probe(_members(model)[1])

    def dtype_and_device(self) -> tuple[Any, Any] | None:
        """The probe's dtype and device (in the cache key); calls ``on_change`` first if members were replaced."""
        if self.version != _STRUCTURE_VERSION[0]:
            self._refresh()
        probe = self.probe
        return None if probe is None else (probe.dtype, probe.device)

    def _refresh(self) -> None:
        if id(self.model) in _IN_TRACE:  # mid-trace on another thread: compare when it is done
            return
        version = _STRUCTURE_VERSION[0]
        members, tensors = _members(self.model)
        same = len(members) == len(self.members) and all(a is b for a, b in zip(members, self.members))
        if not same and self.members:
            self.on_change()
        self.members, self.version, self.probe = members, version, _probe(tensors)


def _members(model: nn.Module) -> tuple[tuple[Any, ...], list[Tensor | None]]:
    """Every submodule, parameter and buffer of ``model`` (what a program may have traced), and the tensors."""
    modules = [m for _, m in model.named_modules(remove_duplicate=False)]
    tensors = [t for m in modules for t in (*m._parameters.values(), *m._buffers.values())]
    return (*modules, *tensors), tensors


def _probe(tensors: list[Tensor | None]) -> Tensor | None:
    """A floating-point parameter or buffer: a cast or move of the model shows on it."""
    return next((t for t in tensors if t is not None and t.is_floating_point()), None)
