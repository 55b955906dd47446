"""Per-channel weight scales moved off the weights, for the compiled backends.

Folding a batch norm into the convolution before it (``lrpc.canonize``) scales each output channel's
weights, ``W' = W * k[o]``; the program then computes ``W'`` on every call, once for the forward and once
more where the relevance pass reads it (``lrpc.memory.rematerialize``). A convolution is linear in its
weight, per output channel, so the same values come from scaling its output or its output gradient instead:

    conv(x, W * k) + b'            = conv(x, W) * k + b'
    conv_input_grad(g, x, W * k)   = conv_input_grad(g * k, x, W)

Under Inductor the products with ``k`` fuse into the pointwise kernels next to them (the batch norm's
place in the forward, the ε step's quotient in the relevance pass), so a weight-sized pass per layer and
call becomes free: ResNet-50 epsilon under Inductor, in one process on 2 CPU cores, went from 1.04x to
0.91-0.94x gradient x input. In
the eager program the scaled activations would be extra passes, larger than the weights at larger batches,
so only the compiled backends use this. Rounding differs from the folded form in the last bits.
"""

from __future__ import annotations

import torch
from torch import fx

from .tracing import static_shape

aten = torch.ops.aten


def unfold_weight_scales(graph: fx.Graph) -> fx.Graph:
    """Rewrite convolutions (and their input-gradient-only backwards) whose weight is ``W * k`` with ``k``
    one factor per output channel, into the unscaled convolution with ``k`` applied to the activation."""
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target is aten.convolution.default and node.args[6] is False:
            w_at = 1
        elif (
            node.target is aten.convolution_backward.default
            and node.args[7] is False
            and list(node.args[10]) == [True, False, False]
        ):
            w_at = 2
        else:
            continue
        split = _channel_scale(node.args[w_at])
        if split is None:
            continue
        weight, scale = split
        spatial = [1] * (weight.meta["val"].dim() - 2)
        with graph.inserting_before(node):
            per_channel = graph.call_function(aten.view.default, (scale, [1, -1, *spatial]))
            args = list(node.args)
            args[w_at] = weight
            if w_at == 2:  # the gradient arriving at the output, scaled per channel
                args[0] = graph.call_function(aten.mul.Tensor, (node.args[0], per_channel))
                node.args = tuple(args)
                continue
            bias, args[2] = args[2], None
            unscaled = graph.call_function(aten.convolution.default, tuple(args))
            out = graph.call_function(aten.mul.Tensor, (unscaled, per_channel))
            if bias is not None:
                out = graph.call_function(
                    aten.add.Tensor, (out, graph.call_function(aten.view.default, (bias, [1, -1, *spatial])))
                )
        if "val" in node.meta:  # the same value: later passes read its sizes (lrpc.dynamic_convolutions)
            out.meta["val"] = node.meta["val"]
        node.replace_all_uses_with(out)
        graph.erase_node(node)
    graph.eliminate_dead_code()
    return graph


def _channel_scale(weight: object) -> tuple[fx.Node, fx.Node] | None:
    """``(W, k)`` if ``weight`` is ``W * k`` with ``k`` shaped ``(C_out, 1, ..., 1)`` and ``W`` the full weight."""
    if not (isinstance(weight, fx.Node) and weight.target is aten.mul.Tensor and len(weight.args) == 2):
        return None
    shape = _shape(weight)
    if shape is None:
        return None
    for w, k in (weight.args, weight.args[::-1]):
        if (
            _shape(w) == shape
            and _shape(k) == (shape[0], *[1] * (len(shape) - 1))
            # the product's dtype and device, else the convolution would see a different weight type
            and all(_kind(n) == _kind(weight) for n in (w, k))
        ):
            return w, k
    return None


def _kind(node: fx.Node) -> tuple[torch.dtype, torch.device]:
    return node.meta["val"].dtype, node.meta["val"].device


def _shape(node: object) -> tuple[int, ...] | None:
    return static_shape(node.meta.get("val") if isinstance(node, fx.Node) else None)
