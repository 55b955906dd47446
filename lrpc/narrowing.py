"""Narrowing: compute only the sequence position that the explained output reads.

A classifier that reads one position of a sequence (BERT's pooler and ViT's head read token 0,
``h[:, 0]``) leaves the rest of its last block's output unused: the feed-forward layers, and the attention's
query rows and output projection at every other position. torch.export keeps them (a node is dead only
when its whole value is unused), so the forward would compute them and the relevance pass would send zero
relevance back through them at full size.

:func:`narrow_positions` moves each such ``select``, and each slice of one position (``h[:, -1:]``, which
transformers' ``logits_to_keep=1`` takes before a language model's head), up the graph through the ops that
treat the selected dimension position by position (elementwise ops, linear layers, norms and softmaxes over
other dimensions, views, rows of ``mm`` and ``addmm``), so that they compute the selected position only. A
view may fold the positions into one dim with the batch (GPT-2's Conv1D computes ``(B*T, D)`` rows,
torchvision's attention ``(T*B, D)``): there the position is every T-th row, or a block of rows, and the
narrowed value keeps one row per sample (:class:`Axis`), in dynamic programs too. It stops where a value is
needed whole: a value with other users (the keys and values of attention), an input, a parameter, an op it
does not know, or a module whose relevance the user asked for. There it slices.

The output is computed from the same values. LRP rules are linear in the relevance they receive and local
to their op, so the positions cut away, which would have received none, would have sent none back: the
relevance is the unnarrowed program's too. That needs the passes that read the graph's sizes (statistic
detection in :func:`lrpc.canonize.freeze_normalizers`) to run before this one.
"""

from __future__ import annotations

import math
import operator
import sys
from collections.abc import Callable, Collection
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .ops import VALUE_MOVING_OPS
from .tracing import belongs_to, insert_call

aten = torch.ops.aten


@dataclass(frozen=True, eq=False)
class Axis:
    """Where the selected position lies in a value: along ``dim``, whose size is ``outer * T * inner`` for T
    positions. Narrowed, that dim has size ``outer * inner``. A dim that is the positions alone has
    ``outer = inner = 1``; a view that flattens ``(B, T)`` into rows has ``outer = B``, and one that flattens
    ``(T, B)`` has ``inner = B``. In a dynamic program those may be symbolic (``torch.SymInt``): compared by
    their expressions, never guarded on."""

    dim: int
    outer: int | torch.SymInt = 1
    inner: int | torch.SymInt = 1

    @property
    def kept(self) -> int | torch.SymInt:
        return self.outer * self.inner

    @property
    def folded(self) -> bool:
        return not (_static(self.outer) == 1 and _static(self.inner) == 1)

    def _replace(self, **changes: Any) -> Axis:
        return replace(self, **changes)

    def _key(self) -> tuple:
        return self.dim, _expr(self.outer), _expr(self.inner)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Axis) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())


#: ``{argument position: where that argument holds the position}`` and the op's new arguments.
Through = tuple[dict[int, Axis], tuple]


#: ``node.meta`` key of a narrowed copy: the name of the node it computes one position of.
NARROWED_FROM = "lrpc_narrowed_from"


def narrow_positions(graph: fx.Graph, keep: Collection[str] = (), whole: Collection[str] = ()) -> fx.Graph:
    """Compute only what each ``select(x, dim, index)``, or slice of one position (``x[:, -1:]``), reads of
    ``x``, as far up as that is possible. A narrowed copy records the node it stands for in
    ``meta[NARROWED_FROM]``.

    ``keep``: module paths whose nodes must stay whole (layers whose relevance is returned); ``whole``:
    names of nodes that must (a rule there holds a value per position).
    """
    paths, names = tuple(keep), frozenset(whole)

    def stays_whole(node: fx.Node) -> bool:
        return node.name in names or any(belongs_to(node, path) for path in paths)

    roots = [n for n in graph.nodes if n.op == "call_function" and n.target in (aten.select.int, aten.slice.Tensor)]
    for root in roots:
        _narrow(graph, root, stays_whole)
    graph.eliminate_dead_code()
    return graph


