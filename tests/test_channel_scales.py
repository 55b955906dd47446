"""Batch-norm-folded convolution weights: the compiled backends scale activations instead of weights
(lrpc.channel_scales). Same relevance, no weight-sized products left where the rule is linear in W."""

from __future__ import annotations

import pytest
import torch
from torch import fx, nn

import lrpc
from lrpc.backends import _rewritten
from lrpc.channel_scales import unfold_weight_scales

aten = torch.ops.aten


def bn_net() -> nn.Module:
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3, padding=1, bias=False, groups=2),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Conv2d(6, 4, 1),
        nn.BatchNorm2d(4),
        nn.Flatten(),
        nn.Linear(4 * 8 * 8, 5),
    ).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):  # a batch norm that changes something, negative scales included
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.normal_()
            m.bias.data.normal_()
    return model


def weight_products(graph: fx.Graph, model: nn.Module) -> int:
    """Products shaped like one of the model's convolution weights: the batch-norm folds."""
    shapes = {tuple(m.weight.shape) for m in model.modules() if isinstance(m, nn.Conv2d)}
    return sum(
        n.target is aten.mul.Tensor
        and isinstance(v := n.meta.get("val"), torch.Tensor)
        and all(isinstance(d, int) for d in v.shape)  # weights have static shapes, activations a batch dim
        and tuple(v.shape) in shapes
        for n in graph.nodes
    )


@pytest.mark.parametrize("rules", ["epsilon", "lrp0", "epsilon-plus-flat", "epsilon-alpha2-beta1"])
def test_unfolded_program_matches_the_generated_one(rules: str) -> None:
    model = bn_net().double()
    x = torch.randn(3, 3, 8, 8, dtype=torch.double)
    program = lrpc.compile(model, rules=rules, backend="eager").program(x, target=2)
    gm = program.graph_module
    unfolded = _rewritten(gm, unfold_weight_scales)
    args = [*program.traced.state, x, torch.full((3,), 2)]
    expected, actual = gm(*args), unfolded(*args)
    for e, a in zip(expected, actual):
        if isinstance(e, torch.Tensor):
            torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)
    before, after = weight_products(gm.graph, model), weight_products(unfolded.graph, model)
    assert before >= 3  # each folded weight, in the forward (and rebuilt for the relevance pass)
    if rules in ("epsilon", "lrp0"):  # linear in W: no fold left
        assert after == 0
    else:  # z+ / alpha-beta read clamp(W * k): the forward's fold goes, the relevance pass keeps its own
        assert 0 < after < before
    assert gm.graph is not unfolded.graph and weight_products(gm.graph, model) == before  # the original untouched


def _graph(fn, *args) -> fx.Graph:
    from torch.fx.experimental.proxy_tensor import make_fx

    return make_fx(fn)(*args).graph


def test_only_per_output_channel_scales_of_plain_convolutions_move() -> None:
    x, w, k = torch.randn(2, 3, 5, 5), torch.randn(4, 3, 3, 3), torch.rand(4)
    g = torch.randn(2, 4, 3, 3)

    def cases(x, w, k, g):
        per_out = w * k.view(-1, 1, 1, 1)
        per_in = w * k[:3].view(1, -1, 1, 1)  # scales input channels: does not commute with the output
        return (
            aten.convolution(x, per_out, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1),
            aten.convolution(x, per_in, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1),
            # the weight's own gradient requested: the scale cannot move
            aten.convolution_backward(g, x, per_out, [4], [1, 1], [0, 0], [1, 1], False, [0, 0], 1, [True, True, False]),
            aten.convolution_backward(g, x, per_out, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1, [True, False, False]),
        )

    graph = unfold_weight_scales(_graph(cases, x, w, k, g))
    convs = [n for n in graph.nodes if n.target is aten.convolution.default]
    backs = [n for n in graph.nodes if n.target is aten.convolution_backward.default]
    assert sum(n.args[1].op == "placeholder" for n in convs) == 1  # per_out moved, per_in stayed
    assert [n.args[2].op == "placeholder" for n in backs] == [False, True]
    gm = fx.GraphModule(torch.nn.Module(), graph)
    expected = cases(x, w, k, g)
    actual = gm(x, w, k, g)
    torch.testing.assert_close(actual[0], expected[0])
    torch.testing.assert_close(actual[1], expected[1])
    torch.testing.assert_close(actual[3][0], expected[3][0])


