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
from lrpc.narrowing import Axis

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
        m.setattr(lrpc.canonize, "narrow_positions", lambda graph, *_: graph)
        attributor = lrpc.compile(model, rules=rules, backend="eager", **kw)
        return attributor(**inputs, target=target), attributor.program(**inputs, target=target)


def narrowed_and_not(monkeypatch, model, rules, x, *, register=None, target=1):
    """The result with narrowing, the result without it, and the linear layers narrowed; ``register``, an
    ``(op, rule)`` pair, is registered for the calls and removed again."""
    if register is not None:
        lrpc.register_rule(*register)
    try:
        attributor = lrpc.compile(model, rules=rules, backend="eager")
        result = attributor(x, target=target)
        reference, _ = unnarrowed(monkeypatch, model, rules, {"x": x}, target=target)
        return result, reference, narrowed_linears(attributor.program(x, target=target))
    finally:
        if register is not None:
            lrpc.register_rule(register[0], None)


def narrowed_linears(program) -> list[str]:
    """Linear layers of the traced graph that the pass narrowed, by their names before it (a node narrowed
    for two selects in turn is named ``<name>_narrowed_narrowed``)."""
    return [
        n.name.split("_narrowed")[0] for n in program.plan.graph.nodes
        if n.target is torch.ops.aten.linear.default and n.name.endswith("_narrowed")
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
    if build is vit:  # torchvision's attention flattens positions and batch into rows for its projection
        assert rows(program)[-4:] == [2, 2, 2, 2], "attention output, feed-forward and head: one row each"
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
    assert narrowed_linears(attributor.program(x, target=2)) == ["linear", "linear_1"]

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
    assert "linear_11" in narrowed_linears(attributor.program(**inputs, target=1))


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


class Small(nn.Module):
    """``fc1``, then ``body`` (which reads one position), then nothing or ``fc2``: the cases below."""

    def __init__(self, body):
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.fc2 = nn.Linear(6, 3)
        self.pos = nn.Parameter(torch.randn(1, 1, 6))
        self.body = body

    def forward(self, x):
        return self.body(self, x)


def rows(program) -> list[int]:
    """The rows (batch x positions) each linear layer (``linear``, or ``addmm`` as in GPT-2's Conv1D) of the
    program computes, in graph order."""
    layers = (torch.ops.aten.linear.default, torch.ops.aten.addmm.default)
    return [
        n.meta["val"].numel() // n.meta["val"].shape[-1] for n in program.plan.graph.nodes if n.target in layers
    ]


def _feature_statistics(m, x):
    h = m.fc1(x)
    mixed = h - h.mean(-1, keepdim=True) + h.amax(-1, keepdim=True) - h.amin(-1, keepdim=True)
    return m.fc2(mixed * h.sum(-1).unsqueeze(-1))[:, 2]


def _statistic_over_positions(m, x):
    h = m.fc1(x)
    return m.fc2(h * torch.rsqrt(h.pow(2).mean(1, keepdim=True) + 1e-6))[:, 0]


def _centered(m, x):
    h = torch.tanh(m.fc1(x))
    return m.fc2(h - h.mean(1, keepdim=True))[:, 2]


def _two_positions(m, x):
    h = torch.tanh(m.fc1(x))
    return m.fc2(h[:, 1] + h[:, 3])


def _conv1d(m, x, select=lambda y: y[:, -1]):
    """GPT-2's Conv1D: batch and positions flattened into the rows of an ``addmm``, then unflattened."""
    h = torch.tanh(m.fc1(x))
    return select(torch.addmm(m.fc2.bias, h.reshape(-1, 6), m.fc2.weight.T).view(*h.shape[:-1], 3))


def _positions_first(m, x):
    """torchvision's attention: positions before the batch, ``(T*B, D)`` rows; the position is a block."""
    h = torch.tanh(m.fc1(x)).transpose(0, 1)
    return torch.addmm(m.fc2.bias, h.reshape(-1, 6), m.fc2.weight.T).view(5, -1, 3).transpose(0, 1)[:, 3]


def _flattened_and_whole(m, x, positions_first=False):
    """The flattened rows have a second user that needs them all: the addmm takes a strided slice (every
    fifth row) or a block of rows from them."""
    h = torch.tanh(m.fc1(x))
    r = (h.transpose(0, 1) if positions_first else h).reshape(-1, 6)
    y = torch.addmm(m.fc2.bias, r, m.fc2.weight.T)
    y = y.view(5, -1, 3).transpose(0, 1) if positions_first else y.view(-1, 5, 3)
    return y[:, -2] + r.sum()


def _shared_then_block(m, x):
    """``a`` feeds ``fc2`` and a positions-first fold whose other factor is needed whole: with a symbolic
    batch that fold cannot be sliced, so ``a`` (and ``fc1``) must stay whole, not be computed twice."""
    a = torch.tanh(m.fc1(x))
    r = torch.tanh(x.sum(-1, keepdim=True) + m.pos).transpose(0, 1).reshape(-1, 6)
    folded = a.transpose(0, 1).reshape(-1, 6) * r
    y = torch.addmm(m.fc2.bias, folded, m.fc2.weight.T).view(5, -1, 3).transpose(0, 1)
    return (m.fc2(a) + y)[:, 2] + r.sum()


def _position_inside(m, x):
    """``(B, T, 6)`` viewed as ``(B*T*2, 3)``: each position's values lie between samples and halves."""
    h = torch.exp(torch.tanh(m.fc1(x)).view(20, 3)).view(2, 5, 6)
    return m.fc2(h)[:, 1]


def _addmm_columns(m, x):
    """Columns of an ``addmm`` whose bias is a matrix (expanded along the columns)."""
    h = torch.tanh(m.fc1(x[0]))
    return torch.addmm(m.fc2.bias[:, None].expand(3, 5), m.fc2.weight, h.T)[:, 2]


def _per_token(after_fc1=torch.tanh, select=lambda y: y[:, 2]):
    return lambda m, x: select(m.fc2(after_fc1(m.fc1(x))))


# model body -> the rows each linear layer computes: 2 x 5 = 10 unnarrowed (x is 2 x 5 x 4), 2 at one position
SMALL = {
    "per-token layers": (_per_token(), [2, 2]),
    "last position": (_per_token(select=lambda y: y[:, -1]), [2, 2]),
    "second to last": (_per_token(select=lambda y: y[:, -2]), [2, 2]),
    "broadcast parameter": (lambda m, x: m.fc2(torch.tanh(m.fc1(x) + m.pos))[:, 2], [2, 2]),
    "batch dim": (_per_token(select=lambda y: y[1]), [5, 5]),
    "transposed": (lambda m, x: m.fc2(torch.tanh(m.fc1(x)).transpose(0, 1))[3], [2, 2]),
    "select of a select": (_per_token(select=lambda y: y[1][3]), [1, 1]),
    "slice of one position": (_per_token(select=lambda y: y[:, 2:3]), [2, 2]),
    "slice of the last position": (_per_token(select=lambda y: y[:, -1:]), [2, 2]),
    "slice clamped to one position": (_per_token(select=lambda y: y[:, -7:1]), [2, 2]),
    # the select reads a broadcast position: fc1 narrows to the position the slice takes
    "broadcast position": (_per_token(lambda h: torch.tanh(h[:, :1].expand(2, 5, 6)), lambda y: y[:, 3]), [2, 2]),
    "flattened rows, sliced": (lambda m, x: _conv1d(m, x, lambda y: y[:, -1:]), [2, 2]),
    "unsqueezed": (_per_token(lambda h: torch.tanh(h).unsqueeze(0), lambda y: y[:, :, 3]), [2, 2]),
    "squeeze of a size-1 dim": (_per_token(lambda h: torch.tanh(h).unsqueeze(2).squeeze(2)), [2, 2]),
    "sliced features": (_per_token(lambda h: torch.tanh(h)[..., :6]), [2, 2]),
    "dtype round trip": (_per_token(lambda h: torch.tanh(h).float().double()), [2, 2]),
    "layer norm over features": (_per_token(lambda h: nn.functional.layer_norm(h, (6,))), [2, 2]),
    "rms norm over features": (_per_token(lambda h: nn.functional.rms_norm(h, (6,))), [2, 2]),
    "log-softmax over features": (_per_token(lambda h: torch.log_softmax(h, -1)), [2, 2]),
    "statistics over features": (_feature_statistics, [2, 2]),
    "sum over the batch": (_per_token(lambda h: torch.tanh(h).sum(0), lambda y: y[2]), [2, 1]),
    "rows of a matrix product": (lambda m, x: (torch.tanh(m.fc1(x[0])) @ m.fc2.weight.T)[2], [1]),
    "columns of a matrix product": (lambda m, x: (m.fc2.weight @ torch.tanh(m.fc1(x[0])).T)[:, 2], [1]),
    "columns of an addmm": (_addmm_columns, [1, 3]),  # the addmm: 3 rows of one column
    "flattened rows of an addmm, batch of one": (lambda m, x: _conv1d(m, x[:1]), [1, 1]),
    # batch and positions flattened into one dim: the position is every fifth row, or a block of two rows
    "flattened rows of an addmm, batch of two": (_conv1d, [2, 2]),
    "flattened rows, positions first": (_positions_first, [2, 2]),
    "every fifth of rows needed whole": (_flattened_and_whole, [10, 2]),
    "a block of rows needed whole": (lambda m, x: _flattened_and_whole(m, x, positions_first=True), [10, 2]),
    "a layer shared with a fold": (_shared_then_block, [2, 2, 2]),
    # positions mixed along the selected dim: only what comes after the mixing narrows
    "softmax over positions": (_per_token(lambda h: torch.softmax(h, 1)), [10, 2]),
    "cumulative sum": (_per_token(lambda h: torch.tanh(h.cumsum(1))), [10, 2]),
    "mean over positions": (_centered, [10, 2]),
    # fc1 twice: the call whose output only the subtraction reads narrows, the one under the max does not
    "max over positions": (lambda m, x: m.fc2(m.fc1(x) - m.fc1(x).amax(1, keepdim=True))[:, 2], [2, 10, 2]),
    "statistic over positions": (_statistic_over_positions, [10, 2]),
    "norm over positions": (_per_token(lambda h: nn.functional.layer_norm(h, (5, 6))), [10, 2]),
    "positions reordered by a view": (_per_token(lambda h: torch.tanh(h).view(5, 2, 6), lambda y: y[3]), [10, 2]),
    "a slice of positions": (_per_token(lambda h: torch.tanh(h)[:, 1:4], lambda y: y[:, 1]), [10, 2]),
    "slice of two positions": (_per_token(select=lambda y: y[:, 1:3]), [10, 10]),
    "slice of every other position": (_per_token(select=lambda y: y[:, ::2][:, 1:2]), [10, 10]),
    # nothing to narrow before fc2 (or at all)
    "two positions of one tensor": (_two_positions, [10, 2]),
    # samples before and after the position in one dim: neither a stride nor a block of rows
    "positions inside a flattened dim": (_position_inside, [10, 2]),
    "a feature": (lambda m, x: torch.tanh(m.fc1(x))[..., 2], [10]),
    "squeeze of every size-1 dim": (_per_token(lambda h: torch.tanh(h).unsqueeze(2).squeeze()), [10, 2]),
    "squeeze of a dim of another size": (_per_token(lambda h: torch.tanh(h).squeeze(1)), [10, 2]),
}


def small(case: str) -> nn.Module:
    torch.manual_seed(0)
    return Small(SMALL[case][0]).to(D).eval()


X = torch.randn(2, 5, 4, generator=torch.Generator().manual_seed(3), dtype=D)


@pytest.mark.parametrize("case", list(SMALL))
def test_small_models_narrow_where_positions_are_independent(case: str, monkeypatch) -> None:
    model = small(case)
    with torch.no_grad():
        target = 0 if model(X).dim() >= 2 else None  # a vector has no class dimension to pick from
    attributor = lrpc.compile(model, rules="epsilon", backend="eager")
    result = attributor(X, target=target)
    reference, full = unnarrowed(monkeypatch, model, "epsilon", {"x": X}, target=target)

    assert rows(attributor.program(X, target=target)) == SMALL[case][1]
    assert linears(attributor.program(X, target=target)) == linears(full)
    with torch.no_grad():
        torch.testing.assert_close(result.output, model(X), rtol=1e-12, atol=1e-12)
    assert result.relevance.shape == X.shape
    assert rel_err(result.relevance, reference.relevance) < 1e-10


def test_a_select_of_features_narrows_what_is_elementwise() -> None:
    """A linear layer mixes its features: a select of one stops there, and slices its output."""
    program = lrpc.compile(small("a feature"), rules="epsilon", backend="eager").program(X, target=0)
    (tanh,) = [n for n in program.plan.graph.nodes if n.target is torch.ops.aten.tanh.default]
    assert tanh.meta["val"].shape == (2, 5, 1)


@pytest.mark.parametrize(
    "wrong",
    [
        pytest.param(lambda node, at, rank: ({0: Axis(rank - 1)}, node.args), id="features (the op rejects them)"),
        pytest.param(lambda node, at, rank: ({}, node.args), id="nothing (a whole-size copy)"),
    ],
)
def test_a_wrong_rule_in_the_table_leaves_the_graph_unnarrowed(wrong, monkeypatch) -> None:
    """The narrowed copies are checked against the shapes they must have: a rule that narrows a linear
    layer's input along the wrong dim, or not at all, is caught, and the graph stays as it was."""
    import lrpc.narrowing

    monkeypatch.setitem(lrpc.narrowing._RULES, torch.ops.aten.linear.default, wrong)
    model = small("per-token layers")
    attributor = lrpc.compile(model, rules="epsilon", backend="eager")
    result = attributor(X, target=0)
    assert rows(attributor.program(X, target=0)) == [10, 10]
    with torch.no_grad():
        torch.testing.assert_close(result.output, model(X), rtol=1e-12, atol=1e-12)


def test_only_dtype_checks_follow_a_value_into_its_narrowed_copy() -> None:
    """Export checks a ``.to()`` argument's dtype and device (which narrowing keeps); a check of its size
    or strides would fail on the narrowed copy, so such a user keeps the value whole."""
    from lrpc.narrowing import _dtype_check

    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    check = torch.ops.aten._assert_tensor_metadata.default
    assert _dtype_check(graph.call_function(check, (x, None, None, torch.float64), {"device": "cpu"}))
    assert not _dtype_check(graph.call_function(check, (x, [2, 5, 6]), {"dtype": torch.float64}))
    assert not _dtype_check(graph.call_function(check, (x,), {"stride": [30, 6, 1]}))
    assert not _dtype_check(graph.call_function(torch.ops.aten.clone.default, (x,)))


def gpt2() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64, initializer_range=0.1, use_cache=False
    )
    # transformers' SDPA mask for traced models is a float32 `full` of the dtype's minimum: float64 overflows
    config._attn_implementation = "eager"
    return transformers.GPT2LMHeadModel(config).to(D).eval()


