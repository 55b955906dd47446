"""Memory passes over the generated program: what it keeps alive, and where its results are written.

:func:`rematerialize` (every backend): recompute cheap forward values in the relevance pass instead of
keeping them. The generated program runs the forward pass, then the relevance pass, and every forward
value a rule reads stays alive from the forward until that rule runs. Many of them are cheap to rebuild
from values that stay alive anyway: a ReLU / GELU output from the pre-activation its layer's epsilon rule
keeps, a batch-norm-folded weight from the parameters, an attention layer's scores ``q @ kᵀ`` from the
``q`` and ``k`` its product rule keeps, the scaled and masked scores and their softmax from those, and a
max pooling's output and indices from the pre-activation of the layer before.
Keeping both doubles the activation memory (autograd keeps one tensor per layer; lrpc kept the layer
output and its activation, and five tensors the size of the scores per attention layer, where autograd
under SDPA keeps none) and holds a second copy of every folded convolution's weights across the whole
pass. :func:`rematerialize` moves such values into the relevance pass: one copy of their pointwise /
view / softmax / product / pooling computation is inserted before their first use there, shared by the later ones,
and the forward value dies at its last forward use.

A rebuilt value may be needed before its own first use, by the copy of another rebuilt value that reads
it: a softmax reads its masked scores before the softmax rule does, a residual stream's sum reads the
block before it, a layer before that block's rules. There the copy is made early and shared on, unless
living that much longer would raise the program's peak (its live bytes at each point, modeled at the
traced sizes) while recomputing the value for that reader takes only pointwise ops and views: then the
reader recomputes it (a residual stream, at the start of the relevance pass, where every kept value is
alive; a product or a softmax costs as much memory to recompute as it saves, and the time). Programs for
a backend that plans its own buffers (Inductor) never recompute a rebuilt value per reader
(``recompute=False``): the copy is shared.

A value is rebuilt only from values that are alive at that point anyway (placeholders, i.e. inputs and
parameters, forward values the relevance pass reads later, and the copies it made), so no value lives
longer than it did (a copy lives within the forward value's span) and the set of kept values at every
point of the program can only shrink (a rebuild's own temporaries aside). The one exception trades a
little for a lot: a value that cannot be rebuilt itself may be held for a rebuild
if it takes at most a quarter of the bytes of the value rebuilt from it (a causal mask, one per sequence,
held so that every layer's masked scores, one per head, are rebuilt). A value an in-place op writes is
never rebuilt, nor rebuilt from: the copy would miss the write, or see it. The result is exactly the same
arithmetic.

:func:`reuse_buffers` (the eager backend; Inductor plans its own buffers): a pointwise op whose operand
dies at it writes its result into that operand (``mul`` -> ``mul_``), as Inductor does in the code it
generates. The relevance pass is a chain of such ops (stabilize, divide, multiply, accumulate); writing in
place saves an allocation and a pass of fresh memory per op.
"""

from __future__ import annotations

import itertools
import operator
from dataclasses import dataclass

import sympy
import torch
from torch import fx

#: The most nodes one kept value may be rebuilt from (besides itself): a ReLU is one, a batch-norm-folded
#: weight about five, GELU written out about eight.
MAX_REBUILT = 16

#: The most nodes a rebuilt value's reader recomputes rather than share a copy that would raise the peak (a
#: residual stream, one add per block of a 32-layer transformer, at its first read); past it, the copy is shared.
MAX_RECOMPUTED = 64


