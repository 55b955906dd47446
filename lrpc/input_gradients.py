"""Sibling input gradients of a thin convolution merged into one (a pass over the generated program).

Several rules pull one gradient back through the same layer with different weights: z^B computes
``x⊙Wᵀg − l⊙W⁺ᵀg − h⊙W⁻ᵀg``, α-β and γ on an input of either sign ``x⁺⊙W₁ᵀg + x⁻⊙W₂ᵀg``. For a
convolution each ``Wᵀg`` is a ``convolution_backward`` of the same ``g``. The input gradient is computed
per input channel, so ``k`` of them are one backward over the weights stacked along the input channels:

    [W₁ᵀg, ..., Wₖᵀg] = [W₁ | ... | Wₖ]ᵀ g

On a layer with few input channels (an image's first layer: 3) a backward costs about as much for 9 input
channels as for 3, since its work is set by the output channels and the pixels: on 2 CPU cores, one
thread, VGG16's first layer at 224x224 took 13 ms for the merged backward and 40 ms for the three, which
is z^B's (``epsilon-gamma-box``) extra cost over the gradient on that layer. Wider layers gain nothing
(the merged backward costs the sum of its parts, measured at 64 and 256 input channels) and would copy
their weights into the stack, so only layers with at most :data:`MAX_CHANNELS` input channels merge.
The arithmetic is the same, per channel.
"""

from __future__ import annotations

import operator
from collections import defaultdict

import torch
from torch import fx

from .tracing import insert_call

aten = torch.ops.aten

#: The most input channels a convolution may have for its input gradient to be merged (an image's 1-4, an
#: audio spectrogram's 1).
MAX_CHANNELS = 16


def merge_input_gradients(graph: fx.Graph) -> fx.Graph:
    """Merge ``convolution_backward`` calls (input gradient only, ungrouped, not transposed) that pull the
    same gradient back through convolutions of the same geometry and at most :data:`MAX_CHANNELS` input
    channels into one over the stacked weights (in place; returns ``graph``)."""
    graph.eliminate_dead_code()  # the unused outputs' getitems, which would hide that only one is read
    siblings: dict[tuple, list[fx.Node]] = defaultdict(list)
    for node in graph.nodes:
        key = _sibling_key(node)
        if key is not None:
            siblings[key].append(node)
    for group in siblings.values():
        if len(group) < 2:
            continue
        position = {n: i for i, n in enumerate(graph.nodes)}
        first = group[0]
        # every operand already computed where the first of them runs: the merged one runs there
        if any(position[a] >= position[first] for n in group for a in n.all_input_nodes):
            continue
        _merge(graph, group, first)
    graph.eliminate_dead_code()
    return graph


def _sibling_key(node: fx.Node) -> tuple | None:
    """What siblings share (the gradient, the geometry, the input's and weight's sizes but their channels,
    dtypes, device), or ``None`` for a call that does not qualify."""
    if node.op != "call_function" or node.target is not aten.convolution_backward.default:
        return None
    if len(node.args) != 11 or node.kwargs:
        return None
    grad, x, w, _, stride, padding, dilation, transposed, out_pad, groups, mask = node.args
    if transposed or groups != 1 or list(mask) != [True, False, False]:
        return None
    if any(u.target is not operator.getitem or u.args[1] != 0 for u in node.users):
        return None
    xv, wv = x.meta.get("val"), w.meta.get("val")
    if not isinstance(xv, torch.Tensor) or not isinstance(wv, torch.Tensor):
        return None
    channels = wv.shape[1]
    if not isinstance(channels, int) or channels > MAX_CHANNELS or xv.shape[1] != channels:
        return None
    sizes = tuple(str(d) for d in (xv.shape[0], *xv.shape[2:], wv.shape[0], *wv.shape[2:]))  # symbolic ones too
    return (grad, tuple(stride), tuple(padding), tuple(dilation), tuple(out_pad), sizes, xv.dtype, wv.dtype, xv.device)


def _merge(graph: fx.Graph, group: list[fx.Node], first: fx.Node) -> None:
    def call(target: object, args: tuple, kwargs: dict | None = None) -> fx.Node:
        return insert_call(graph, target, args, kwargs, like=first)  # the rule's label and source line

    args = list(first.args)
    with graph.inserting_before(first):
        # the input of an input-gradient-only backward gives its size, its values are never read: the
        # stacked input is allocated, not copied from the members' inputs
        x = first.args[1]
        val = x.meta["val"]
        sizes = [d if isinstance(d, int) else call(aten.sym_size.int, (x, i)) for i, d in enumerate(val.shape)]
        sizes[1] = sum(n.args[1].meta["val"].shape[1] for n in group)
        args[1] = call(aten.empty.memory_format, (sizes,), {"dtype": val.dtype, "device": val.device})
        args[2] = call(aten.cat.default, ([n.args[2] for n in group], 1))
        grads = call(operator.getitem, (call(aten.convolution_backward.default, tuple(args)), 0))
        start, parts = 0, []
        for node in group:
            width = node.args[2].meta["val"].shape[1]
            parts.append(call(aten.slice.Tensor, (grads, 1, start, start + width)))
            start += width
    # erased only now: the inserts above go before ``first``, which must still be in the graph
    for node, part in zip(group, parts):
        for user in list(node.users):
            user.replace_all_uses_with(part)
            graph.erase_node(user)
        graph.erase_node(node)