def llama() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.1, use_cache=False,
    )
    return transformers.LlamaForCausalLM(config).to(D).eval()


@pytest.mark.parametrize("build,batch", [(gpt2, 1), (gpt2, 3), (llama, 2)], ids=["gpt2", "gpt2-batch3", "llama"])
def test_a_language_model_explained_at_its_last_position_computes_its_head_there(build, batch) -> None:
    """``output=`` picking the last position's logits: the LM head, and the last block's position-wise
    layers, run at that position only (GPT-2's Conv1D flattens batch and positions into rows: there the
    position is every 9th row). The relevance is the full-logits program's, which puts its seed at that
    position too."""
    model = build()
    ids = torch.randint(0, 100, (batch, 9), generator=torch.Generator().manual_seed(1))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    last = lrpc.compile(model, rules="attnlrp", backend="eager", output=lambda out: out.logits[:, -1])
    result = last(**inputs, target=7)
    reference = lrpc.compile(model, rules="attnlrp", backend="eager")(**inputs, target=7)

    with torch.no_grad():
        torch.testing.assert_close(result.output, model(**inputs).logits[:, -1], rtol=1e-12, atol=1e-12)
    assert rel_err(result.relevance, reference.relevance) < 1e-10
    # the head and the last block's output projection and feed-forward layers: one row per sample
    per_layer = rows(last.program(**inputs, target=7))
    assert per_layer[-1] == batch and per_layer.count(batch) >= 4, per_layer
    assert sorted(set(per_layer)) == [batch, batch * 9]


