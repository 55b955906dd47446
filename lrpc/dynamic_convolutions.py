"""Convolution input gradients that Inductor compiles once for every image size.

The relevance pass of a convolution is its input gradient, ``aten.convolution_backward`` with only the
input's gradient asked for. Inductor's lowering of that op turns the gradient's strides into integers
(``guard_int_seq`` in ``torch/_inductor/kernel/conv.py``, read in torch 2.13 and 2.14) to fix the stride
order it requires of the result; on CPU and CUDA it then calls ATen's kernel. The strides hold the image's
height and width, so in a program whose spatial sizes are dynamic that guard fixed them, and Dynamo
compiled the program again for every new image size (the zoo's U-Net: about 20 s per size on 2 CPU cores,
as long as its first compile). Whether torch 2.11 and 2.12 guard the same way was not checked; the op
below is correct either way.

An op of lrpc's own (``lrpc::conv_input_grad``) computes the same ATen call and is opaque to Inductor,
which calls it as an external kernel (what its lowering ends with on CPU and CUDA), and guards nothing:
:func:`opaque_input_gradients` puts it in place of the input gradients whose spatial sizes are symbolic,
on the copy of a program that goes to Inductor. Static programs keep ATen's op.
"""

import operator

import torch
from torch import fx

aten = torch.ops.aten

_INPUT_ONLY = [True, False, False]


def _input_grad(
    grad_output: torch.Tensor,
    input: torch.Tensor,
    weight: torch.Tensor,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    transposed: bool,
    output_padding: list[int],
    groups: int,
) -> torch.Tensor:
    """``aten.convolution_backward(...)[0]``: the gradient at a convolution's ``input`` (which gives only
    its size and layout) of ``grad_output`` at its output. On fake tensors, ATen's meta kernel gives the
    size and strides of the kernel that runs."""
    args = (stride, padding, dilation, transposed, output_padding, groups)
    return aten.convolution_backward.default(grad_output, input, weight, None, *args, _INPUT_ONLY)[0]


def _register() -> object:
    # Registered once per process: a module reloaded (importlib.reload, a test harness) reuses the op.
    if hasattr(torch.ops.lrpc, "conv_input_grad"):
        return torch.ops.lrpc.conv_input_grad
    # no `from __future__ import annotations` here: the op's schema is read from these annotations
    op = torch.library.custom_op("lrpc::conv_input_grad", _input_grad, mutates_args=())
    op.register_fake(_input_grad)
    return op


conv_input_grad = _register()


def opaque_input_gradients(graph: fx.Graph) -> fx.Graph:
    """Replace each input-gradient-only ``convolution_backward`` whose gradient has a symbolic spatial
    size or stride by ``lrpc::conv_input_grad`` (in place; returns ``graph``)."""
    for node in list(graph.find_nodes(op="call_function", target=aten.convolution_backward.default)):
        readers = list(node.users)
        if (
            len(node.args) != 11
            or node.kwargs
            or list(node.args[10]) != _INPUT_ONLY
            or not _spatially_symbolic(node)
            or not all(user.target is operator.getitem and user.args[1] == 0 for user in readers)
        ):
            continue
        grad_output, input, weight, _bias_sizes, *args, _mask = node.args
        with graph.inserting_before(node):
            grad = graph.call_function(torch.ops.lrpc.conv_input_grad.default, (grad_output, input, weight, *args))
        if "val" in node.meta:
            grad.meta["val"] = node.meta["val"][0]
        for user in readers:
            user.replace_all_uses_with(grad)
            graph.erase_node(user)
        graph.erase_node(node)
    return graph


def _spatially_symbolic(node: fx.Node) -> bool:
    """Whether the input gradient's spatial sizes or its strides (what Inductor's lowering guards) are
    symbolic; judged from the input when the gradient carries no fake value."""
    val = node.meta.get("val")
    grad = val[0] if isinstance(val, (tuple, list)) and val else None
    if not isinstance(grad, torch.Tensor):
        input = node.args[1]
        grad = input.meta.get("val") if isinstance(input, fx.Node) else None
    if not isinstance(grad, torch.Tensor):
        return False
    return any(not isinstance(n, int) for n in (*grad.shape[2:], *grad.stride()))