def _position(root: fx.Node) -> tuple[fx.Node, int, int] | None:
    """``(x, dim, index)`` for a ``select`` or a one-position ``slice`` of ``x``; ``None`` for other nodes."""
    source = root.args[0]
    # a value computed by the graph (not an input or a parameter: nothing to narrow there)
    if not isinstance(source, fx.Node) or source.op != "call_function" or _val(source) is None or _val(root) is None:
        return None
    if root.target is aten.select.int:
        dim, index = root.args[1:]
        return (source, dim % _val(source).dim(), index) if isinstance(index, int) else None
    dim, start, end, step = (*root.args[1:], *(0, None, None, 1)[len(root.args) - 1 :])
    dim = dim % _val(source).dim()
    if any(a is not None and not isinstance(a, int) for a in (start, end, step)) or step != 1:
        return None
    if not _same(_val(root).shape[dim], 1) or not _whole_dim(source, dim):
        return None
    size = _static(_val(source).shape[dim])
    if size is not None:  # the index the slice takes, as Python clamps it
        return source, dim, range(size)[start:end][0]
    start = start or 0  # a symbolic length: a slice of size 1 from the start, or of the last position
    return (source, dim, start) if start >= 0 or end in (None, sys.maxsize) else None


def _narrow(graph: fx.Graph, root: fx.Node, stays_whole: Callable[[fx.Node], bool]) -> None:
    position = _position(root)
    if position is None:
        return
    source, dim, index = position
    blocked: set[fx.Node] = set()
    while unsliceable := _unsliceable(narrowed := _sweep(root, source, Axis(dim), stays_whole, blocked)):
        blocked |= unsliceable  # whole, and so are the values only they would have read narrowed
    # moving the select only through views and copies saves nothing: leave the graph as it is
    if all(n.target in VALUE_MOVING_OPS or n.target is operator.getitem for n in narrowed):
        return
    _rewrite(graph, root, narrowed, index)


def _sweep(
    root: fx.Node, source: fx.Node, at: Axis, stays_whole: Callable[[fx.Node], bool], blocked: set[fx.Node]
) -> dict[fx.Node, tuple[Axis, Through]]:
    """The nodes to narrow for ``root``, walking up from ``source``, and how: a node is narrowed when all its
    users are (or are ``root``), it is not ``blocked`` or to stay whole, and its op computes one position from one
    position of its inputs."""
    asked: dict[fx.Node, set[Axis | None]] = {source: {at}}  # what a narrowed user needs; None: whole
    narrowed: dict[fx.Node, tuple[Axis, Through]] = {}
    node = root
    while asked and (node := node.prev).op != "root":  # backwards: a node's users are decided before it
        axes = asked.pop(node, None)
        if axes is None or len(axes) != 1 or None in axes or node in blocked:
            continue
        (at,) = axes
        if any(u is not root and u not in narrowed and not _dtype_check(u) for u in node.users) or stays_whole(node):
            continue
        through = _through(node, at)
        if through is None:
            continue
        narrowed[node] = at, through
        positions, _ = through
        for i, arg in enumerate(node.args):
            for a in _nodes(arg):
                asked.setdefault(a, set()).add(positions.get(i) if a is arg else None)
        for a in _nodes(node.kwargs):
            asked.setdefault(a, set()).add(None)
    return narrowed


def _unsliceable(narrowed: dict[fx.Node, tuple[Axis, Through]]) -> set[fx.Node]:
    """Narrowed nodes that would need an input sliced out of a fold with symbolic sizes (a block of B rows
    for a B known only at run time), which :func:`_slice_at` cannot express."""
    return {
        node for node, (_, (positions, args)) in narrowed.items() if any(
            not _sliceable(args[i], at) for i, at in positions.items()
            if args[i] not in narrowed or (args[i].target is operator.getitem and args[i].args[0] not in narrowed)
        )
    }