def test_a_language_model_keeping_only_its_last_logits_computes_its_last_block_there() -> None:
    """``logits_to_keep=1`` (transformers' generation argument) slices the last position, ``h[:, -1:]``,
    before the head: the last block's position-wise layers then run at that position too, and the relevance
    is that of ``output=`` selecting it."""
    model = llama()
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(1))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    kept = lrpc.compile(model, rules="attnlrp", backend="eager")
    result = kept(**inputs, logits_to_keep=1, target=7)
    reference = lrpc.compile(model, rules="attnlrp", backend="eager", output=lambda out: out.logits[:, -1])

    with torch.no_grad():
        torch.testing.assert_close(result.output, model(**inputs, logits_to_keep=1).logits, rtol=1e-12, atol=1e-12)
    assert rel_err(result.relevance, reference(**inputs, target=7).relevance) < 1e-10
    per_layer = rows(kept.program(**inputs, logits_to_keep=1, target=7))
    assert per_layer[-5:] == [2] * 5, "the last block's output projection and MLP, and the head, at one position"
    assert per_layer.count(2) == 5

    # another batch and length: a dynamic program, whose slice has a symbolic length
    ids = torch.randint(0, 100, (3, 12), generator=torch.Generator().manual_seed(2))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    result = kept(**inputs, logits_to_keep=1, target=7)
    assert kept.stats["traces"] == 2
    assert rel_err(result.relevance, reference(**inputs, target=7).relevance) < 1e-10
    graph = kept.program(**inputs, logits_to_keep=1, target=7).plan.graph
    narrowed_mlp = [n for n in graph.nodes if n.target is torch.ops.aten.linear.default and n.name.endswith("_narrowed")]
    assert len(narrowed_mlp) == 4, "the last block's output projection and MLP (the head is narrowed by the model)"


