"""An FX pass that swaps the fused rule kernels into a generated relevance program.

The relevance program (:func:`lrpc.codegen.generate`) is a flat aten ``fx.GraphModule``. The rules appear in
it as fixed aten patterns, which :func:`fuse` finds and replaces with one ``torch.ops.lrpc_kernels.*`` call
each (:mod:`lrpc.kernels.ops`):

``linear_epsilon``
    ``mul(x, view(mm(view(q), B)))`` with ``q = R ⊘ stab(z)`` spelled as :func:`lrpc.rules.divide` traces
    (``div(R, add(z, where(ge(z, 0), new_full(z, [], eps), new_full(z, [], -eps))))``, or for ``eps = 0``
    ``where(eq(z, 0), 0, div(R, where(eq(z, 0), 1, z)))``). The match is by the arithmetic alone, so it is
    exact whatever rule produced it: ε on a linear layer (``B = W``), and the same step inside other rules.
``softmax_relevance``
    ``where(eq(s, 0), 0, mul(x, sub(R, mul(s, sum(R, [dim], keepdim)))))`` (:class:`lrpc.rules.Softmax`).
``uniform_product``
    the two halves ``mul(mul(a, 0.5), mul(q, b))`` and ``mul(mul(b, 0.5), mul(q, a))`` with
    ``q = R ⊘ stab(mul(a, b))`` (:class:`lrpc.rules.UniformProduct` on ``a * b``, same shapes).
``linear_zplus``, ``linear_alpha_beta``, ``linear_gamma``
    the nodes one :class:`~lrpc.rules.ZPlus` / :class:`~lrpc.rules.AlphaBeta` / :class:`~lrpc.rules.Gamma`
    application on a linear layer produced, found by the rule annotation codegen puts on every relevance
    node (``node.meta["custom"]["lrpc_rule"]``: ``"Gamma(gamma=0.25, stabilizer=1e-06) at linear ..."``).
    The region's one output is replaced; its inputs (x, W, b, z, R) are read off the region's structure,
    the parameters off the annotation. Regions that do not look exactly like a linear layer's (several
    outputs, a convolution, ``x @ W`` instead of ``x @ Wᵀ``, unexpected ops) are left alone.

Every match also checks shapes (no broadcasting, rows aligned) and dtypes (one of float32, float16,
bfloat16) from the nodes' fake values; anything else stays as it was. The replaced nodes that nothing
else uses are removed by dead-code elimination.
"""

import operator
import re
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from lrpc.memory import impure, written_in_place

from . import ops
from ._common import DTYPES

aten = torch.ops.aten

#: Patterns :func:`fuse` knows, in the order it applies them (regions first: their inner ε-like steps
#: would otherwise be fused one by one).
PATTERNS = ("signed_linear", "linear_epsilon", "softmax", "uniform_product")

FUSED_META = "lrpc_fused"  # gm.meta[FUSED_META]: {pattern: number of replacements}
RULE_META = "lrpc_rule"  # = lrpc.codegen.RULE_META (not imported: codegen pulls in the whole compiler)

_VIEWS = (aten.view.default, aten._unsafe_view.default, aten.reshape.default)


def fuse(gm: fx.GraphModule, patterns: Iterable[str] = PATTERNS) -> fx.GraphModule:
    """A copy of the relevance program ``gm`` with the rule patterns replaced by fused kernel calls.

    ``gm`` is left unchanged. The result records how many of each pattern it replaced in
    ``result.meta["lrpc_fused"]``. Runs wherever the kernels run (CUDA; CPU under ``TRITON_INTERPRET=1``).
    """
    patterns = tuple(patterns)
    unknown = set(patterns) - set(PATTERNS)
    if unknown:
        raise ValueError(f"fuse: unknown patterns {sorted(unknown)}; known: {', '.join(PATTERNS)}")
    graph = fx.Graph()
    graph._codegen = gm.graph._codegen  # keep the calling convention make_fx gave the program
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    passes: dict[str, Callable[[fx.Graph], int]] = {
        "signed_linear": _fuse_signed_linear,
        "linear_epsilon": _fuse_linear_epsilon,
        "softmax": _fuse_softmax,
        "uniform_product": _fuse_uniform_product,
    }
    counts: dict[str, int] = {}
    for name in PATTERNS:
        if name in patterns:
            counts[name] = passes[name](graph)
            graph.eliminate_dead_code()  # before the next pattern: it must not match what just went dead
    graph.lint()
    fused = fx.GraphModule(gm, graph)
    fused.meta[FUSED_META] = counts
    return fused