def rematerialize(graph: fx.Graph, *, recompute: bool = True) -> fx.Graph:
    """Recompute cheap forward values where the relevance pass first reads them (in place; returns ``graph``).

    The forward pass is everything up to the explained output (the program's first output); every node
    after it belongs to the relevance pass. ``recompute=False``: a rebuilt value needed before its own
    first read is always shared from there, never recomputed for that reader (only views are). The live
    bytes that choice is judged by are the eager program's; a program Inductor compiles (it fuses and lays
    out buffers itself) peaked higher with the recomputation (GPT-2 at 512 tokens 470 against 458 MB, the
    Llama-style model 358 against 349 MB), 1 MB lower on ViT-B/16 (103 against 104 MB) and the same on BERT;
:func:`lrpc.backends.recomputes` makes the choice per backend.
    """
    most_recomputed = MAX_RECOMPUTED if recompute else 0
    nodes = list(graph.nodes)
    position = {n: i for i, n in enumerate(nodes)}
    output = nodes[-1]
    explained = output.args[0][0]
    if not isinstance(explained, fx.Node):
        return graph
    boundary = position[explained] + 1

    def late_uses(n: fx.Node) -> list[fx.Node]:
        return sorted((u for u in n.users if position[u] >= boundary), key=position.__getitem__)

    returned = set(output.all_input_nodes)  # alive to the end anyway
    written = written_in_place(graph)  # a copy would miss the write
    carried = {n for n in nodes[:boundary] if n.op == "call_function" and late_uses(n)}
    last_use = {n: max(position[u] for u in n.users) for n in carried}
    rebuildable: set[fx.Node] = set()
    first: dict[fx.Node, int] = {}  # where a rebuilt value's shared copy is made: its first read, or earlier
    held: dict[fx.Node, int] = {}  # small forward values kept past their last forward read (to where), to rebuild from

    def free(n: fx.Node, at: int, plan: _Plan) -> bool:
        """``n`` is available at position ``at``: a placeholder, a value alive there anyway, or rebuilt
        from such values (``plan.rebuilt``: at most ``MAX_REBUILT`` nodes, counted once however many paths
        reach them; a long pointwise chain, an unrolled scan, is kept rather than recomputed). What cannot
        be rebuilt may be held (``plan.held``): kept alive until ``at`` although its forward reads end
        earlier, if all that is held for one value takes at most a quarter of its bytes (a causal mask built
        by a copy, a twelfth of the scores it lets the relevance pass rebuild)."""
        if n.op == "placeholder" or not _tensors(n):
            return True
        if n in written:  # it may be written before ``at``: the copy would read the new value
            return False
        if (n in carried and last_use[n] >= at) or n in plan.rebuilt or n in plan.held:
            return True
        if n in plan.failed or position[n] >= boundary:
            return False
        trial = _Plan(plan.rebuilt | {n}, set(plan.held), plan.failed, plan.room)
        if len(trial.rebuilt) <= MAX_REBUILT and cheap(n) and all(free(i, at, trial) for i in n.all_input_nodes):
            plan.rebuilt, plan.held = trial.rebuilt, trial.held
            return True
        size = _bytes(n)
        if size is not None and size <= plan.room - sum(_bytes(h) or 0 for h in plan.held):
            plan.held.add(n)
            return True
        plan.failed.add(n)
        return False

    for n in nodes[:boundary]:
        if n in carried and n not in returned and n not in written and cheap(n):
            at = position[late_uses(n)[0]]
            plan = _Plan(set(), set(), set(), (_bytes(n) or 0) // 4)
            if all(free(i, at, plan) for i in n.all_input_nodes):
                rebuildable.add(n)
                first[n] = at
                for h in plan.held:
                    held[h] = max(held.get(h, at), at)
    rebuildable -= held.keys()  # kept whole: it is alive where it is read

    live = _live_bytes(nodes, boundary, rebuildable, first, held)
    peak = max(live, default=0)
    copies: dict[fx.Node, fx.Node] = {}  # rebuilt carried values, read by their late users

    def share_early(n: fx.Node, at: int) -> bool:
        """Make ``n``'s shared copy at ``at``, before its own first read, unless the copy living that much
        longer would raise the program's peak and recomputing ``n`` at ``at`` instead takes pointwise ops
        and views only (a residual stream, layer by layer; recomputing a product or a softmax costs as much
        memory as it saves, and the time)."""
        size = _bytes(n) or 0
        if max(live[at : first[n]]) + size > peak:
            again = recomputed(n, at)
            if all(_duplicable(m) for m in again) and sum(view_base(m) is None for m in again) <= most_recomputed:
                return False
        live[at : first[n]] = [b + size for b in live[at : first[n]]]
        first[n] = at
        return True

    def recomputed(n: fx.Node, at: int) -> set[fx.Node]:
        """The nodes a copy of ``n`` made at position ``at`` recomputes: back to the values alive there."""
        seen: set[fx.Node] = set()
        stack = [n]
        while stack:
            m = stack.pop()
            if m in seen or m.op == "placeholder" or not _tensors(m) or m in held:
                continue
            if m is not n and m in carried and last_use[m] >= at and (m not in rebuildable or m in copies):
                continue
            seen.add(m)
            stack.extend(m.all_input_nodes)
        return seen

    def rebuild(n: fx.Node, before: fx.Node, local: dict[fx.Node, fx.Node]) -> fx.Node:
        """``n`` as seen from ``before``: itself, or a copy inserted before it.

        A rebuilt carried value gets one copy, shared by all its reads: made at its own first read, or at
        an earlier need (the copy of another rebuilt value that reads it, as a softmax reads its masked
        scores) where :func:`share_early` allows. Other intermediates are copied per rebuilt value
        (``local``), so that no copy outlives its reader."""
        if n.op == "placeholder" or not _tensors(n) or n in held:
            return n
        at = position[before]
        if n in carried and last_use[n] >= at:
            if n not in rebuildable:
                return n
            if n not in copies and (first[n] <= at or share_early(n, at)):
                copies[n] = _copy(n, before, local)
            if n in copies:
                return copies[n]
        if isinstance(n.meta.get("val"), (tuple, list)):  # max pooling: one copy for its output and indices
            if n not in copies:
                copies[n] = _copy(n, before, local)
            return copies[n]
        if n not in local:
            local[n] = _copy(n, before, local)
        return local[n]

    def _copy(n: fx.Node, before: fx.Node, local: dict[fx.Node, fx.Node]) -> fx.Node:
        with graph.inserting_before(before):
            return graph.node_copy(n, lambda a: rebuild(a, before, local))

    for n in sorted(rebuildable, key=first.__getitem__):
        uses = late_uses(n)
        rebuild(n, uses[0], {})
        for user in uses:
            user.replace_input_with(n, copies[n])
    return graph


def _live_bytes(
    nodes: list[fx.Node], boundary: int, rebuilt: set[fx.Node], first: dict[fx.Node, int], held: dict[fx.Node, int]
) -> list[int]:
    """The bytes of intermediate values alive at each position of the program once the ``rebuilt`` values
    are copied at ``first`` and the ``held`` ones kept until the position given, each storage freed after
    its last read (at the traced example's sizes; placeholders and a rebuild's own temporaries left out)."""
    position = {n: i for i, n in enumerate(nodes)}
    reads: dict[fx.Node, list[int]] = {}
    for n in nodes:
        for i in n.all_input_nodes:
            reads.setdefault(storage_owner(i), []).append(position[n])
    change = [0] * (len(nodes) + 1)  # bytes allocated at each position, minus those freed after the one before
    for n, at in reads.items():
        if n.op != "call_function" or view_base(n) is not None:
            continue
        values = n.meta.get("val")
        size = sum(_bytes_of(v) or 0 for v in (values if isinstance(values, (list, tuple)) else [values]))
        if n in rebuilt:  # the forward value until its last forward read, its copy from ``first`` on
            spans = [(position[n], max((r for r in at if r < boundary), default=position[n])), (first[n], max(at))]
        else:
            spans = [(position[n], max(*at, held.get(n, 0)))]
        for start, end in spans:
            change[start] += size
            change[end + 1] -= size
    return list(itertools.accumulate(change[:-1]))


@dataclass
class _Plan:
    """How one value is rebuilt: the nodes it recomputes, the ones it holds, the ones that can be neither,
    and the bytes it may hold."""

    rebuilt: set[fx.Node]
    held: set[fx.Node]
    failed: set[fx.Node]
    room: int


def cheap(node: fx.Node) -> bool:
    """A pointwise op, a dtype conversion, a constant filled in from its arguments, a view, or max pooling
    (and one of its outputs): rebuilding it costs one pass over its input, no more arithmetic than keeping.
    Or a product that outgrows its operands (:func:`_expanding_product`)."""
    target = node.target
    if target is operator.getitem and isinstance(base := node.args[0], fx.Node):  # one output of a cheap op
        return cheap(base)
    if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload) or impure(node):
        return False
    if torch.Tag.pointwise in target.tags or target in _FILLS or target in _ROW_OPS or target in _WINDOW_OPS:
        return True
    if target is torch.ops.aten.bmm.default:
        return _expanding_product(node)
    if target is torch.ops.aten._to_copy.default:  # an attention mask cast to the scores' dtype
        source, value = node.args[0], node.meta.get("val")
        return isinstance(source, fx.Node) and _same_device(source.meta.get("val"), value)
    return view_base(node) is not None


