"""Sibling input gradients of thin convolutions merged into one backward (lrpc.input_gradients): which
calls merge, and that the relevance equals the unmerged program's. Zennit's ZBox / AlphaBeta comparisons
(test_zennit.py) check the merged programs against an independent implementation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lrpc
from lrpc import input_gradients
from lrpc.rules import AlphaBeta, ZBox

D = torch.float64
BACKWARD = torch.ops.aten.convolution_backward.default


def backwards(attributor: lrpc.Attributor, x: torch.Tensor) -> int:
    return sum(n.target is BACKWARD for n in attributor.program(x).graph_module.graph.nodes)


def first_layer(rule, layer: nn.Module, x: torch.Tensor, monkeypatch, path: str = "0") -> tuple[int, int]:
    """Backward calls in the program with and without merging; the two relevances agree."""
    model = nn.Sequential(layer, nn.ReLU(), nn.Flatten(), nn.LazyLinear(3)).to(D).eval()
    model(x)
    rules = lrpc.composite("epsilon", {path: rule})
    merged = lrpc.compile(model, rules=rules, backend="eager")
    counts = [backwards(merged, x)]  # compiled now, before merging is switched off
    monkeypatch.setattr(input_gradients, "MAX_CHANNELS", 0)
    separate = lrpc.compile(model, rules=rules, backend="eager")
    counts.append(backwards(separate, x))
    expected = separate(x, target=1).relevance
    assert expected.abs().max() > 0
    torch.testing.assert_close(merged(x, target=1).relevance, expected, rtol=1e-12, atol=1e-12)
    # the generated module itself (the backends run rewritten copies of it)
    program = merged.program(x, target=1)
    graph = program.graph_module.graph
    graph.lint()
    assert list(reversed(graph.nodes)) == list(graph.nodes)[::-1]  # the node list's links both ways
    outputs = program.graph_module(*program.traced.state, x, torch.full((x.shape[0],), 1))
    torch.testing.assert_close(outputs[3], expected, rtol=1e-12, atol=1e-12)
    return counts[0], counts[1]


@pytest.mark.parametrize(
    "layer,shape",
    [
        (nn.Conv2d(3, 5, 3, padding=1, stride=2), (2, 3, 9, 9)),
        (nn.Conv1d(2, 4, 3, dilation=2), (3, 2, 11)),
        (nn.Conv2d(1, 4, (3, 5), padding=(1, 0)), (2, 1, 6, 8)),
    ],
    ids=["conv2d-rgb", "conv1d-dilated", "conv2d-one-channel"],
)
@pytest.mark.parametrize("bounds", ["numbers", "per-channel"])
def test_box_rule_runs_one_backward(layer, shape, bounds: str, monkeypatch) -> None:
    """Bounds that are numbers fold into one weight (``ZBox._number_bounds``): two backwards before
    merging; per-channel bounds keep the general form's three."""
    torch.manual_seed(0)
    x = torch.randn(*shape, dtype=D)
    rule = box_rule(bounds, shape)
    numbers = torch.as_tensor(rule.low).numel() == 1  # one channel's bounds are numbers too
    assert first_layer(rule, layer, x, monkeypatch) == (1, 2 if numbers else 3)


def box_rule(bounds: str, shape: tuple[int, ...]) -> ZBox:
    """z^B with the bounds as numbers (-2, 2), or per input channel (another box for each channel)."""
    if bounds == "numbers":
        return ZBox(-2.0, 2.0)
    low = -2.0 - 0.5 * torch.arange(shape[1], dtype=D).view(-1, *(1,) * (len(shape) - 2))
    return ZBox(low, -low)


@pytest.mark.parametrize("batch_norm", [False, True], ids=["conv", "conv-bn"])
def test_alpha_beta_on_signed_inputs_merges_per_gradient(batch_norm: bool, monkeypatch) -> None:
    """``x⁺⊙W⁺ᵀg₁ + x⁻⊙W⁻ᵀg₁`` and the same for ``g₂``: two backwards, not four (also where the
    weights are batch-norm folds, computed in the relevance pass right before the backwards)."""
    torch.manual_seed(1)
    x = torch.randn(2, 3, 8, 8, dtype=D)
    layer = nn.Conv2d(3, 4, 3)
    if batch_norm:
        norm = nn.BatchNorm2d(4)
        norm.running_mean.normal_(), norm.running_var.uniform_(0.5, 2.0), norm.weight.data.normal_()
        layer = nn.Sequential(layer, norm)
    rule = AlphaBeta(2.0, 1.0)
    assert first_layer(rule, layer, x, monkeypatch, path="0.0" if batch_norm else "0") == (2, 4)