def test_transposed_convolutions_keep_their_weights() -> None:
    """A transposed convolution's weight is (in, out, ...): its dim 0 is not the output channel."""
    x, w, k = torch.randn(2, 4, 5, 5), torch.randn(4, 3, 3, 3), torch.rand(4)

    def fn(x, w, k):
        return aten.convolution(x, w * k.view(-1, 1, 1, 1), None, [1, 1], [0, 0], [1, 1], True, [0, 0], 1)

    graph = unfold_weight_scales(_graph(fn, x, w, k))
    (conv,) = [n for n in graph.nodes if n.target is aten.convolution.default]
    assert conv.args[1].target is aten.mul.Tensor


def test_scale_on_either_side_of_the_product_and_other_ranks_move() -> None:
    """``k * W`` as well as ``W * k``; 1-d and 3-d convolutions scale their output per channel too."""
    x1, w1, k = torch.randn(2, 3, 9), torch.randn(4, 3, 3), torch.rand(4)
    x3, w3 = torch.randn(2, 3, 4, 4, 4), torch.randn(4, 3, 2, 2, 2)
    b = torch.randn(4)

    def fn(x1, w1, x3, w3, k, b):
        return (
            aten.convolution(x1, k.view(-1, 1, 1) * w1, b, [1], [1], [1], False, [0], 1),
            aten.convolution(x3, w3 * k.view(-1, 1, 1, 1, 1), b, [1, 1, 1], [0, 0, 0], [1, 1, 1], False, [0, 0, 0], 1),
        )

    graph = unfold_weight_scales(_graph(fn, x1, w1, x3, w3, k, b))
    assert all(n.args[1].op == "placeholder" for n in graph.nodes if n.target is aten.convolution.default)
    actual = fx.GraphModule(torch.nn.Module(), graph)(x1, w1, x3, w3, k, b)
    for a, e in zip(actual, fn(x1, w1, x3, w3, k, b)):
        torch.testing.assert_close(a, e)


def test_a_scale_that_changes_the_weights_dtype_stays() -> None:
    """``W * k`` with a float64 ``k`` is a float64 weight: the unscaled float32 ``W`` would not do."""
    x, w, k = torch.randn(2, 3, 5, 5, dtype=torch.double), torch.randn(4, 3, 3, 3), torch.rand(4, dtype=torch.double)

    def fn(x, w, k):
        return aten.convolution(x, w * k.view(-1, 1, 1, 1), None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1)

    graph = unfold_weight_scales(_graph(fn, x, w, k))
    (conv,) = [n for n in graph.nodes if n.target is aten.convolution.default]
    assert conv.args[1].target is aten.mul.Tensor
    torch.testing.assert_close(fx.GraphModule(torch.nn.Module(), graph)(x, w, k), fn(x, w, k))


def test_inductor_backend_compiles_the_unfolded_program(monkeypatch) -> None:
    from lrpc import backends

    compiled = []
    # a program with static sizes goes to Inductor directly, a dynamic one through torch.compile
    monkeypatch.setattr(torch._inductor, "compile", lambda gm, args, options: compiled.append(gm) or gm)
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compiled.append(fn.__self__) or fn)
    model = bn_net()
    a = lrpc.compile(model, backend="inductor")
    for batch in (3, 4):
        x = torch.randn(batch, 3, 8, 8)
        torch.testing.assert_close(a(x, target=1).relevance, lrpc.compile(model, backend="eager")(x, target=1).relevance)
    assert len(compiled) == 2 and not backends._symbolic(compiled[0]) and backends._symbolic(compiled[1])
    gm = a.program(torch.randn(3, 3, 8, 8), target=1).graph_module
    assert weight_products(gm.graph, model) >= 3
    assert all(weight_products(unfolded.graph, model) == 0 for unfolded in compiled)


@pytest.mark.slow
def test_inductor_program_of_a_batch_norm_net_matches_eager() -> None:
    model, x = bn_net(), torch.randn(3, 3, 8, 8)
    for rules in ("epsilon", "epsilon-plus-flat"):
        eager = lrpc.compile(model, rules=rules, backend="eager")(x, target=1).relevance
        compiled = lrpc.compile(model, rules=rules, backend="inductor")(x, target=1).relevance
        torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5 * eager.abs().max().item())