def _duplicable(node: fx.Node) -> bool:
    """Cheap to compute twice: pointwise, a view, a cast, a fill; not a product or a softmax."""
    return node.target is not torch.ops.aten.bmm.default and node.target not in _ROW_OPS


#: Row-wise ops as memory-bound as a pointwise one: a softmax is rebuilt from its scores, which AttnLRP's
#: rule keeps anyway, instead of keeping both (autograd keeps one).
_ROW_OPS = {torch.ops.aten._softmax.default}

#: Max pooling, as memory-bound as a pointwise op (reads its input once, writes a fraction of it): its
#: output and indices are rebuilt from the activation that its own rule and the layer before keep, instead
#: of keeping them too (autograd keeps both; the indices are int64, twice a float32 output's bytes).
_WINDOW_OPS = {
    torch.ops.aten.max_pool2d_with_indices.default,
    torch.ops.aten.max_pool3d_with_indices.default,
}

#: Constants made from their arguments alone (a masked_fill's fill value is a ``scalar_tensor``).
_FILLS = {
    torch.ops.aten.scalar_tensor.default,
    torch.ops.aten.full.default,
    torch.ops.aten.zeros.default,
    torch.ops.aten.ones.default,
}


def _expanding_product(node: fx.Node) -> bool:
    """A batched product of two computed values whose result has more elements than both together, as an
    attention layer's scores ``q @ kᵀ`` past 128 tokens (heads of 64): rebuilding it from the operands
    its product rule keeps anyway costs one forward product and frees the largest tensor of the layer
    (autograd keeps none of the scores under SDPA). A product with a parameter (a layer's weights) is left
    alone: its output is an activation as costly to recompute as the layer itself. Sizes are compared at
    the largest the program takes (:func:`_largest`): a program traced at 8 tokens that serves 512 rebuilds
    its scores, and at short lengths the product it recomputes is small."""
    operands = node.args[:2]
    if not all(isinstance(o, fx.Node) for o in operands) or any(storage_owner(o).op == "placeholder" for o in operands):
        return False
    sizes = [_largest(v.numel()) if isinstance(v := n.meta.get("val"), torch.Tensor) else None for n in (node, *operands)]
    if any(size is None for size in sizes):
        return False
    out, *ins = sizes
    return out > sum(ins)


