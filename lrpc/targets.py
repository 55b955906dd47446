"""Targets and seeds: which output the relevance pass starts from, and with how much relevance.

``target`` selects output entries: ``None`` (each sample's arg max), an ``int``, one index per sample
(a LongTensor, a list or a NumPy array), or a callable ``output -> seed`` for anything else. For sequence
outputs ``(B, T, V)`` an index selects a class at the last position. ``seed="logit"`` (default) puts in
the selected output value, so input relevance sums to the logit up to what biases absorb (LXT, the LRP
papers); ``seed="one"`` puts in 1.0 (Zennit, DynamicLRP).
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from .errors import LRPCError

Seed = Literal["logit", "one"]
TargetMode = Literal["argmax", "index", "callable"]
SEEDS = ("logit", "one")


@dataclass(frozen=True)
class TargetSpec:
    """The compile-time part of a target: its mode (and the callable itself, traced into the program)."""

    mode: TargetMode
    seed: Seed
    fn: Callable[[Tensor], Tensor] | None = None


def _hashable(value: Any) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True


@dataclass(frozen=True, eq=False)
class _ByIdentity:
    """An unhashable callable target (an instance of a ``@dataclass`` with ``__call__``) keyed in the program
    cache by identity, as a function is: the same object on every call reuses its program. The key holds
    the object, so its ``id`` is not reused while the program is cached."""

    fn: Callable[[Tensor], Tensor]

    def __call__(self, output: Tensor) -> Tensor:
        return self.fn(output)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _ByIdentity) and other.fn is self.fn

    def __hash__(self) -> int:
        return id(self.fn)


def parse(target: Any, seed: str) -> tuple[TargetSpec, Any]:
    """Split a user's ``target`` into what the program is compiled for and the per-call value."""
    if seed not in SEEDS:
        raise LRPCError(f"seed must be one of {SEEDS}, got {seed!r}")
    if target is None:
        return TargetSpec("argmax", seed), None
    if callable(target) and not isinstance(target, Tensor):
        return TargetSpec("callable", seed, target if _hashable(target) else _ByIdentity(target)), None
    if isinstance(target, numbers.Integral) and not isinstance(target, bool):  # NumPy's integers too
        return TargetSpec("index", seed), int(target)
    if not isinstance(target, Tensor) and (isinstance(target, (list, tuple)) or hasattr(target, "__array__")):
        try:
            target = torch.as_tensor(target)
        except (TypeError, ValueError, RuntimeError) as e:
            raise LRPCError(f"target: cannot read per-sample class indices from {type(target).__name__}: {e}") from e
    if not isinstance(target, Tensor):
        raise LRPCError(
            "target must be None, an int, per-sample class indices (a LongTensor, list or array) or a callable, "
            f"got {type(target).__name__}"
        )
    return TargetSpec("index", seed), target


def index_tensor(target: int | Tensor, batch: int, device: torch.device) -> Tensor:
    """The per-sample class indices, shape ``(batch,)``."""
    if isinstance(target, int):
        return torch.full((batch,), target, dtype=torch.long, device=device)
    if target.dtype in (torch.float16, torch.float32, torch.float64, torch.bfloat16, torch.bool):
        raise LRPCError(f"target tensor must hold integer class indices, got dtype {target.dtype}")
    target = target.to(device=device, dtype=torch.long)
    if target.dim() != 1:
        target = target.reshape(-1)
    if target.numel() == 1 and batch != 1:
        target = target.expand(batch)
    if target.numel() != batch:
        raise LRPCError(f"target has {target.numel()} indices for a batch of {batch}")
    return target


def class_index(output: Tensor, spec: TargetSpec, index: Tensor | None) -> Tensor | None:
    """The class explained per sample: ``index`` as given, the top class if none was, or ``None`` where the
    target picks no class (a callable; an output of one score per sample)."""
    if spec.mode == "callable" or output.dim() <= 1:
        return None
    if output.dim() > 3:
        raise LRPCError(
            f"cannot pick a class in an output of shape {tuple(output.shape)}; pass target= a callable "
            "that returns the seed tensor"
        )
    return (output[:, -1] if output.dim() == 3 else output).argmax(-1) if index is None else index


def seed_relevance(output: Tensor, spec: TargetSpec, index: Tensor | None) -> Tensor:
    """The relevance put in at the output, for the class :func:`class_index` gives (``None``: no class)."""
    if spec.mode == "callable":
        assert spec.fn is not None
        seed = spec.fn(output)
        if not isinstance(seed, Tensor) or seed.shape != output.shape:
            raise LRPCError(
                f"a callable target must return a seed tensor shaped like the output {tuple(output.shape)}, "
                f"got {getattr(seed, 'shape', type(seed).__name__)}"
            )
        return seed.to(output.dtype)
    if index is None:  # one score per sample (or a scalar): explain it
        return output if spec.seed == "logit" else torch.ones_like(output)
    hit = torch.arange(output.shape[-1], device=output.device) == index.unsqueeze(-1)
    if output.dim() == 3:  # sequences: the last position
        hit = hit.unsqueeze(1) & _last_position(output).unsqueeze(-1)
    # one output-sized tensor (a mask times the output was two: a language model's logits are the largest)
    return torch.where(hit, output, 0.0) if spec.seed == "logit" else hit.to(output.dtype)


def class_seed(output: Tensor, spec: TargetSpec, index: Tensor) -> Tensor:
    """The seed at the explained class alone, ``(*output.shape[:-1], 1)``: :func:`seed_relevance` gathered
    at :func:`at_class`, without making the output-sized seed (a language model's logits are the largest
    tensor of its program), for an output layer cut down to that class."""
    if spec.seed == "logit":
        seed = output.gather(-1, at_class(index, output))
    else:
        seed = output.new_ones(*output.shape[:-1], 1)
    if output.dim() == 3:
        seed = torch.where(_last_position(output).unsqueeze(-1), seed, 0.0)
    return seed


def at_class(index: Tensor, output: Tensor) -> Tensor:
    """``index`` as a gather index into ``output``'s last dim: each sample's class, at every position."""
    return index.view(-1, *[1] * (output.dim() - 1)).expand(*output.shape[:-1], 1)


def _last_position(output: Tensor) -> Tensor:
    return torch.arange(output.shape[1], device=output.device) == output.shape[1] - 1