def fused_counts(gm: fx.GraphModule) -> dict[str, int]:
    """How many calls of each kernel op ``gm`` holds (by op name)."""
    counts: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and getattr(node.target, "namespace", None) == ops.NAMESPACE:
            name = node.target._schema.name.split("::")[-1]
            counts[name] = counts.get(name, 0) + 1
    return counts


# --- matching helpers ----------------------------------------------------------------------------------
def _is(node: Any, *targets: Any) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def _strip_views(node: Any) -> Any:
    while _is(node, *_VIEWS):
        node = node.args[0]
    return node


def _val(node: Any) -> Any:
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def _scalar(arg: Any) -> float | None:
    """The value of a Python number or of a ``scalar_tensor(v)`` node, else ``None``."""
    if isinstance(arg, (int, float)) and not isinstance(arg, bool):
        return float(arg)
    if _is(arg, aten.scalar_tensor.default) and isinstance(arg.args[0], (int, float)):
        return float(arg.args[0])
    return None


def _same(a: Any, b: Any) -> bool:
    """Sizes (ints or SymInts) or shapes equal without adding guards."""
    if isinstance(a, (tuple, list, torch.Size)) or isinstance(b, (tuple, list, torch.Size)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return bool(statically_known_true(a == b))


def _tensors(*nodes: Any) -> list[torch.Tensor] | None:
    """The fake values of ``nodes`` if all are tensors of one supported dtype, else ``None``."""
    vals = [_val(n) for n in nodes]
    if not all(isinstance(v, torch.Tensor) for v in vals):
        return None
    if len({v.dtype for v in vals}) != 1 or vals[0].dtype not in DTYPES:
        return None
    return vals


def _binary(node: fx.Node) -> tuple[Any, Any] | None:
    """The two operands of a plain binary aten call (no ``alpha=`` or other keywords)."""
    if node.kwargs or len(node.args) != 2:
        return None
    return node.args[0], node.args[1]


def _commuted(node: Any, target: Any) -> list[tuple[Any, Any]]:
    """``[(p, q), (q, p)]`` for ``target(p, q)``: the operand orders of a commutative call."""
    if not _is(node, target):
        return []
    pair = _binary(node)
    return [] if pair is None else [pair, pair[::-1]]


def _stabilizer(term: Any, z: fx.Node) -> float | None:
    """``eps`` if ``term`` is ``where(z >= 0, eps, -eps)`` as :func:`lrpc.rules.stabilize` traces it."""
    if not (_is(term, aten.where.self) and len(term.args) == 3 and not term.kwargs):
        return None
    ge, pos, neg = term.args
    if not (_is(ge, aten.ge.Scalar) and ge.args[0] is z and _scalar(ge.args[1]) == 0):
        return None
    values = []
    for full in (pos, neg):
        if not (_is(full, aten.new_full.default) and list(full.args[1]) == [] and set(full.kwargs) <= {"pin_memory"}):
            return None
        values.append(_scalar(full.args[2]))
    eps = values[0]
    return eps if eps is not None and eps > 0 and values[1] == -eps else None


def _is_zero_test(node: Any, z: Any = None) -> fx.Node | None:
    """``eq(z, 0)``: returns ``z`` (checked against ``z`` if given)."""
    if _is(node, aten.eq.Scalar) and _scalar(node.args[1]) == 0 and (z is None or node.args[0] is z):
        return node.args[0]
    return None


def _divide(node: Any) -> tuple[fx.Node, fx.Node, float] | None:
    """``(R, z, eps)`` if ``node`` computes :func:`lrpc.rules.divide` ``(R, z, eps)``."""
    if _is(node, aten.div.Tensor) and _binary(node) is not None:  # eps > 0: R / (z + eps * sign(z))
        R, den = node.args
        for z, term in _commuted(den, aten.add.Tensor):
            e = _stabilizer(term, z) if isinstance(z, fx.Node) else None
            if e is not None:
                return R, z, e
        return None
    if _is(node, aten.where.self) and len(node.args) == 3 and not node.kwargs:  # eps == 0
        test, zero, div = node.args
        z = _is_zero_test(test)
        if z is None or _scalar(zero) != 0 or not _is(div, aten.div.Tensor) or _binary(div) is None:
            return None
        R, safe = div.args
        if not (_is(safe, aten.where.self) and len(safe.args) == 3 and not safe.kwargs):
            return None
        if _is_zero_test(safe.args[0], z) is None or _scalar(safe.args[1]) != 1 or safe.args[2] is not z:
            return None
        return R, z, 0.0
    return None


def _replace(graph: fx.Graph, old: fx.Node, target: Any, args: tuple) -> fx.Node:
    """Insert ``target(*args)`` before ``old`` and let it take ``old``'s place (and metadata)."""
    with graph.inserting_before(old):
        new = graph.call_function(target, args)
    new.meta = dict(old.meta)
    old.replace_all_uses_with(new)
    graph.erase_node(old)
    return new


# --- epsilon -------------------------------------------------------------------------------------------
def _fuse_linear_epsilon(graph: fx.Graph) -> int:
    count = 0
    for node in list(graph.nodes):
        for x, v in _commuted(node, aten.mul.Tensor):
            match = _match_epsilon(node, x, v)
            if match is not None:
                _replace(graph, node, ops.LINEAR_EPSILON, match)
                count += 1
                break
    return count


def _match_epsilon(node: fx.Node, x: Any, v: Any) -> tuple | None:
    mm = _strip_views(v)
    if not _is(mm, aten.mm.default) or not isinstance(x, fx.Node):
        return None
    found = _divide(_strip_views(mm.args[0]))
    if found is None:
        return None
    R, z, eps = found
    B = mm.args[1]
    vals = _tensors(x, R, z, B, node, v)
    if vals is None:
        return None
    tx, tR, tz, tB, tout, tv = vals
    if tB.dim() != 2 or tx.dim() < 1 or tR.dim() < 1:
        return None
    N, K = tB.shape
    # no broadcasting anywhere; the views only merge or split leading dims (rows stay rows)
    if not (_same(tR.shape, tz.shape) and _same(tR.shape[-1], N) and _same(tx.shape[-1], K)):
        return None
    if not (
        _same(tx.shape, tout.shape) and _same(tx.shape, tv.shape) and _same(tx.shape[:-1], tR.shape[:-1])
    ):
        return None
    return (x, R, z, B, eps)


# --- softmax -------------------------------------------------------------------------------------------
def _fuse_softmax(graph: fx.Graph) -> int:
    count = 0
    for node in list(graph.nodes):
        match = _match_softmax(node)
        if match is not None:
            _replace(graph, node, ops.SOFTMAX_RELEVANCE, match)
            count += 1
    return count


def _match_softmax(node: fx.Node) -> tuple | None:
    if not (_is(node, aten.where.self) and len(node.args) == 3 and not node.kwargs):
        return None
    test, zero, prod = node.args
    s = _is_zero_test(test)
    if s is None or _scalar(zero) != 0:
        return None
    for x, diff in _commuted(prod, aten.mul.Tensor):
        if not (_is(diff, aten.sub.Tensor) and _binary(diff) is not None):
            continue
        R, scaled = diff.args
        for s2, total in _commuted(scaled, aten.mul.Tensor):
            if s2 is not s or not _is(total, aten.sum.dim_IntList) or total.kwargs:
                continue
            if len(total.args) != 3 or total.args[0] is not R or total.args[2] is not True:
                continue
            dims = total.args[1]
            if not (isinstance(dims, (list, tuple)) and len(dims) == 1 and isinstance(dims[0], int)):
                continue
            vals = _tensors(x, s, R, node)
            if vals is None or not all(_same(vals[0].shape, v.shape) for v in vals[1:]) or vals[0].dim() == 0:
                continue
            return (x, s, R, dims[0])
    return None


# --- uniform product -----------------------------------------------------------------------------------
def _fuse_uniform_product(graph: fx.Graph) -> int:
    halves: dict[tuple, dict[int, tuple[fx.Node, Any, Any]]] = {}
    written = written_in_place(graph)
    for node in list(graph.nodes):
        found = _match_half(node, written)
        if found is not None:
            key, factor, a, b = found
            halves.setdefault(key, {})[factor] = (node, a, b)
    order = {n: i for i, n in enumerate(graph.nodes)}
    count = 0
    for (_, R, eps), found in halves.items():
        if len(found) != 2:
            continue
        first, a, b = min(found.values(), key=lambda half: order[half[0]])  # its operands exist there
        with graph.inserting_before(first):
            call = graph.call_function(ops.UNIFORM_PRODUCT, (a, b, R, eps))
            call.meta = dict(first.meta)
            call.meta["val"] = (_val(found[0][0]), _val(found[1][0]))
            for i in (0, 1):
                item = graph.call_function(operator.getitem, (call, i))
                item.meta = dict(found[i][0].meta)
                found[i][0].replace_all_uses_with(item)
        graph.erase_node(found[0][0])
        graph.erase_node(found[1][0])
        count += 1
    return count


def _match_half(node: fx.Node, written: set[fx.Node]) -> tuple[tuple, int, Any, Any] | None:
    """``mul(mul(a, 0.5), mul(q, b))`` with ``q = divide(R, mul(a, b), eps)``: ``((z, R, eps), i, a', b')``
    for the half of ``z``'s ``i``-th factor, with ``a'``, ``b'`` the factors in ``z``'s order as this half
    reads them: a factor the relevance pass rebuilds (:func:`lrpc.memory.rematerialize`) is a copy of the
    node ``z`` reads (``written``: values an in-place op writes, never taken for a copy)."""
    for half, grad in _commuted(node, aten.mul.Tensor):
        if not (_is(half, aten.mul.Tensor) and _binary(half) is not None and _scalar(half.args[1]) == 0.5):
            continue
        a = half.args[0]
        for q, b in _commuted(grad, aten.mul.Tensor):
            found = _divide(q)
            if found is None:
                continue
            R, z, eps = found
            if not (_is(z, aten.mul.Tensor) and _binary(z) is not None) or z.args[0] is z.args[1]:
                continue
            first, second = z.args
            if _same_value(first, a, written) and _same_value(second, b, written):
                factor, factors = 0, (a, b)
            elif _same_value(first, b, written) and _same_value(second, a, written):
                factor, factors = 1, (b, a)
            else:
                continue
            vals = _tensors(a, b, R, z, node)
            if vals is None or not all(_same(vals[0].shape, v.shape) for v in vals[1:]):
                continue
            return (z, R, eps), factor, *factors
    return None


def _same_value(node: Any, other: Any, written: set[fx.Node], depth: int = 32) -> bool:
    """``node`` is ``other``, or both are the same pure aten call on the same values (a rebuilt copy). Random
    draws and values written in place are only themselves."""
    if node is other:
        return True
    if depth == 0 or not (isinstance(node, fx.Node) and isinstance(other, fx.Node)):
        return False
    if node.op != "call_function" or other.op != "call_function" or node.target is not other.target:
        return False
    if impure(node) or node in written or other in written:
        return False
    if node.kwargs != other.kwargs or len(node.args) != len(other.args):
        return False
    return all(
        _same_value(x, y, written, depth - 1) if isinstance(x, fx.Node) else x == y
        for x, y in zip(node.args, other.args)
    )


# --- z+ / alpha-beta / gamma regions -------------------------------------------------------------------
_SIGNED_RULES = re.compile(r"^(ZPlus|AlphaBeta|Gamma)\((.*?)\) at ")
_PARAMS = {
    "ZPlus": ("stabilizer",),
    "AlphaBeta": ("alpha", "beta", "stabilizer"),
    "Gamma": ("gamma", "stabilizer"),
}
#: What a sign-split rule on a linear layer traces to; anything else (a convolution) means another layer.
_REGION_OPS = {
    aten.clamp.default,
    aten.mul.Tensor,
    aten.add.Tensor,
    aten.sub.Tensor,
    aten.div.Tensor,
    aten.t.default,
    aten.mm.default,
    aten.addmm.default,
    aten.zeros_like.default,
    aten.ge.Scalar,
    aten.gt.Scalar,
    aten.lt.Scalar,
    aten.eq.Scalar,
    aten._to_copy.default,
    aten.where.self,
    aten.scalar_tensor.default,
    aten.new_full.default,
    aten.sym_size.int,
    *_VIEWS,
}


def _rule_label(node: fx.Node) -> str | None:
    custom = node.meta.get("custom")
    return custom.get(RULE_META) if isinstance(custom, dict) else None


def _fuse_signed_linear(graph: fx.Graph) -> int:
    regions: dict[str, list[fx.Node]] = {}
    for node in graph.nodes:
        label = _rule_label(node) if node.op == "call_function" else None
        if label is not None and _SIGNED_RULES.match(label):
            regions.setdefault(label, []).append(node)
    count = 0
    for label, nodes in regions.items():
        order = {n: i for i, n in enumerate(graph.nodes)}  # afresh: earlier replacements add nodes
        match = _match_signed(label, nodes, order)
        if match is not None:
            out, target, args = match
            _replace(graph, out, target, args)
            count += 1
    return count


def _clamped(node: Any) -> tuple[fx.Node, str] | None:
    """``(t, "+")`` for ``clamp(t, 0)``, ``(t, "-")`` for ``clamp(t, None, 0)``."""
    if not _is(node, aten.clamp.default) or node.kwargs:
        return None
    args = tuple(node.args) + (None,) * (3 - len(node.args))
    if _scalar(args[1]) == 0 and args[2] is None:
        return args[0], "+"
    if args[1] is None and _scalar(args[2]) == 0:
        return args[0], "-"
    return None


def _terms(node: fx.Node, region: set[fx.Node]) -> list[fx.Node]:
    """The products a region's output sums: through adds, subs and scalings by a number."""
    if node in region and _is(node, aten.add.Tensor, aten.sub.Tensor) and _binary(node) is not None:
        a, b = node.args
        if isinstance(a, fx.Node) and isinstance(b, fx.Node):
            return _terms(a, region) + _terms(b, region)
    if node in region and _is(node, aten.mul.Tensor) and _binary(node) is not None:
        a, b = node.args
        if isinstance(a, fx.Node) and _scalar(b) is not None:
            return _terms(a, region)
    return [node]


def _match_signed(label: str, nodes: list[fx.Node], order: dict[fx.Node, int]) -> tuple | None:
    rule, params_text = _SIGNED_RULES.match(label).groups()  # type: ignore[union-attr]
    region = set(nodes)
    if any(n.target not in _REGION_OPS for n in nodes):
        return None
    numerators = {n.args[0] for n in nodes if _is(n, aten.div.Tensor)}
    if len(numerators) != 1:
        return None
    (R,) = numerators
    # the rule's result: the one value computed from R that is used outside the region (what does not
    # depend on R, such as constants and clamped weights, may be shared with other code after CSE)
    carries = {R}
    for n in nodes:
        if any(a in carries for a in n.all_input_nodes):
            carries.add(n)
    exits = [n for n in nodes if n in carries and any(u not in region for u in n.users)]
    if len(exits) != 1:
        return None
    (out,) = exits
    # x: what every product term's left factor clamps; each term is clamp(x, ±) * (g @ A) through views
    xs = set()
    for term in _terms(out, region):
        pair = _binary(term) if _is(term, aten.mul.Tensor) else None
        if pair is None:
            return None
        # a layer input planning proved >= 0 is not clamped (its x⁻ terms are dropped): the kernel's x⁻
        # part is then exactly zero, so the same kernel serves
        left = _clamped(pair[0]) or ((pair[0], "+") if isinstance(pair[0], fx.Node) else None)
        if left is None or not _is(_strip_views(pair[1]), aten.mm.default):
            return None
        xs.add(left[0])
    if len(xs) != 1:
        return None
    (x,) = xs
    outside = [t for t, _ in filter(None, map(_clamped, nodes)) if t is not x]
    outside += [n.args[0] for n in nodes if _is(n, aten.zeros_like.default)]
    vals = _tensors(x, R, out)
    if vals is None or not isinstance(R, fx.Node) or R in region or x in region:
        return None
    tx, tR, tout = vals
    if (
        tx.dim() < 1
        or tR.dim() < 1
        or not _same(tx.shape, tout.shape)
        or not _same(tx.shape[:-1], tR.shape[:-1])
    ):
        return None
    K, N = tx.shape[-1], tR.shape[-1]
    weights = {t for t in outside if isinstance(_val(t), torch.Tensor) and _same(_val(t).shape, (N, K))}
    biases = {t for t in outside if isinstance(_val(t), torch.Tensor) and _same(_val(t).shape, (N,))}
    if len(weights) != 1 or len(biases) > 1 or set(outside) - weights - biases:
        return None
    (W,) = weights
    b = next(iter(biases), None)
    if W in region or b in region or _tensors(x, W, *([b] if b is not None else [])) is None:
        return None
    if not _oriented(nodes, x, N, K):
        return None
    params = dict(re.findall(r"(\w+)=([^,\s]+)", params_text))
    try:
        values = [float(params[name]) for name in _PARAMS[rule]]
    except (KeyError, ValueError):
        return None
    if rule == "Gamma":
        zs = {n.args[0] for n in nodes if _is(n, aten.gt.Scalar, aten.lt.Scalar) and _scalar(n.args[1]) == 0}
        if len(zs) != 1:
            return None
        (z,) = zs
        if z in region or _tensors(z, R) is None or not _same(_val(z).shape, tR.shape):
            return None
        inputs: list[Any] = [x, R, z, W, b]
        target = ops.LINEAR_GAMMA
    else:
        inputs = [x, R, W, b]
        target = ops.LINEAR_ZPLUS if rule == "ZPlus" else ops.LINEAR_ALPHA_BETA
    if any(isinstance(n, fx.Node) and order[n] >= order[out] for n in inputs):
        return None
    return out, target, (*inputs, *values)


def _oriented(nodes: list[fx.Node], x: fx.Node, N: Any, K: Any) -> bool:
    """The region's matmuls are those of ``x Wᵀ``: the ones on (clamped) ``x`` take a ``(K, N)``
    right operand that is a transpose; the others (relevance back to x) a ``(N, K)`` one."""
    seen = False
    for n in nodes:
        if _is(n, aten.mm.default):
            lhs, rhs = n.args[0], n.args[1]
        elif _is(n, aten.addmm.default):
            lhs, rhs = n.args[1], n.args[2]
        else:
            continue
        seen = True
        tr = _val(rhs)
        if not isinstance(tr, torch.Tensor) or tr.dim() != 2:
            return False
        clamped = _clamped(_strip_views(lhs))
        if clamped is not None and clamped[0] is x:
            if not (_is(rhs, aten.t.default) and _same(tr.shape, (K, N))):
                return False
        elif not _same(tr.shape, (N, K)):
            return False
    return seen