@pytest.mark.parametrize("build,layers", [(gpt2, 4), (llama, 5)], ids=["gpt2", "llama"])
def test_a_dynamic_program_narrows_the_last_block_too(build, layers: int) -> None:
    """The dynamic program (any batch, any length) of a language model explained at its last position:
    GPT-2 folds a symbolic batch and length into its Conv1D rows, Llama keeps a whole-length slice of its
    hidden states (``logits_to_keep=0``). The last block and the head still run at the last position (one
    row per sample), and the relevance stays exact."""
    model = build()
    last = lrpc.compile(model, rules="attnlrp", backend="eager", output=lambda out: out.logits[:, -1])
    full = lrpc.compile(model, rules="attnlrp", backend="eager")
    for batch, length in [(2, 9), (3, 12), (4, 5)]:
        ids = torch.randint(0, 100, (batch, length), generator=torch.Generator().manual_seed(batch))
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        assert rel_err(last(**inputs, target=7).relevance, full(**inputs, target=7).relevance) < 1e-10
    assert last.stats["traces"] == 2  # the first shape, then one dynamic program
    graph = last.program(**inputs, target=7).plan.graph
    layer_ops = (torch.ops.aten.addmm.default, torch.ops.aten.linear.default)
    narrowed = [n for n in graph.nodes if n.target in layer_ops and n.name.endswith("_narrowed")]
    assert len(narrowed) == layers, "the last block's attention output projection, feed-forward layers, head"
    assert all("*" not in str(n.meta["val"].numel() // n.meta["val"].shape[-1]) for n in narrowed), "B rows"


@pytest.mark.parametrize(
    "case,narrowed",
    [
        ("flattened rows of an addmm, batch of two", 2),
        ("flattened rows, positions first", 2),
        ("every fifth of rows needed whole", 1),  # a stride of T rows: T is known
        ("a block of rows needed whole", 0),  # a block of B rows, B symbolic: stays whole
        ("a layer shared with a fold", 1),  # fc2 only: fc1 feeds the fold that stays whole
    ],
)
def test_folds_with_a_symbolic_batch(case: str, narrowed: int, monkeypatch) -> None:
    """The same small models at batch 2, then 3 (a dynamic program, whose batch is symbolic): a slice of
    the folded rows that needs the batch's size keeps its layer whole instead."""
    model = small(case)
    attributor = lrpc.compile(model, rules="epsilon", backend="eager")
    for x in (X, torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(4), dtype=D)):
        result = attributor(x, target=0)
        reference, _ = unnarrowed(monkeypatch, model, "epsilon", {"x": x}, target=0)
        assert rel_err(result.relevance, reference.relevance) < 1e-10
    assert attributor.stats["traces"] == 2
    program = attributor.program(x, target=0)
    per_layer = rows(program)
    assert sum("*" not in str(r) for r in per_layer) == narrowed, per_layer
    _, full = unnarrowed(monkeypatch, model, "epsilon", {"x": x}, target=0)
    assert linears(program) == linears(full), "narrowing must not compute a layer twice (whole and narrowed)"


class TokensThroughBatchNorm(nn.Module):
    """Token-wise layers on the flattened tokens, a batch norm after the first (folded into it)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.bn, self.fc2 = nn.Linear(4, 16), nn.BatchNorm1d(16), nn.Linear(16, 3)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-1, 1)
            self.bn.running_var.uniform_(0.5, 2)

    def forward(self, x):
        b, t, _ = x.shape
        return self.fc2(torch.relu(self.bn(self.fc1(x.reshape(b * t, 4))))).view(b, t, 3)[:, 0]


def test_a_requested_layer_folded_into_another_stays_whole(monkeypatch) -> None:
    """``layers=["bn"]`` where the batch norm is folded into ``fc1``: the folded layer now produces the
    batch norm's output, so it stays whole like the module itself would."""
    model = TokensThroughBatchNorm().to(D).eval()
    x = torch.randn(1, 5, 4, generator=torch.Generator().manual_seed(7), dtype=D)
    attributor = lrpc.compile(model, rules="epsilon", backend="eager", layers=["bn"])
    result = attributor(x, target=0)
    reference, _ = unnarrowed(monkeypatch, model, "epsilon", {"x": x}, target=0, layers=["bn"])
    assert result.layers["bn"].shape == (5, 16)
    assert rel_err(result.layers["bn"], reference.layers["bn"]) < 1e-10
    assert rel_err(result.relevance, reference.relevance) < 1e-10
    assert rows(attributor.program(x, target=0)) == [5, 1], "fc2 still runs at the one token"


@pytest.mark.parametrize(
    "bounds,given",
    [
        ("per position", "first="),
        ("per position, numpy", "first="),
        ("per position", "register_rule"),
        ("per feature", "first="),
    ],
)
def test_zbox_bounds_per_position_keep_every_position(bounds: str, given: str, monkeypatch) -> None:
    """ZBox's bounds broadcast against one sample: shaped ``(T, D)`` they differ between positions, and
    the first layer narrowed to one position could not be paired with them, so that layer stays whole, for a
    preset's rule and a rule registered for an op alike. Per-feature bounds fit any position, and the
    program narrows."""
    from lrpc.rules import ZBox

    class LastOfOneLayer(nn.Module):  # one linear layer: a rule registered for linear meets these bounds only
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 4)

        def forward(self, x):
            return self.fc(x)[:, -1]

    torch.manual_seed(0)
    model = LastOfOneLayer().to(D).eval()
    x = torch.randn(2, 5, 6, generator=torch.Generator().manual_seed(4), dtype=D)
    per_position = bounds.startswith("per position")
    low = torch.linspace(-4, -2, 30, dtype=D).view(5, 6) if per_position else torch.full((6,), -3.0, dtype=D)
    rule = ZBox(low.numpy(), (-low).numpy()) if bounds.endswith("numpy") else ZBox(low, -low)
    registered = given == "register_rule"
    rules = "epsilon" if registered else lrpc.composite("epsilon", first=rule)
    result, reference, narrowed = narrowed_and_not(
        monkeypatch, model, rules, x, register=(torch.ops.aten.linear.default, rule) if registered else None
    )
    assert rel_err(result.relevance, reference.relevance) < 1e-10
    assert narrowed == ([] if per_position else ["linear"])


