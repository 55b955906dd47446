"""Convolution input gradients at dynamic image sizes (lrpc.dynamic_convolutions): one Inductor compile
serves every image size, with the relevance of ATen's op."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lrpc
from lrpc.backends import _rewritten
from lrpc.channel_scales import unfold_weight_scales
from lrpc.dynamic_convolutions import opaque_input_gradients

aten = torch.ops.aten


def cnn() -> nn.Module:
    """Strided, dilated, grouped and transposed convolutions, a pool and batch norms: every argument of
    the input gradient that depends on the image size, and a convolution reading a batch-norm-folded one
    (whose output lrpc.channel_scales rewrites)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 1),
        nn.BatchNorm2d(8),
        nn.Conv2d(8, 8, 3, stride=2, padding=2, dilation=2, groups=2),
        nn.ReLU(),
        nn.ConvTranspose2d(8, 4, 3, stride=2, padding=1, output_padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 5),
    ).eval()


@pytest.mark.parametrize(
    "case",
    [
        dict(x=(2, 3, 9, 11), w=(4, 3, 3, 3), stride=[2, 1], padding=[1, 0], dilation=[1, 2], groups=1),
        dict(x=(2, 4, 9, 8), w=(4, 2, 3, 3), stride=[1, 1], padding=[1, 1], dilation=[1, 1], groups=2),
        dict(x=(2, 3, 7), w=(5, 3, 2), stride=[3], padding=[0], dilation=[1], groups=1),
        dict(x=(1, 2, 4, 5, 6), w=(3, 2, 2, 2, 2), stride=[1, 2, 1], padding=[1, 0, 1], dilation=[1] * 3, groups=1),
        dict(x=(2, 3, 9, 11), w=(4, 3, 3, 3), stride=[2, 2], padding=[1, 1], dilation=[1, 1], groups=1, nhwc=True),
    ],
    ids=["2d-strided-dilated", "2d-grouped", "1d", "3d", "2d-channels-last"],
)
def test_conv_input_grad_is_aten_input_gradient(case: dict) -> None:
    """torch.library.opcheck: the fake kernel's sizes and strides are the real kernel's (Inductor lays
    out the op's output by them), the schema holds, and the values are ATen's."""
    x, w = torch.randn(case["x"]), torch.randn(case["w"])
    if case.get("nhwc"):
        x = x.to(memory_format=torch.channels_last)
    spatial = len(case["stride"])
    args = (case["stride"], case["padding"], case["dilation"], False, [0] * spatial, case["groups"])
    out = aten.convolution(x, w, None, *args)
    g = torch.randn(out.shape)
    torch.library.opcheck(torch.ops.lrpc.conv_input_grad.default, (g, x, w, *args))
    expected = aten.convolution_backward(g, x, w, None, *args, [True, False, False])[0]
    actual = torch.ops.lrpc.conv_input_grad(g, x, w, *args)
    assert actual.stride() == expected.stride()
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def test_only_input_gradients_at_symbolic_image_sizes_are_replaced() -> None:
    """After unfold_weight_scales, as the compiled backends run them."""

    def rewritten(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
        return _rewritten(gm, lambda graph: opaque_input_gradients(unfold_weight_scales(graph)))

    model = cnn()
    a = lrpc.compile(model, backend="eager")
    x = torch.randn(2, 3, 16, 16)
    static = a.program(x, target=1).graph_module
    a(x, target=1)
    dynamic = a.program(torch.randn(2, 3, 20, 18), target=1).graph_module  # height and width now symbolic

    def count(gm: torch.fx.GraphModule) -> tuple[int, int]:
        ops = [n.target for n in gm.graph.nodes]
        return ops.count(aten.convolution_backward.default), ops.count(torch.ops.lrpc.conv_input_grad.default)

    assert count(static) == count(dynamic) == (4, 0)
    assert count(rewritten(static)) == (4, 0)
    opaque, plain = rewritten(dynamic), _rewritten(dynamic, unfold_weight_scales)
    assert count(opaque) == (0, 4)
    for size in ((20, 18), (23, 31)):
        xs = torch.randn(2, 3, *size)
        args = [*a.program(xs, target=1).traced.state, xs, torch.full((2,), 1)]
        for expected, actual in zip(plain(*args), opaque(*args)):
            torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def test_a_dynamic_cnn_program_serves_every_image_size_from_one_inductor_compile() -> None:
    """Inductor's lowering of convolution_backward turned the image's height and width into constants,
    so Dynamo compiled the dynamic program again for every new size (about 20 s each for the zoo's U-Net on
    2 CPU cores)."""
    from torch._dynamo.utils import counters

    model = cnn()
    reference = lrpc.compile(model, backend="eager")
    a = lrpc.compile(model, backend="inductor")
    torch._dynamo.reset()
    counters.clear()
    for size in ((16, 16), (20, 18), (23, 31), (32, 17)):
        x = torch.randn(2, 3, *size)
        torch.testing.assert_close(a(x).relevance, reference(x).relevance)
    assert a.stats["traces"] == 2
    # the first size's program is compiled by Inductor directly; the dynamic one through Dynamo, once. Torch
    # 2.11's meta function for max pooling guards on whether a size is even (its rounding division): one
    # compile per parity of height and width there, still not one per size
    parities = {(h % 2, w % 2) for h, w in ((20, 18), (23, 31), (32, 17))}
    compiles = 1 if torch.__version__ >= (2, 14) else len(parities)
    assert 1 <= counters["stats"]["unique_graphs"] <= compiles


def test_module_reloaded_reuses_the_registered_op() -> None:
    import importlib

    from lrpc import dynamic_convolutions

    op = torch.ops.lrpc.conv_input_grad
    importlib.reload(dynamic_convolutions)  # a second registration would raise in torch.library
    assert torch.ops.lrpc.conv_input_grad is op
