"""Canonicalization and composite ops: batch-norm folding, frozen normalizer statistics, the SDPA
decomposition, and op coverage of 1d/2d/3d CNNs and standard transformer blocks. Each check compares
two ways of writing the same function, or lrpc against an equation computed independently."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lrpc


@pytest.fixture(autouse=True)
def float64():
    """These checks compare to 1e-10: run them in float64, and leave the default as it was."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    assert b.abs().max() > 0, "reference is all zero: the test would be vacuous"
    return float((a - b).abs().max() / b.abs().max())


def explain(model: nn.Module, *args, rules="epsilon", target=None, **kw):
    model.eval()
    return lrpc.compile(model, rules=rules, backend="eager", **kw)(*args, target=target)


def randomize_batch_norm(model: nn.Module) -> nn.Module:
    """A fresh BN in eval mode is the identity; give it statistics that make folding matter."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)):
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) * 2 - 0.5)  # some negative scales
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.3)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model.eval()


class ConvBN(nn.Module):
    def __init__(self, bias: bool):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1, bias=bias)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 4, 3, bias=bias)
        self.bn2 = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 5 * 5, 5)
        self.bn3 = nn.BatchNorm1d(5)

    def forward(self, x):
        h = F.max_pool2d(torch.relu(self.bn1(self.conv1(x))), 2, 1)
        h = torch.relu(self.bn2(self.conv2(h)))
        return self.bn3(self.fc(h.flatten(1)))


def folded_copy(model: ConvBN) -> nn.Module:
    """The same function with every batch norm folded by hand into the layer before it."""

    def fold(layer: nn.Module, bn: nn.Module) -> nn.Module:
        s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        new = type(layer)(*_dims(layer), bias=True) if isinstance(layer, nn.Linear) else nn.Conv2d(
            layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding, bias=True
        )
        with torch.no_grad():
            new.weight.copy_(layer.weight * s.reshape(-1, *([1] * (layer.weight.dim() - 1))))
            b = layer.bias if layer.bias is not None else torch.zeros_like(bn.running_mean)
            new.bias.copy_((b - bn.running_mean) * s + bn.bias)
        return new

    def _dims(layer: nn.Linear):
        return layer.in_features, layer.out_features

    conv1, conv2, fc = fold(model.conv1, model.bn1), fold(model.conv2, model.bn2), fold(model.fc, model.bn3)

    class Folded(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.conv2, self.fc = conv1, conv2, fc

        def forward(self, x):
            h = F.max_pool2d(torch.relu(self.conv1(x)), 2, 1)
            h = torch.relu(self.conv2(h))
            return self.fc(h.flatten(1))

    return Folded().eval()


@pytest.mark.parametrize("bias", [False, True])
def test_batch_norm_folds_into_conv_and_linear(bias: bool) -> None:
    torch.manual_seed(0)
    model = randomize_batch_norm(ConvBN(bias))
    x = torch.randn(4, 3, 8, 8)
    target = torch.tensor([0, 1, 4, 2])
    attributor = lrpc.compile(model, backend="eager")
    res = attributor(x, target=target)
    ref = explain(folded_copy(model), x, target=target)
    assert rel_err(res.output, model(x)) < 1e-12
    assert rel_err(res.relevance, ref.relevance) < 1e-10
    ops = [s.op for s in attributor.plan(x, target=target).steps]
    assert not any("batch_norm" in op for op in ops), ops


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("rules", ["epsilon-plus-flat", "epsilon-alpha2-beta1"])
def test_batch_norm_folds_into_a_transposed_convolution(groups: int, rules: str) -> None:
    """A transposed convolution's weight is ``(in, out / groups, ...)``: each output channel's scale goes into
    its slice of every group. It was not folded, and the batch norm passed relevance as it came (0.64 off
    Zennit, which merges it, under epsilon-plus-flat); its layer rule now sees the folded weights."""
    torch.manual_seed(0)
    up, bn = nn.ConvTranspose2d(4, 6, 3, stride=2, groups=groups), nn.BatchNorm2d(6)
    model = randomize_batch_norm(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), up, bn, nn.ReLU(), nn.Flatten(), nn.Linear(6 * 9 * 9, 3)))
    model = model.double().eval()
    merged = nn.ConvTranspose2d(4, 6, 3, stride=2, groups=groups).double()
    s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    with torch.no_grad():
        merged.weight.copy_((up.weight.view(groups, 4 // groups, 6 // groups, 3, 3) * s.view(groups, 1, -1, 1, 1)).view_as(up.weight))
        merged.bias.copy_((up.bias - bn.running_mean) * s + bn.bias)
    by_hand = nn.Sequential(model[0], model[1], merged, nn.ReLU(), nn.Flatten(), model[6]).eval()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(by_hand(x), model(x))
    attributor = lrpc.compile(model, rules=rules, backend="eager")
    res, ref = attributor(x, target=1), explain(by_hand, x, rules=rules, target=1)
    assert rel_err(res.relevance, ref.relevance) < 1e-10
    assert not any("batch_norm" in s.op for s in attributor.plan(x, target=1).steps)


def test_lrp0_with_folded_batch_norm_is_gradient_times_input() -> None:
    """LRP-0 equals gradient x input on a ReLU net with biases too (the biases absorb relevance)."""
    torch.manual_seed(1)
    model = randomize_batch_norm(ConvBN(bias=True))
    x = torch.randn(3, 3, 8, 8, requires_grad=True)
    target = torch.tensor([3, 0, 1])
    res = explain(model, x.detach(), rules="lrp0", target=target)
    model(x).gather(1, target[:, None]).sum().backward()
    assert rel_err(res.relevance, x.grad * x) < 1e-9


def test_batch_norm_before_conv_is_an_affine_map() -> None:
    """DenseNet-style BN -> ReLU -> conv cannot fold; its rule is epsilon through the affine map
    y = x*s + t, i.e. R_x = x*s*R/stab(y) elementwise."""
    torch.manual_seed(2)
    bn = randomize_batch_norm(nn.Sequential(nn.BatchNorm1d(6)))[0]
    x = torch.randn(5, 6)
    seed = torch.randn(5, 6)
    res = explain(nn.Sequential(bn), x, target=lambda out: seed)
    s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    y = bn(x)
    expected = x * s * seed / (y + 1e-6 * torch.where(y >= 0, 1.0, -1.0))
    assert rel_err(res.relevance, expected) < 1e-10


class HandRMSNorm(nn.Module):
    """RMSNorm written with primitive ops, as Hugging Face Llama does."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(dim) + 0.5)

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))


