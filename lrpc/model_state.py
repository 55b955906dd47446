"""Watching a model for changes that make its traced programs stale: a replaced, removed or added submodule,
parameter or buffer (``model.head = nn.Linear(...)``, ``del model.head``, ``layer.bias = None``,
``load_state_dict(..., assign=True)``), a cast or a move.

Programs read the parameter objects they were traced with, so in-place updates (an optimizer step) are
seen, but a replaced object is not. Every call compares the values of every module's submodule, parameter
and buffer dicts, by identity, with those seen at the last call: 34 µs for ResNet-50's 453 dicts (its
call takes milliseconds), 1.5 µs for a three-layer MLP. PyTorch's global registration hooks, which an
earlier version relied on, do not fire when a member is deleted or a parameter set to ``None``. A cast or
move changes no object: one floating-point member's dtype and device go into the cache key.
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Callable, Iterator
from itertools import chain
from typing import Any

from torch import Tensor, nn

_IN_TRACE: set[int] = set()  # ids of the models being traced, whose members are fakes meanwhile


@contextlib.contextmanager
def being_traced(model: nn.Module) -> Iterator[None]:
    """While lrpc traces ``model`` (export swaps its parameters for fake ones and back), its members are not
    compared: a call on another thread would see the fakes and drop its programs."""
    _IN_TRACE.add(id(model))
    try:
        yield
    finally:
        _IN_TRACE.discard(id(model))


class ModelState:
    """Notices a model whose parameters, buffers or submodules were replaced, removed or added, or which was
    cast or moved, after programs were traced from it: they compute with what the trace saw, so they are
    dropped (``on_change``). Per call this costs one identity comparison of the model's members and one
    tensor's dtype and device."""

    def __init__(self, model: nn.Module, on_change: Callable[[], None]) -> None:
        self.model, self.on_change = model, on_change
        self.seen = self._snapshot()

    def dtype_and_device(self) -> tuple[Any, Any] | None:
        """The probe's dtype and device (in the cache key); calls ``on_change`` first if members changed."""
        dicts, members, probe = self.seen  # one read: another thread may replace it meanwhile
        if id(self.model) not in _IN_TRACE and not _same(dicts, members):
            self.on_change()
            self.seen = self._snapshot()
            probe = self.seen[2]
        return None if probe is None else (probe.dtype, probe.device)

    def _snapshot(self) -> tuple[list[dict], list[Any], Tensor | None]:
        """The model's member dicts, their values, and the probe."""
        modules = [m for _, m in self.model.named_modules(remove_duplicate=False)]
        # a TorchScript module's members are mappings of its own (not dicts), which lrpc does not trace into
        dicts = [d for m in modules for d in (m._modules, m._parameters, m._buffers) if isinstance(d, dict)]
        members = list(chain.from_iterable(map(dict.values, dicts)))
        return dicts, members, _probe(members)


def _same(dicts: list[dict], members: list[Any]) -> bool:
    """Whether ``dicts`` still hold exactly ``members``, object for object."""
    now = list(chain.from_iterable(map(dict.values, dicts)))
    return len(now) == len(members) and all(map(operator.is_, now, members))


def _probe(members: list[Any]) -> Tensor | None:
    """A floating-point parameter or buffer: a cast or move of the model shows on it."""
    return next((t for t in members if isinstance(t, Tensor) and t.is_floating_point()), None)