def _tensors(node: fx.Node) -> bool:
    """Whether ``node`` computes tensors (one, or several: max pooling's output and indices), not sizes."""
    value = node.meta.get("val")
    values = value if isinstance(value, (tuple, list)) else (value,)
    return bool(values) and all(isinstance(v, torch.Tensor) for v in values)


def storage_owner(node: fx.Node) -> fx.Node:
    """The node that owns the storage ``node`` views."""
    while (base := view_base(node)) is not None:
        node = base
    return node


def _bytes(node: fx.Node) -> int | None:
    """The bytes of ``node``'s value at the traced example's sizes (``None`` if unknown)."""
    return _bytes_of(node.meta.get("val"))


def _bytes_of(value: object) -> int | None:
    if not isinstance(value, torch.Tensor) or (numel := _hint(value.numel())) is None:
        return None
    return numel * value.element_size()


#: A dynamic dim without an upper bound, as :func:`_largest` takes it.
LONG = 2**16


def _largest(size: int | torch.SymInt) -> int | None:
    """A size at the largest values of its dynamic dims: their ranges' upper bounds (a sequence's length up
    to a model's positions), ``LONG`` where there is none (``None`` if unknown)."""
    if isinstance(size, int):
        return size
    expr, shape_env = size.node.expr, size.node.shape_env
    if shape_env is None:
        return None
    largest = {}
    for symbol in expr.free_symbols:
        upper = shape_env.var_to_range[symbol].upper if symbol in shape_env.var_to_range else None
        largest[symbol] = int(upper) if isinstance(upper, (int, sympy.Integer)) else LONG  # not int_oo
    value = expr.subs(largest)
    return int(value) if value.is_number else None