@pytest.mark.parametrize("given", ["first=", "register_rule for linear", "register_rule for convolution"])
def test_a_rule_per_position_keeps_only_its_own_layers_whole(given: str, monkeypatch) -> None:
    """Only the layers a per-position rule lands on stay whole: with ZBox bounds of shape ``(T, D)`` on the
    first layer, the second still runs at the one position; a rule registered for an op the model does not
    use (convolution) leaves narrowing as it is. Same relevance as the program without narrowing."""
    from lrpc.rules import ZBox

    class TwoLayersLast(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(6, 6), nn.Linear(6, 4)  # one ZBox fits both

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(x)))[:, -1]

    torch.manual_seed(0)
    model = TwoLayersLast().to(D).eval()
    x = torch.randn(2, 5, 6, generator=torch.Generator().manual_seed(4), dtype=D)
    low = torch.linspace(-4, -2, 30, dtype=D).view(5, 6)
    op = torch.ops.aten.convolution.default if given.endswith("convolution") else torch.ops.aten.linear.default
    rules = lrpc.composite("epsilon", first=ZBox(low, -low)) if given == "first=" else "epsilon"
    register = (op, ZBox(low, -low)) if given.startswith("register_rule") else None
    result, reference, narrowed = narrowed_and_not(monkeypatch, model, rules, x, register=register)
    assert rel_err(result.relevance, reference.relevance) < 1e-10
    expected = {"first=": ["linear_1"], "register_rule for linear": [], "register_rule for convolution": ["linear", "linear_1"]}
    assert narrowed == expected[given]