class CompositeRMSNorm(HandRMSNorm):
    def forward(self, x):
        return F.rms_norm(x, (x.shape[-1],), self.weight, 1e-6)


@pytest.mark.parametrize(
    "norm,eps", [(HandRMSNorm, 0.0), (CompositeRMSNorm, 0.0), (CompositeRMSNorm, 1e-6), (CompositeRMSNorm, 0.1)]
)
def test_rms_norm_holds_its_statistic_constant(norm, eps: float) -> None:
    """AttnLRP: with the rms frozen, RMSNorm is elementwise linear, so epsilon gives
    R_x = x * (w * rstd) * R / stab(y). The hand-written form runs epsilon once per primitive op (the
    statistic product, then the weight), so it equals the one-step equation exactly at eps = 0."""
    torch.manual_seed(3)
    layer = norm(8)
    x = torch.randn(2, 5, 8)
    seed = torch.randn(2, 5, 8)
    res = explain(layer, x, rules=lrpc.presets.epsilon(eps), target=lambda out: seed)
    rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    y = layer.weight * x * rstd
    expected = x * layer.weight * rstd * seed / (y + eps * torch.where(y >= 0, 1.0, -1.0))
    assert rel_err(res.relevance, expected) < 1e-10


def test_layer_norm_with_frozen_std() -> None:
    """LayerNorm: the std is held constant and epsilon runs through the centring and scaling."""
    torch.manual_seed(4)
    layer = nn.LayerNorm(6)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-0.3, 0.3)
    x = torch.randn(3, 6)
    seed = torch.randn(3, 6)
    res = explain(layer, x, target=lambda out: seed)
    y = layer(x)
    g = seed / (y + 1e-6 * torch.where(y >= 0, 1.0, -1.0))
    rstd = 1 / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + layer.eps)
    gw = g * layer.weight * rstd  # the VJP of (x - mean x) * rstd * w with rstd constant
    expected = x * (gw - gw.mean(-1, keepdim=True))
    assert rel_err(res.relevance, expected) < 1e-10