def _rewrite(graph: fx.Graph, root: fx.Node, narrowed: dict[fx.Node, tuple[Axis, Through]], index: int) -> None:
    new: dict[fx.Node, fx.Node] = {}
    slices: dict[tuple[fx.Node, Axis], fx.Node] = {}

    def version(node: fx.Node, at: Axis, user: fx.Node) -> fx.Node:
        """``node`` at the one position: its narrowed copy, or a slice of it where it stays whole. The slice
        belongs to the narrowed ``user`` (its module), not to ``node``'s module, whose output stays whole."""
        if node in new:
            return new[node]
        if (node, at) not in slices:
            with graph.inserting_after(node):
                slices[node, at] = insert_call(
                    graph, aten.slice.Tensor, (node, *_slice_at(node, at, index)), like=user,
                    name=f"{node.name}_at{index}",
                )
        return slices[node, at]

    for node in list(graph.nodes):
        if node not in narrowed:
            continue
        at, (positions, args) = narrowed[node]
        if node.target is operator.getitem and node.args[0] not in narrowed:
            continue  # a tuple cannot be sliced: slice the item where a user needs it
        args = tuple(version(a, positions[i], node) if i in positions else a for i, a in enumerate(args))
        expected = list(_val(node).shape)
        expected[at.dim] = at.kept
        try:
            with graph.inserting_after(node):
                twin = insert_call(graph, node.target, args, node.kwargs, like=node, name=f"{node.name}_narrowed")
                twin.meta[NARROWED_FROM] = node.name
        except Exception:  # noqa: BLE001 - the op rejects the narrowed arguments (a view of a slice)
            twin = None
        if twin is None or not all(_same(a, b) for a, b in zip(_val(twin).shape, expected, strict=True)):
            # keep the graph as it was, rather than compute something else: the copies made so far are
            # unused and go with the dead code
            return
        new[node] = twin
    for node, twin in new.items():
        for user in [u for u in node.users if _dtype_check(u)]:
            user.replace_input_with(node, twin)
    source, dim, _ = _position(root)
    root.args = (version(source, Axis(dim), root), dim, 0, *([] if root.target is aten.select.int else [1]))


def _sliceable(node: fx.Node, at: Axis) -> bool:
    """Whether :func:`_slice_at` can take the position out of ``node`` (a fold needs some of its sizes)."""
    return _slice_at(node, at, 0) is not None