def _hint(size: int | torch.SymInt) -> int | None:
    """A size, at the traced example's values of its dynamic dims (``None`` if it has none)."""
    return size if isinstance(size, int) else size.node.hint


def _same_device(a: object, b: object) -> bool:
    return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.device == b.device


def reuse_buffers(graph: fx.Graph) -> fx.Graph:
    """Turn pointwise ops into their in-place form where an operand dies at them (in place; returns ``graph``).

    An operand is reused only if this op is its one reader, it owns its storage (made by a non-view op, or
    by an op this pass already made in-place on such a buffer), and it has the result's dtype, shape and
    strides, so that the result and every later read are exactly as before. Placeholders (the user's
    inputs, the parameters) are never written.
    """
    for node in graph.nodes:
        inplace = _inplace_variant(node)
        if inplace is None:
            continue
        slots = [0]
        if node.target in _COMMUTATIVE and len(node.args) == 2 and not node.kwargs:
            slots.append(1)
        for slot in slots:
            operand = node.args[slot]
            if _reusable(operand, node):
                if slot:
                    node.args = (node.args[1], node.args[0])
                node.target = inplace
                break
    return graph


_COMMUTATIVE = {torch.ops.aten.add.Tensor, torch.ops.aten.mul.Tensor}
#: Ops that return a view of their input although their schema does not say so.
_UNANNOTATED_VIEWS = {torch.ops.aten._unsafe_view.default}


def _inplace_variant(node: fx.Node) -> torch._ops.OpOverload | None:
    target = node.target
    if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
        return None
    if torch.Tag.pointwise not in target.tags or target._schema.is_mutable:
        return None
    packet = getattr(torch.ops.aten, target._schema.name.split("::")[-1] + "_", None)
    return getattr(packet, target._overloadname, None) if packet is not None else None


def _reusable(operand: object, node: fx.Node) -> bool:
    if not isinstance(operand, fx.Node) or operand.op != "call_function" or len(operand.users) != 1:
        return False
    target = operand.target
    if not isinstance(target, torch._ops.OpOverload) or target in _UNANNOTATED_VIEWS:
        return False
    returns = target._schema.returns
    if len(returns) != 1 or (returns[0].alias_info is not None and not returns[0].alias_info.is_write):
        return False  # a view shares its base's storage; multi-output ops are read through getitem
    have, want = operand.meta.get("val"), node.meta.get("val")
    if not isinstance(have, torch.Tensor) or not isinstance(want, torch.Tensor):
        return False
    return have.dtype == want.dtype and str(have.shape) == str(want.shape) and str(have.stride()) == str(want.stride())


def written_in_place(graph: fx.Graph) -> set[fx.Node]:
    """The nodes whose storage an in-place op writes: the written argument and the values it is a view of."""
    written: set[fx.Node] = set()
    for node in graph.nodes:
        target = node.target
        if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
            continue
        if not target._schema.is_mutable:
            continue
        for argument, value in zip(target._schema.arguments, node.args):
            if argument.alias_info is None or not argument.alias_info.is_write:
                continue
            while isinstance(value, fx.Node) and value not in written:
                written.add(value)
                value = view_base(value)
    return written


def view_base(node: fx.Node) -> fx.Node | None:
    """The value ``node`` is a view of (its first argument; a list's item: the list), or ``None`` if it owns
    its storage."""
    target = node.target
    if node.op != "call_function" or not node.args or not isinstance(base := node.args[0], fx.Node):
        return None
    if target is operator.getitem:
        return base
    if not isinstance(target, torch._ops.OpOverload):
        return None
    if target in _UNANNOTATED_VIEWS:
        return base
    returns = target._schema.returns
    return base if len(returns) == 1 and returns[0].alias_info is not None else None


def impure(node: fx.Node) -> bool:
    """A call whose result is not a function of its arguments alone: it writes in place, or draws random
    numbers. Two such calls on the same arguments are not the same value."""
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.is_mutable or torch.Tag.nondeterministic_seeded in target.tags
    return target is not operator.getitem and not getattr(target, "__module__", "").startswith("_operator")