class GlobalResponseNorm(nn.Module):
    """ConvNeXt-V2's GRN, ``h + w * (h * n(h))`` with ``n`` a per-channel spatial norm over its channel mean,
    bias-free: the 2-norm of each channel's flattened map (timm) or its spectral norm, the largest singular
    value of the map (Hugging Face's ``torch.linalg.norm(h, ord=2, dim=(1, 2))``, an SVD in the graph)."""

    def __init__(self, spectral: bool, detach: bool = False) -> None:
        super().__init__()
        self.spectral, self.detach = spectral, detach
        self.conv = nn.Conv2d(3, 4, 3, bias=False)
        self.w = nn.Parameter(torch.randn(1, 1, 1, 4))
        self.head = nn.Linear(4, 5, bias=False)

    def forward(self, x):
        h = self.conv(x).permute(0, 2, 3, 1)
        source = h.detach() if self.detach else h
        g = torch.linalg.norm(source, ord=2, dim=(1, 2), keepdim=True) if self.spectral else source.norm(p=2, dim=(1, 2), keepdim=True)
        h = h + self.w * (h * (g / (g.mean(dim=-1, keepdim=True) + 1e-6)))
        return self.head(h.mean((1, 2)))


@pytest.mark.parametrize("spectral", [False, True], ids=["vector norm", "spectral norm"])
def test_global_response_norm_statistic_is_frozen(spectral: bool) -> None:
    """The GRN statistic is held constant like a normalizer's: then the bias-free net is linear in its input,
    and LRP-0 is gradient x input with the statistic detached. The spectral norm failed before (no rule for
    the SVD)."""
    torch.manual_seed(6)
    model = GlobalResponseNorm(spectral).eval()
    x = torch.randn(2, 3, 8, 8)
    res = explain(model, x, rules="lrp0")
    oracle = GlobalResponseNorm(spectral, detach=True).eval()
    oracle.load_state_dict(model.state_dict())
    xg = x.clone().requires_grad_()
    oracle(xg).gather(1, res.target[:, None]).sum().backward()
    assert rel_err(res.relevance, xg.grad * x) < 1e-10


def test_decomposed_layer_norm_matches_composite_under_lrp0() -> None:
    """Written with primitive ops (mean, sub, var, rsqrt, mul), LayerNorm gives what the composite op
    gives under LRP-0: the statistic is frozen and LRP-0 composes through the linear parts."""
    torch.manual_seed(5)
    w, b = torch.rand(6) + 0.5, torch.randn(6) * 0.1

    class Hand(nn.Module):
        def forward(self, x):
            c = x - x.mean(-1, keepdim=True)
            return c * torch.rsqrt(c.pow(2).mean(-1, keepdim=True) + 1e-5) * w + b

    class Composite(nn.Module):
        def forward(self, x):
            return F.layer_norm(x, (6,), w, b, 1e-5)

    x = torch.randn(4, 6)
    seed = torch.randn(4, 6)
    hand = explain(Hand(), x, rules="lrp0", target=lambda out: seed)
    composite = explain(Composite(), x, rules="lrp0", target=lambda out: seed)
    assert rel_err(hand.relevance, composite.relevance) < 1e-10


class Attention(nn.Module):
    def __init__(self, sdpa: bool, causal: bool, mask: bool):
        super().__init__()
        self.sdpa, self.causal, self.mask = sdpa, causal, mask
        self.qkv = nn.Linear(8, 24)
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, 2, 4).permute(2, 0, 3, 1, 4)
        mask = None
        if self.mask:
            mask = torch.ones(t, t, dtype=torch.bool).triu(1).logical_not()  # causal, as a boolean mask
        if self.sdpa:
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=self.causal)
        else:
            scores = q @ k.transpose(-2, -1) * (1 / math.sqrt(4))
            if self.causal or self.mask:
                scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
            a = torch.softmax(scores, -1) @ v
        return self.out(a.transpose(1, 2).reshape(b, t, 8).mean(1))


