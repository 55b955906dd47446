"""Canonicalization: graph passes that put the traced graph in the form the rules expect.

Each pass takes an ``fx.Graph`` and returns it (rewritten in place), in the style of ``torch.fx`` passes:

* :func:`fold_batch_norm`: an eval-mode batch norm right after a convolution or linear layer becomes
  part of that layer (weights and bias folded in the graph, so gamma-style rules see the folded weights);
* :func:`freeze_normalizers`: in ``x * s`` where ``s`` is a statistic of ``x`` (``rsqrt(mean(x²) + eps)``
  in a hand-written RMSNorm, ``1/std`` in a decomposed layer norm), ``s`` is marked constant, so the
  normalization passes relevance like the composite norm ops do (AttnLRP);
* :func:`lrpc.narrowing.narrow_positions`: a classifier that reads one position of a sequence computes
  its last block at that position only;
* :func:`group_activations`: an elementwise function of one tensor written with primitive ops
  (GPT-2's ``0.5·x·(1 + tanh(√(2/π)(x + 0.044715x³)))``, ``x·sigmoid(1.702x)``) is marked as one
  activation, so it gets the activation rule (identity) instead of a product rule inside it.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Collection, Sequence
from typing import Any

import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .narrowing import narrow_positions
from .ops import Family, lookup
from .tracing import FUSED_META, insert_call, module_stack

aten = torch.ops.aten

#: Marks tensor arguments (by schema name) that a node treats as constants.
FROZEN_META = "lrpc_frozen_args"
#: On the output of an elementwise activation written with primitives: ``(source node, region nodes)``.
ACTIVATION_META = "lrpc_activation"

_BATCH_NORM = (aten._native_batch_norm_legit_no_training.default,)


def canonicalize(
    graph: fx.Graph,
    inputs: Sequence[fx.Node] = (),
    *,
    fold: bool = True,
    keep: Sequence[str] = (),
    narrow: bool = True,
    whole: Collection[str] = (),
) -> fx.Graph:
    """All canonicalization passes, in order. ``inputs``: the user-input placeholders; ``fold=False``
    keeps batch norms as they are; ``keep``: module paths whose values stay whole (requested layers);
    ``whole``: names of nodes that narrowing leaves whole (a rule there holds a value per position);
    ``narrow=False`` skips narrowing."""
    if fold:
        graph = fold_batch_norm(graph)
    graph = freeze_normalizers(graph)  # before narrowing: it tells statistics from values by their sizes
    if narrow:
        graph = narrow_positions(graph, keep, whole)
    graph = group_activations(graph, inputs)  # after: it records the nodes of each activation
    graph.eliminate_dead_code()
    graph.lint()
    return graph


def fold_batch_norm(graph: fx.Graph) -> fx.Graph:
    """Fold ``batch_norm(conv(x, W, b))`` into ``conv(x, W * s, (b - mean) * s + beta)`` with
    ``s = gamma / sqrt(var + eps)``, for convolutions (transposed too) and rank-2 linear layers whose only user
    is the batch norm. The folding arithmetic runs on the parameters inside the graph."""
    for bn in list(graph.nodes):
        if bn.op != "call_function" or bn.target not in _BATCH_NORM:
            continue
        layer, gamma, beta, mean, var, _momentum, eps = bn.args
        if not _foldable(layer):
            continue
        outs = [u for u in bn.users if u.target is operator.getitem and u.args[1] == 0]
        if len(outs) != 1 or len(bn.users) != 1:
            continue
        (out,) = outs
        def call(op: Callable, *args: Any, bn: fx.Node = bn) -> fx.Node:
            return insert_call(graph, op, args, like=bn)

        with graph.inserting_before(layer):
            scale = call(aten.rsqrt.default, call(aten.add.Tensor, var, eps))
            if gamma is not None:
                scale = call(aten.mul.Tensor, scale, gamma)
            weight = layer.args[1]
            new_weight = _scaled_per_output_channel(layer, weight, scale, call)
            bias = layer.args[2] if len(layer.args) > 2 else None
            shift = mean if bias is None else call(aten.sub.Tensor, mean, bias)
            new_bias = call(aten.neg.default, call(aten.mul.Tensor, shift, scale))
            if beta is not None:
                new_bias = call(aten.add.Tensor, new_bias, beta)
        args = list(layer.args)
        args[1] = new_weight
        if len(args) > 2:
            args[2] = new_bias
        else:
            args.append(new_bias)
        layer.args = tuple(args)
        layer.meta["val"] = out.meta["val"]
        layer.meta[FUSED_META] = layer.meta.get(FUSED_META, []) + _paths(bn)
        out.replace_all_uses_with(layer)
        graph.erase_node(out)
        graph.erase_node(bn)
    return graph


def _scaled_per_output_channel(layer: fx.Node, weight: fx.Node, scale: fx.Node, call: Callable[..., fx.Node]) -> fx.Node:
    """``weight`` with output channel ``c`` scaled by ``scale[c]``. A convolution's and a linear layer's weight
    is ``(out, in, ...)``; a transposed convolution's ``(in, out / groups, ...)``, the groups in its first dim."""
    shape = list(weight.meta["val"].shape)
    if not (layer.target is aten.convolution.default and layer.args[6]):
        return call(aten.mul.Tensor, weight, call(aten.view.default, scale, [-1] + [1] * (len(shape) - 1)))
    groups, kernel = layer.args[8], [1] * (len(shape) - 2)
    grouped = call(aten.view.default, weight, [groups, shape[0] // groups, *shape[1:]])
    scaled = call(aten.mul.Tensor, grouped, call(aten.view.default, scale, [groups, 1, shape[1], *kernel]))
    return call(aten.view.default, scaled, shape)


def _foldable(layer: Any) -> bool:
    if not isinstance(layer, fx.Node) or layer.op != "call_function" or len(layer.users) != 1:
        return False
    if layer.target is aten.convolution.default:
        return True
    if layer.target is aten.linear.default:
        return len(layer.meta["val"].shape) == 2
    return False


def _paths(node: fx.Node) -> list[str]:
    stack = module_stack(node)
    return [stack[-1][0]] if stack else []


_STATISTICS = {
    aten.mean.dim, aten.mean.default, aten.sum.dim_IntList, aten.sum.default, aten.var.correction,
    aten.var.dim, aten.std.correction, aten.var_mean.correction, aten.linalg_vector_norm.default,
    aten.amax.default,
}
_ELEMENTWISE = {Family.PASS, Family.ROUTE, Family.SCALE, Family.SUM}


#: Decompositions whose outputs are statistics of a matrix: ``torch.linalg.norm(x, ord=2, dim=(1, 2))`` (the
#: spectral norm, in Hugging Face's ConvNeXt-V2 GRN) is the largest singular value.
_FACTORIZATIONS = {aten._linalg_svd.default}


def _chain(node: Any, limit: int = 12) -> list[fx.Node]:
    """``node`` and what it was computed from through elementwise and routing ops and the outputs of a
    factorization (first tensor arg)."""
    out = []
    while isinstance(node, fx.Node) and len(out) < limit:
        out.append(node)
        if node.op != "call_function":
            break
        if node.target in _STATISTICS:
            break
        spec = lookup(node.target)
        factor = node.target in _FACTORIZATIONS or (
            node.target is operator.getitem and getattr(node.args[0], "target", None) in _FACTORIZATIONS
        )
        if not factor and (spec is None or spec.family not in _ELEMENTWISE):
            break
        node = next((a for a in node.args if isinstance(a, fx.Node)), None)
    return out


def _statistic_of(s: fx.Node, x: fx.Node) -> bool:
    """Whether ``s`` is a broadcast statistic (a reduction, then elementwise ops) of what ``x`` comes from."""
    sv, xv = s.meta.get("val"), x.meta.get("val")
    if not isinstance(sv, torch.Tensor) or not isinstance(xv, torch.Tensor):
        return False
    if not statically_known_true(sv.numel() < xv.numel()):  # sizes may be data-dependent (MoE routing)
        return False
    reduction = next((n for n in _chain(s) if n.op == "call_function" and n.target in _STATISTICS), None)
    if reduction is None:
        return False
    sources = set(_chain(reduction.args[0]))
    return any(n in sources for n in _chain(x))


def freeze_normalizers(graph: fx.Graph) -> fx.Graph:
    """Mark the statistic factor of ``x * s`` (see the module docstring) as a constant argument."""
    for node in graph.nodes:
        if node.op != "call_function" or node.target is not aten.mul.Tensor:
            continue
        a, b = node.args[0], node.args[1]
        if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
            continue
        if _statistic_of(b, a):
            node.meta[FROZEN_META] = frozenset({"other"})
        elif _statistic_of(a, b):
            node.meta[FROZEN_META] = frozenset({"self"})
    return graph


#: Shape-preserving ops that only convert or copy (allowed inside an activation region).
_COPIES = {aten._to_copy.default, aten.clone.default, aten.alias.default, aten.detach.default}


def _elementwise(node: fx.Node) -> bool:
    """A pointwise aten op (its tag says so) or a copy / dtype conversion."""
    if node.op != "call_function" or not isinstance(node.meta.get("val"), torch.Tensor):
        return False
    target = node.target
    return target in _COPIES or (isinstance(target, torch._ops.OpOverload) and torch.Tag.pointwise in target.tags)


def _region(y: fx.Node, depends: Callable[[fx.Node], bool]) -> tuple[fx.Node, list[fx.Node]] | None:
    """The elementwise region computing ``y`` from one same-shaped source, if there is one: grow from
    ``y`` through elementwise ops whose every user is already inside; what stays outside must be one
    same-shaped source plus constants (parameters, scalars)."""
    shape = y.meta["val"].shape
    region, frontier = {y}, set(y.all_input_nodes)
    grown = True
    while grown:
        grown = False
        for arg in list(frontier):
            val = arg.meta.get("val")
            same = isinstance(val, torch.Tensor) and _same_shape(val.shape, shape)
            if same and _elementwise(arg) and all(u in region for u in arg.users):
                region.add(arg)
                frontier.discard(arg)
                frontier.update(a for a in arg.all_input_nodes if a not in region)
                grown = True
    sources = [a for a in frontier if isinstance(a.meta.get("val"), torch.Tensor) and depends(a)]
    if len(region) < 2 or len(sources) != 1 or not _same_shape(sources[0].meta["val"].shape, shape):
        return None
    if not any((spec := lookup(n.target)) is not None and spec.family is Family.PASS for n in region):
        return None  # purely linear: the ops' own rules already compose
    return sources[0], [n for n in y.graph.nodes if n in region]


def _same_shape(a: torch.Size, b: torch.Size) -> bool:
    """Equal shapes, decided without guarding on data-dependent sizes (unknown counts as different)."""
    return len(a) == len(b) and all(statically_known_true(x == y) for x, y in zip(a, b))


def group_activations(graph: fx.Graph, inputs: Sequence[fx.Node] = ()) -> fx.Graph:
    """Mark elementwise activations written with primitive ops (see the module docstring). ``inputs``
    are the user-input placeholders: what does not depend on them is a constant."""
    depends = _dependence(graph, inputs)
    claimed: set[fx.Node] = set()
    for y in reversed(list(graph.nodes)):
        if y in claimed or not _elementwise(y) or not is_float(y) or not depends(y):
            continue
        found = _region(y, depends)
        if found is not None:
            y.meta[ACTIVATION_META] = found
            claimed.update(found[1])
    return graph


def _dependence(graph: fx.Graph, inputs: Sequence[fx.Node]) -> Callable[[fx.Node], bool]:
    dependent = set(inputs)
    for node in graph.nodes:
        if any(a in dependent for a in node.all_input_nodes):
            dependent.add(node)
    return dependent.__contains__


def is_float(node: fx.Node) -> bool:
    """Whether ``node`` holds one floating-point tensor."""
    val = node.meta.get("val")
    return isinstance(val, torch.Tensor) and val.is_floating_point()