@pytest.mark.parametrize(
    "layer,shape",
    [
        (nn.Conv2d(input_gradients.MAX_CHANNELS + 1, 4, 3), (2, input_gradients.MAX_CHANNELS + 1, 6, 6)),
        (nn.Conv2d(4, 4, 3, groups=2), (2, 4, 6, 6)),
        (nn.ConvTranspose2d(3, 4, 3, stride=2), (2, 3, 5, 5)),
    ],
    ids=["wide", "grouped", "transposed"],
)
def test_other_layers_keep_their_backwards(layer, shape, monkeypatch) -> None:
    """Wide layers gain nothing from merging (and would copy their inputs); grouped and transposed
    convolutions do not stack along the input channels."""
    torch.manual_seed(2)
    x = torch.randn(*shape, dtype=D)
    merged, separate = first_layer(box_rule("per-channel", shape), layer, x, monkeypatch)
    assert merged == separate == 3


@pytest.mark.parametrize("rules", ["epsilon-alpha2-beta1", "box"])
def test_network_program_equals_the_unmerged_one(rules: str, monkeypatch) -> None:
    """Whole programs, batch-norm folds and several merged groups included: the generated module (run as
    generated, not through a backend's copy) gives the unmerged program's relevance."""
    torch.manual_seed(3)
    model = (
        nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.Conv2d(4, 6, 3, padding=1, groups=2),
            nn.BatchNorm2d(6),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(6 * 8 * 8, 5),
        )
        .to(D)
        .eval()
    )
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(), m.running_var.uniform_(0.5, 2.0), m.weight.data.normal_()
    preset = lrpc.presets.epsilon_gamma_box(low=-3.0, high=3.0) if rules == "box" else rules
    x = torch.randn(3, 3, 8, 8, dtype=D)
    program = lrpc.compile(model, rules=preset, backend="eager").program(x, target=2)
    monkeypatch.setattr(input_gradients, "MAX_CHANNELS", 0)
    reference = lrpc.compile(model, rules=preset, backend="eager").program(x, target=2)
    args = [*program.traced.state, x, torch.full((3,), 2)]
    merged, separate = program.graph_module(*args), reference.graph_module(*args)
    assert sum(n.target is BACKWARD for n in program.graph_module.graph.nodes) < sum(
        n.target is BACKWARD for n in reference.graph_module.graph.nodes
    )
    for a, e in zip(merged, separate):
        if isinstance(e, torch.Tensor) and e.is_floating_point():
            torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_merged_program_at_other_batch_sizes(backend: str, monkeypatch) -> None:
    """The second batch size compiles a dynamic program: the stacked input's size is symbolic there."""
    torch.manual_seed(4)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)
    ).eval()
    preset = lrpc.presets.epsilon_gamma_box(low=-3.0, high=3.0)
    merged = lrpc.compile(model, rules=preset, backend=backend)
    batches = (2, 5, 3)
    actual = [
        merged(x, target=1).relevance
        for x in (torch.randn(b, 3, 6, 6, generator=torch.Generator().manual_seed(b)) for b in batches)
    ]
    dynamic = merged.program(torch.randn(5, 3, 6, 6), target=1)
    assert dynamic.traced.ranges and sum(n.target is BACKWARD for n in dynamic.graph_module.graph.nodes) == 1
    monkeypatch.setattr(input_gradients, "MAX_CHANNELS", 0)
    separate = lrpc.compile(model, rules=preset, backend="eager")
    for b, got in zip(batches, actual):
        x = torch.randn(b, 3, 6, 6, generator=torch.Generator().manual_seed(b))
        expected = separate(x, target=1).relevance
        assert expected.abs().max() > 0
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6 * expected.abs().max().item())
    assert merged.stats["traces"] == 2