def _slice_at(node: fx.Node, at: Axis, index: int) -> tuple | None:
    """``aten.slice`` arguments (dim, start, end, step) that take the position out of ``node``'s whole value:
    one index, every T-th row (``outer`` rows, T concrete), or a block of ``inner`` rows (``inner``
    concrete); ``None`` where a size they need is symbolic."""
    if not at.folded:
        return at.dim, index, index + 1 if index != -1 else sys.maxsize
    positions, inner = _static(_val(node).shape[at.dim] // at.kept), _static(at.inner)
    if positions is None:
        return None
    t = index % positions
    if inner == 1:
        return at.dim, t, sys.maxsize, positions
    return (at.dim, t * inner, (t + 1) * inner) if inner is not None and _static(at.outer) == 1 else None


def _dtype_check(node: fx.Node) -> bool:
    """Export's check of a ``.to()`` argument's dtype and device: it holds for the narrowed value too."""
    if node.target is not aten._assert_tensor_metadata.default:
        return False
    args = dict(zip(("size", "stride"), node.args[1:3])) | dict(node.kwargs)
    return args.get("size") is None and args.get("stride") is None


def _nodes(arg: Any) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg(arg, found.append)
    return found


def _val(node: Any) -> torch.Tensor | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    if isinstance(val, (tuple, list)) and val:  # a multi-output op (a norm): its outputs share leading dims
        val = val[0]
    return val if isinstance(val, torch.Tensor) else None


def _same(a: Any, b: Any) -> bool:
    return bool(statically_known_true(a == b))


def _whole_dim(node: fx.Node, d: int) -> bool:
    """Whether dim ``d`` of ``node``'s value has size other than 1 (a size-1 dim is broadcast, not narrowed)."""
    return not _same(_val(node).shape[d], 1)


# --- how each op's output at one position is computed from its inputs --------------------------------------
def _through(node: fx.Node, at: Axis) -> Through | None:
    """The inputs to narrow (and where each holds the position) so that ``node`` computes the position at
    ``at`` only, or ``None`` where the op mixes positions along that dim or lrpc does not know it."""
    if node.op != "call_function":
        return None
    if node.target is operator.getitem:  # an output of a multi-output op: decided with that op
        return {0: at}, node.args
    out = _val(node)
    if out is None or not _whole_dim(node, at.dim) or any(_val(a) is not None for a in _nodes(node.kwargs)):
        return None
    rule = _RULES.get(node.target)
    if rule is None and torch.Tag.pointwise in getattr(node.target, "tags", ()):
        rule = _pointwise
    return rule(node, at, out.dim()) if rule is not None else None


def _pointwise(node: fx.Node, at: Axis, rank: int) -> Through:
    """Broadcasting elementwise ops: each tensor argument along its own dim (right-aligned), unless it is
    broadcast along it."""
    positions = {}
    for i, a in enumerate(node.args):
        if _val(a) is not None:
            ad = at.dim - (rank - _val(a).dim())
            if ad >= 0 and _whole_dim(a, ad):
                positions[i] = at._replace(dim=ad)
    return positions, node.args


def _first_arg(node: fx.Node, at: Axis, rank: int) -> Through:
    return {0: at}, node.args


def _dims(dims: int | list[int], rank: int) -> set[int]:
    return {i % rank for i in ([dims] if isinstance(dims, int) else dims)}


def _linear(node: fx.Node, at: Axis, rank: int) -> Through | None:
    return _first_arg(node, at, rank) if at.dim < rank - 1 else None


def _norm(node: fx.Node, at: Axis, rank: int) -> Through | None:
    return _first_arg(node, at, rank) if at.dim < _val(node.args[0]).dim() - len(node.args[1]) else None


def _softmax(node: fx.Node, at: Axis, rank: int) -> Through | None:
    return _first_arg(node, at, rank) if node.args[1] % rank != at.dim else None


def _reduction(node: fx.Node, at: Axis, rank: int) -> Through | None:
    """``sum`` / ``mean`` / ``amax`` / ``any`` over dims other than the narrowed one."""
    x = _val(node.args[0])
    reduced = node.args[1] if len(node.args) > 1 else None
    if reduced is None or reduced == []:  # no dims: a reduction over all of them
        return None
    reduced = _dims(reduced, x.dim())
    keepdim = bool(node.args[2]) if len(node.args) > 2 else bool(node.kwargs.get("keepdim", False))
    kept = list(range(x.dim())) if keepdim else [i for i in range(x.dim()) if i not in reduced]
    xd = kept[at.dim]
    return ({0: at._replace(dim=xd)}, node.args) if xd not in reduced else None


def _view(node: fx.Node, at: Axis, rank: int) -> Through | None:
    """A view keeps the position if some input dim holds it: the same number of elements before the position
    and after it in both shapes' row-major order. That dim may hold it whole, or folded with the batch
    (``(B*T, D)`` from ``(B, T, D)``), but not with samples both before and after it in one dim."""
    x, out = _val(node.args[0]), _val(node)
    shape = _with_size(list(node.args[1]), at.dim, at.kept)
    if shape is None or any(_same(n, 0) for n in (*x.shape, *out.shape)):
        return None
    positions = out.shape[at.dim] // at.kept
    before = math.prod(out.shape[: at.dim]) * at.outer
    after = math.prod(out.shape[at.dim + 1 :]) * at.inner
    for xd in range(x.dim()):
        head, tail = math.prod(x.shape[:xd]), math.prod(x.shape[xd + 1 :])
        outer, inner = before // head, after // tail
        if (
            _same(outer * head, before) and _same(inner * tail, after)
            and _same(outer * positions * inner, x.shape[xd]) and (_same(outer, 1) or _same(inner, 1))
        ):
            return {0: Axis(xd, _simplest(outer), _simplest(inner))}, (node.args[0], shape)
    return None


def _expand(node: fx.Node, at: Axis, rank: int) -> Through | None:
    xd = at.dim - (rank - _val(node.args[0]).dim())
    whole = xd >= 0 and _whole_dim(node.args[0], xd)
    sizes = list(node.args[1])
    if whole:
        sizes[at.dim] = -1  # the narrowed input's size
    elif (kept := _static(at.kept)) is not None:
        sizes[at.dim] = kept
    else:
        return None
    return ({0: at._replace(dim=xd)} if whole else {}), (node.args[0], sizes, *node.args[2:])


def _permute(node: fx.Node, at: Axis, rank: int) -> Through:
    return {0: at._replace(dim=node.args[1][at.dim] % rank)}, node.args


def _unsqueeze(node: fx.Node, at: Axis, rank: int) -> Through:
    return {0: at._replace(dim=at.dim if at.dim < node.args[1] % rank else at.dim - 1)}, node.args


def _squeeze(node: fx.Node, at: Axis, rank: int) -> Through | None:
    """``squeeze`` of dims of size 1 only: the narrowed dim has size 1 too (unless folded), and squeezing
    without dims, or a dim of another size (a no-op before), would remove it."""
    x = _val(node.args[0])
    if len(node.args) < 2:
        return None
    dims = _dims(node.args[1], x.dim())
    if not all(_same(x.shape[i], 1) for i in dims):
        return None
    kept = [i for i in range(x.dim()) if i not in dims]
    return {0: at._replace(dim=kept[at.dim])}, node.args


def _slice(node: fx.Node, at: Axis, rank: int) -> Through | None:
    """A slice along another dim, or one that keeps the whole narrowed dim (``h[:, 0:]``: transformers'
    ``logits_to_keep=0``, which a dynamic program keeps)."""
    sliced = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    whole = _same(_val(node).shape[at.dim], _val(node.args[0]).shape[at.dim])
    return _first_arg(node, at, rank) if sliced % rank != at.dim or whole else None


def _select(node: fx.Node, at: Axis, rank: int) -> Through:
    return {0: at._replace(dim=at.dim if at.dim < node.args[1] % (rank + 1) else at.dim + 1)}, node.args


def _bmm(node: fx.Node, at: Axis, rank: int) -> Through:
    """``(N, M, K) @ (N, K, P)``: a batch entry of both, a row of the first, a column of the second."""
    d = at.dim
    return ({0: at, 1: at} if d == 0 else {0: at} if d == 1 else {1: at}), node.args


def _mm(node: fx.Node, at: Axis, rank: int) -> Through:
    return ({0: at} if at.dim == 0 else {1: at}), node.args


def _addmm(node: fx.Node, at: Axis, rank: int) -> Through:
    """``bias + (M, K) @ (K, N)`` (GPT-2's Conv1D): a row of the first factor or a column of the second, and
    the bias where it is not broadcast along the narrowed dim."""
    positions, _ = _pointwise(node, at, rank) if _val(node.args[0]) is not None else ({}, None)
    bias = {0: positions[0]} if 0 in positions else {}
    return ({1: at} if at.dim == 0 else {2: at}) | bias, node.args


def _static(size: Any) -> int | None:
    """A size as a Python int, or ``None`` if it is symbolic."""
    return size.node.maybe_as_int() if isinstance(size, torch.SymInt) else size


def _simplest(size: Any) -> Any:
    return size if _static(size) is None else _static(size)


def _expr(size: Any) -> Any:
    """A hashable stand-in for a size: the int, or a symbolic size's expression."""
    return str(size.node.expr) if _static(size) is None else _static(size)


def _with_size(shape: list, d: int, size: Any) -> list | None:
    """A view's ``shape`` argument with ``size`` at ``d``; a symbolic size as ``-1`` (inferred), where no
    other dim is ``-1`` already."""
    if _static(size) is not None:
        shape[d] = _static(size)
    elif shape[d] == -1 or not any(isinstance(n, int) and n == -1 for n in shape):
        shape[d] = -1
    else:
        return None
    return shape


# ops of the decomposed graph only: reshape, transpose and the like arrive as view and permute
_RULES: dict[Any, Callable[[fx.Node, Axis, int], Through | None]] = {
    aten.linear.default: _linear,
    aten.native_layer_norm.default: _norm,
    aten.rms_norm.default: _norm,
    aten._softmax.default: _softmax,
    aten._log_softmax.default: _softmax,
    aten.sum.dim_IntList: _reduction,
    aten.mean.dim: _reduction,
    aten.amax.default: _reduction,
    aten.amin.default: _reduction,
    aten.any.dim: _reduction,
    aten.view.default: _view,
    aten.expand.default: _expand,
    aten.permute.default: _permute,
    aten.unsqueeze.default: _unsqueeze,
    aten.squeeze.dims: _squeeze,
    aten.slice.Tensor: _slice,
    aten.select.int: _select,
    aten.bmm.default: _bmm,
    aten.mm.default: _mm,
    aten.addmm.default: _addmm,
    aten.clone.default: _first_arg,
    aten._to_copy.default: _first_arg,
    aten.alias.default: _first_arg,
}