@pytest.mark.parametrize("causal,mask", [(False, False), (True, False), (False, True)])
def test_sdpa_is_explained_like_hand_written_attention(causal: bool, mask: bool) -> None:
    torch.manual_seed(6)
    sdpa = Attention(True, causal, mask)
    hand = Attention(False, causal, mask)
    hand.load_state_dict(sdpa.state_dict())
    x = torch.randn(2, 5, 8)
    a, b = explain(sdpa, x, target=1), explain(hand, x, target=1)
    assert rel_err(a.output, b.output) < 1e-12
    assert rel_err(a.relevance, b.relevance) < 1e-10
    families = {s.family for s in lrpc.compile(sdpa, backend="eager").plan(x).steps}
    assert {"softmax", "product"} <= families


class CNN1d(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv1d(3, 8, 3)
        self.bn = nn.BatchNorm1d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        h = F.max_pool1d(torch.relu(self.bn(self.c(x))), 2)
        return self.fc(F.adaptive_avg_pool1d(h, 1).flatten(1))


class CNN3d(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv3d(2, 4, 3, bias=False)
        self.t = nn.ConvTranspose3d(4, 4, 2, stride=2, bias=False)
        self.fc = nn.Linear(4, 3, bias=False)

    def forward(self, x):
        h = F.max_pool3d(torch.relu(self.c(x)), 2)
        return self.fc(F.avg_pool3d(torch.relu(self.t(h)), 8).flatten(1))


@pytest.mark.parametrize("build,shape", [(CNN1d, (3, 3, 20)), (CNN3d, (2, 2, 10, 10, 10))])
def test_1d_and_3d_cnns_lrp0_is_gradient_times_input(build, shape) -> None:
    torch.manual_seed(7)
    model = randomize_batch_norm(build())
    x = torch.randn(*shape, requires_grad=True)
    attributor = lrpc.compile(model, rules="lrp0", backend="eager")
    res = attributor(x.detach(), target=1)
    assert attributor.report().coverage == 1.0
    model(x)[:, 1].sum().backward()
    assert rel_err(res.relevance, x.grad * x) < 1e-9


def test_plan_and_program_are_printable() -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 2)).eval()
    x = torch.randn(2, 1, 4, 4)
    program = lrpc.compile(model, backend="eager").program(x)
    text = str(program.plan)
    assert "Epsilon" in text and "Pass" in text and "aten.convolution.default" in text
    code = program.code()
    assert "convolution_backward" in code and "lrpc_rule" in code


def _mask_cases():
    lowest = torch.finfo(torch.float64).min
    neg_inf = torch.zeros(2, 1, 4, 5)
    neg_inf[1, :, 0, :] = float("-inf")  # a query row with every key masked
    neg_inf[0, :, :, 1] = float("-inf")
    finite = torch.zeros(2, 1, 4, 5)
    finite[1, :, 0, :] = lowest  # Hugging Face 4.x masks: finfo.min, a fully masked row attends uniformly
    finite[0, :, :, 2] = lowest
    boolean = torch.rand(2, 1, 4, 5, generator=torch.Generator().manual_seed(0)) > 0.3
    boolean[0, :, 1, :] = False
    return {
        "none": {},
        "causal": {"is_causal": True},
        "neg_inf": {"attn_mask": neg_inf},
        "finite_min": {"attn_mask": finite},
        "bool": {"attn_mask": boolean},
        "scale": {"scale": 0.3},
    }


@pytest.mark.parametrize("case", ["none", "causal", "neg_inf", "finite_min", "bool", "scale"])
def test_sdpa_decomposition_computes_what_torch_computes(case: str) -> None:
    """The forward must be the model's own: lrpc's SDPA decomposition against torch's SDPA, including
    fully masked rows (0 for -inf / boolean masks, uniform for finite masks, as torch does)."""
    from lrpc.tracing import scaled_dot_product_attention

    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 2, n, 8, generator=g) for n in (4, 5, 5))
    kwargs = _mask_cases()[case]
    expected = F.scaled_dot_product_attention(q, k, v, **kwargs)
    assert torch.isfinite(expected).all()
    torch.testing.assert_close(scaled_dot_product_attention(q, k, v, **kwargs), expected)


