"""Rematerialization: recompute cheap forward values in the relevance pass instead of keeping them.

The generated program runs the forward pass, then the relevance pass, and every forward value a rule
reads stays alive from the forward until that rule runs. Many of them are cheap to rebuild from values
that stay alive anyway: a ReLU / GELU output from the pre-activation its layer's epsilon rule keeps, a
batch-norm-folded weight from the parameters. Keeping both doubles the activation memory (autograd keeps
one tensor per layer; lrpc kept the layer output and its activation) and holds a second copy of every
folded convolution's weights across the whole pass. :func:`rematerialize` moves such values into the
relevance pass: a copy of their pointwise / view computation is inserted before their first use there, and
the forward value dies at its last forward use.

A value is rebuilt only from values that are alive at that point anyway (placeholders, i.e. inputs and
parameters, and forward values the relevance pass reads later), so no other value lives longer and the
live set at every point of the program can only shrink. The result is exactly the same arithmetic.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx


def rematerialize(graph: fx.Graph) -> fx.Graph:
    """Recompute cheap forward values where the relevance pass first reads them (in place; returns ``graph``).

    The forward pass is everything up to the explained output (the program's first output); every node
    after it belongs to the relevance pass.
    """
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
    carried = {n for n in nodes[:boundary] if n.op == "call_function" and late_uses(n)}
    last_use = {n: max(position[u] for u in n.users) for n in carried}
    rebuildable: dict[fx.Node, bool] = {}

    def free(n: fx.Node, at: int) -> bool:
        """``n`` is available at position ``at`` without keeping anything alive longer."""
        if n.op == "placeholder" or not isinstance(n.meta.get("val"), torch.Tensor):
            return True
        if n in carried and last_use[n] >= at:
            return True
        return position[n] < boundary and cheap(n) and all(free(i, at) for i in n.all_input_nodes)

    copies: dict[fx.Node, fx.Node] = {}

    def rebuild(n: fx.Node, before: fx.Node) -> fx.Node:
        """``n`` as seen from ``before``: itself if it is alive there, else a copy inserted before it."""
        if n in copies:
            return copies[n]
        if n.op == "placeholder" or not isinstance(n.meta.get("val"), torch.Tensor):
            return n
        if n in carried and n not in rebuildable and last_use[n] >= position[before]:
            return n
        with graph.inserting_before(before):
            copy = graph.node_copy(n, lambda a: rebuild(a, before))
        copies[n] = copy
        return copy

    for n in nodes[:boundary]:
        if n in carried and n not in returned and cheap(n):
            first = position[late_uses(n)[0]]
            if all(free(i, first) for i in n.all_input_nodes):
                rebuildable[n] = True
    for n in sorted(rebuildable, key=lambda n: position[late_uses(n)[0]]):
        uses = late_uses(n)
        copy = rebuild(n, uses[0])
        for user in uses:
            user.replace_input_with(n, copy)
    return graph


def cheap(node: fx.Node) -> bool:
    """A pointwise op or a view: rebuilding it costs one pass over its output, no more arithmetic than keeping."""
    target = node.target
    if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload) or target is operator.getitem:
        return False
    schema = target._schema
    if schema.is_mutable or torch.Tag.nondeterministic_seeded in target.tags:
        return False
    if torch.Tag.pointwise in target.tags:
        return True
    returns = schema.returns
    return len(returns) == 1 and returns[0].alias_info is not None  # a view of its input