def test_inserting_a_node_leaves_the_dynamic_sizes_dynamic() -> None:
    """A pass computes a new node's fake value in the exported program's shape environment. On torch 2.11,
    a linear layer on a narrowed (sliced) activation made its decomposition guard on the batch size, which
    specialized it to the traced value for the whole program: BERT's dynamic program then failed on any
    other batch. The new node must add no guard and leave every size symbolic."""
    from lrpc.tracing import insert_call, trace

    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x * 2)

    graph = trace(Scaled().eval(), (torch.randn(3, 5, 8),), {}, dynamic=True).graph
    mul = next(n for n in graph.nodes if n.target == torch.ops.aten.mul.Tensor)
    linear = next(n for n in graph.nodes if n.target == torch.ops.aten.linear.default)
    env = mul.meta["val"].fake_mode.shape_env
    guards, replacements = len(env.guards), dict(env.replacements)
    with graph.inserting_after(mul):
        first = insert_call(graph, torch.ops.aten.slice.Tensor, (mul, 1, 0, 1), like=mul)
    with graph.inserting_after(first):
        narrowed = insert_call(graph, torch.ops.aten.linear.default, (first, *linear.args[1:]), like=linear)
    batch = narrowed.meta["val"].shape[0]
    assert isinstance(batch, torch.SymInt) and not batch.node.expr.is_number, batch
    assert len(env.guards) == guards and env.replacements == replacements