@pytest.mark.parametrize("memory", ["BHLE", "BLHE", "LBHE"])
def test_sdpa_decomposition_lays_out_its_output_as_torchs_fake_kernel(memory: str) -> None:
    """Export records SDPA's output with the query's strides and leaves out a ``contiguous()`` that was a
    no-op for them; the model then views it (``nn.MultiheadAttention``: query in (L, B, H, E) memory). The
    decomposition must return the same strides, or that view fails (torch 2.11: ViT did not trace)."""
    from lrpc.tracing import scaled_dot_product_attention

    B, H, L, E = 2, 3, 5, 4
    q, k, v = (torch.randn(*(dict(B=B, H=H, L=L, E=E)[d] for d in memory)).permute(
        *(memory.index(d) for d in "BHLE")) for _ in range(3))
    out = scaled_dot_product_attention(q, k, v)
    assert out.stride() == torch.empty_like(q).stride() == q.stride()
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v))


class NewGELU(nn.Module):
    """GPT-2's activation, written with primitive ops as Hugging Face does."""

    def forward(self, x):
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class HandSiLU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(x)


class Gated(nn.Module):
    def __init__(self, act: nn.Module):
        super().__init__()
        self.fc, self.act, self.out = nn.Linear(6, 8), act, nn.Linear(8, 3)

    def forward(self, x):
        return self.out(self.act(self.fc(x)))


@pytest.mark.parametrize(
    "hand,composite", [(NewGELU(), nn.GELU(approximate="tanh")), (HandSiLU(), nn.SiLU())], ids=["new_gelu", "silu"]
)
def test_activation_written_with_primitives_is_one_activation(hand, composite) -> None:
    """Grouped into one activation, it gets the identity rule, exactly as the composite op does (a
    product rule inside it would halve the relevance)."""
    torch.manual_seed(8)
    a, b = Gated(hand), Gated(composite)
    b.load_state_dict(a.state_dict())
    x = torch.randn(4, 6)
    ra, rb = explain(a, x, target=2), explain(b, x, target=2)
    assert rel_err(ra.output, rb.output) < 1e-12
    assert rel_err(ra.relevance, rb.relevance) < 1e-10
    steps = [s for s in lrpc.compile(a, backend="eager").plan(x).steps if s.family == "pass"]
    assert len(steps) == 1 and steps[0].op.startswith("activation(") and steps[0].rule == lrpc.rules.Pass()


def test_a_gate_of_two_tensors_is_not_an_activation() -> None:
    """silu(g) * u multiplies two different activations: the product rule applies, not the identity."""

    class SwiGLU(nn.Module):
        def __init__(self):
            super().__init__()
            self.g, self.u, self.out = nn.Linear(6, 8), nn.Linear(6, 8), nn.Linear(8, 2)

        def forward(self, x):
            return self.out(F.silu(self.g(x)) * self.u(x))

    plan = lrpc.compile(SwiGLU().eval(), backend="eager").plan(torch.randn(2, 6))
    assert any(s.family == "product" for s in plan.steps)
    assert not any(s.op.startswith("activation(") for s in plan.steps)


def test_instance_norm_holds_its_statistics_constant() -> None:
    """InstanceNorm exports as a batch norm on a (1, N*C, ...) view with the batch's own statistics:
    each (sample, channel) plane is centred and scaled by its frozen rstd, then epsilon (here LRP-0)."""
    torch.manual_seed(10)
    norm = nn.InstanceNorm2d(3, affine=True)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.3, 0.3)
    x = torch.randn(2, 3, 4, 4)
    seed = torch.randn(2, 3, 4, 4)
    res = explain(nn.Sequential(norm), x, rules="lrp0", target=lambda out: seed)
    y = norm(x)
    rstd = 1 / torch.sqrt(x.var((2, 3), unbiased=False, keepdim=True) + norm.eps)
    gw = seed / y * norm.weight[None, :, None, None] * rstd  # the VJP of (x - mean) * rstd * w, rstd constant
    expected = x * (gw - gw.mean((2, 3), keepdim=True))
    assert rel_err(res.relevance, expected) < 1e-9
