"""Narrowing (``lrpc.narrowing``): a classifier that reads one position of a sequence computes only that
position where it can. Each check compares the narrowed program with the same program unnarrowed (the
pass switched off), and checks that the narrowing happened, so that a pass that silently stopped working
fails too. LXT's comparisons on BERT and ViT (tests/test_lxt.py) check the narrowed programs against an
independent implementation."""

from __future__ import annotations

import pytest
import torch
import transformers
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer

import lrpc
import lrpc.canonize

D = torch.float64


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert b.abs().max() > 0, "reference is all zero: the test would be vacuous"
    return float((a - b).abs().max() / b.abs().max())


def bert() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, initializer_range=0.1, num_labels=3,
    )
    return transformers.BertForSequenceClassification(config).to(D).eval()


def vit() -> nn.Module:
    torch.manual_seed(0)
    model = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=64, num_classes=5)
    nn.init.normal_(model.heads.head.weight, std=0.1)  # torchvision starts the head at zero
    return model.to(D).eval()


class LastToken(nn.Module):
    """Per-token layers (no mixing between positions), then the last position: narrowing reaches the input."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 16, bias=False)
        self.fc2 = nn.Linear(16, 4, bias=False)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))[:, -1]


def tokens(batch: int = 2, length: int = 9) -> dict:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 100, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0  # padding: the mask's rows are narrowed with the scores
    return {"input_ids": ids, "attention_mask": mask}


def unnarrowed(monkeypatch, model, rules, inputs, target=1, **kw):
    """The result and program with the narrowing pass switched off."""
    with monkeypatch.context() as m:
        m.setattr(lrpc.canonize, "narrow_positions", lambda graph, keep=(): graph)
        attributor = lrpc.compile(model, rules=rules, backend="eager", **kw)
        return attributor(**inputs, target=target), attributor.program(**inputs, target=target)


def narrowed_linears(program) -> list[str]:
    """Linear layers of the traced graph that run on one position (sequence dim of size 1)."""
    return [
        n.name for n in program.plan.graph.nodes
        if n.target is torch.ops.aten.linear.default and n.meta["val"].dim() == 3 and n.meta["val"].shape[1] == 1
    ]


def linears(program) -> int:
    return sum(n.target is torch.ops.aten.linear.default for n in program.plan.graph.nodes)


@pytest.mark.parametrize(
    "build,inputs",
    [(bert, tokens()), (vit, {"x": torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2), dtype=D)})],
    ids=["bert", "vit"],
)
@pytest.mark.parametrize("rules", ["attnlrp", "cp-lrp", "epsilon"])
def test_a_classifier_on_one_token_computes_its_last_block_at_that_token(build, inputs, rules, monkeypatch) -> None:
    model = build()
    attributor = lrpc.compile(model, rules=rules, backend="eager")
    result = attributor(**inputs, target=1)
    program = attributor.program(**inputs, target=1)
    reference, full = unnarrowed(monkeypatch, model, rules, inputs)

    # the last block's feed-forward layers (and, for BERT, its query and output projections) run on token 0
    assert len(narrowed_linears(program)) >= 2
    assert narrowed_linears(full) == []
    assert linears(program) == linears(full), "narrowing must not compute a layer twice (whole and narrowed)"
    torch.testing.assert_close(result.output, reference.output, rtol=1e-12, atol=1e-12)
    assert rel_err(result.relevance, reference.relevance) < 1e-10
    with torch.no_grad():
        expected = model(**inputs)
    torch.testing.assert_close(result.output, getattr(expected, "logits", expected), rtol=1e-12, atol=1e-12)


def test_narrowing_stops_at_the_input_and_keeps_lrp0_equal_to_gradient_times_input() -> None:
    """Bias-free ReLU layers applied token by token: everything after the input runs on the last token,
    and the input relevance keeps its shape, zero at the other tokens (LRP-0 = gradient x input)."""
    torch.manual_seed(0)
    model = LastToken().to(D).eval()
    x = torch.randn(3, 5, 6, dtype=D)
    attributor = lrpc.compile(model, rules="lrp0", backend="eager")
    result = attributor(x, target=2)
    assert narrowed_linears(attributor.program(x, target=2)) == ["linear_narrowed", "linear_1_narrowed"]

    xg = x.clone().requires_grad_()
    (grad,) = torch.autograd.grad(model(xg)[:, 2].sum(), xg)
    expected = grad * x  # bias-free ReLU layers: sums to the logit, which seed="logit" puts in
    assert result.relevance.shape == x.shape
    assert result.relevance[:, :-1].abs().max() == 0
    assert rel_err(result.relevance, expected) < 1e-10


def test_requested_layers_keep_their_whole_output(monkeypatch) -> None:
    model = bert()
    inputs = tokens()
    layer = "bert.encoder.layer.1.intermediate"
    attributor = lrpc.compile(model, rules="attnlrp", backend="eager", layers=[layer])
    result = attributor(**inputs, target=1)
    reference, _ = unnarrowed(monkeypatch, model, "attnlrp", inputs, layers=[layer])

    # the layer's relevance has every token (zero but at token 0), and equals the unnarrowed program's
    assert result.layers[layer].shape == (2, 9, 64)
    assert result.layers[layer][:, 1:].abs().max() == 0
    assert rel_err(result.layers[layer], reference.layers[layer]) < 1e-10
    assert rel_err(result.relevance, reference.relevance) < 1e-10
    # what lies after the kept layer is still narrowed
    assert "linear_11_narrowed" in narrowed_linears(attributor.program(**inputs, target=1))


def test_narrowed_programs_follow_dynamic_batch_and_length(monkeypatch) -> None:
    model = bert()
    attributor = lrpc.compile(model, rules="attnlrp", backend="eager")
    for batch, length in [(2, 9), (3, 12), (4, 5)]:
        inputs = tokens(batch, length)
        result = attributor(**inputs, target=1)
        expected, _ = unnarrowed(monkeypatch, model, "attnlrp", inputs)
        assert result.relevance.shape == (batch, length)
        assert rel_err(result.relevance, expected.relevance) < 1e-10
    assert attributor.stats["traces"] == 2  # the first shape, then one dynamic program


def test_ops_that_mix_positions_stop_the_narrowing(monkeypatch) -> None:
    """A cumulative sum along the sequence needs every earlier position: only what follows it narrows."""

    class Cumulative(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(6, 8)
            self.fc2 = nn.Linear(8, 3)

        def forward(self, x):
            return self.fc2(torch.tanh(self.fc1(x).cumsum(1)))[:, 2]

    torch.manual_seed(0)
    model = Cumulative().to(D).eval()
    x = torch.randn(2, 5, 6, dtype=D)
    attributor = lrpc.compile(model, rules="epsilon", backend="eager")
    result = attributor(x, target=0)
    assert narrowed_linears(attributor.program(x, target=0)) == ["linear_1_narrowed"]  # fc2, not fc1
    expected, _ = unnarrowed(monkeypatch, model, "epsilon", {"x": x}, target=0)
    assert rel_err(result.relevance, expected.relevance) < 1e-10
    assert result.relevance[:, 3:].abs().max() == 0 and result.relevance[:, :3].abs().max() > 0
