"""lrpc's parameter rules and Zennit presets against Zennit itself (a test dependency), on the same model,
the same weights and the same seed convention (``seed="one"``, Zennit's ``attr_output`` one-hot), plus
the written equations and composite overrides. Float64 throughout."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torchvision
from torch import nn

import lrpc
from lrpc.rules import AlphaBeta, Epsilon, Flat, Gamma, WSquare, ZBox, ZPlus

zennit = pytest.importorskip("zennit")
from zennit import rules as zrules
from zennit.canonizers import SequentialMergeBatchNorm
from zennit.composites import EpsilonAlpha2Beta1, EpsilonGammaBox, EpsilonPlusFlat
from zennit.torchvision import ResNetCanonizer

D = torch.float64


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert b.abs().max() > 0, "reference is all zero: the test would be vacuous"
    return float((a - b).abs().max() / b.abs().max())


def randomize_batch_norm(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(3)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.bias.shape, generator=g) * 0.4 - 0.2)
                m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) * 0.6 - 0.3)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model.eval()


def zennit_relevance(model: nn.Module, composite, x: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
    x = x.clone().requires_grad_()
    with composite.context(model) as hooked:
        (grad,) = torch.autograd.grad(hooked(x), x, seed)
    return grad


# --- single layers: every parameter rule against Zennit's hook --------------------------------------
RULE_PAIRS = [
    (ZPlus(), zrules.ZPlus()),
    (Gamma(0.25), zrules.Gamma(0.25)),
    (Gamma(1.0), zrules.Gamma(1.0)),
    (AlphaBeta(2.0, 1.0), zrules.AlphaBeta(2.0, 1.0)),
    (AlphaBeta(1.0, 0.0), zrules.AlphaBeta(1.0, 0.0)),
    (Flat(), zrules.Flat()),
    (WSquare(), zrules.WSquare()),
    (ZBox(-1.0, 2.0), zrules.ZBox(-1.0, 2.0)),
    (Epsilon(0.1), zrules.Epsilon(0.1)),
]


def _layers():
    torch.manual_seed(0)
    yield "linear", nn.Linear(6, 4).to(D), torch.randn(3, 6, dtype=D)
    yield "conv2d", nn.Conv2d(3, 4, 3, padding=1, stride=2).to(D), torch.randn(2, 3, 7, 7, dtype=D)
    yield "conv1d", nn.Conv1d(2, 3, 3, bias=False).to(D), torch.randn(2, 2, 9, dtype=D)
    yield "conv_transpose2d", nn.ConvTranspose2d(3, 2, 3, stride=2).to(D), torch.randn(2, 3, 4, 4, dtype=D)


@pytest.mark.parametrize("ours,theirs", RULE_PAIRS, ids=lambda r: getattr(r, "name", type(r).__name__))
def test_parameter_rule_equals_zennit_on_single_layers(ours, theirs) -> None:
    for name, layer, x in _layers():
        seed = torch.randn_like(layer(x))
        model = nn.Sequential(layer).eval()
        res = lrpc.compile(model, rules=lrpc.composite("epsilon", {nn.Module: ours}), backend="eager")(
            x, target=lambda out, seed=seed: seed
        )
        x_ = x.clone().requires_grad_()
        handle = theirs.register(layer)
        try:
            (expected,) = torch.autograd.grad(layer(x_), x_, seed)
        finally:
            handle.remove()
        assert rel_err(res.relevance, expected) < 1e-10, name


def test_zplus_and_flat_by_hand() -> None:
    """The written equations on a 2-input, 1-output layer, worked out by hand."""
    layer = nn.Linear(2, 1).to(D)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[2.0, -1.0]]))
        layer.bias.copy_(torch.tensor([0.5]))
    x = torch.tensor([[1.0, 3.0]], dtype=D)
    seed = torch.tensor([[4.0]], dtype=D)
    run = lambda rule: lrpc.compile(
        nn.Sequential(layer).eval(), rules=lrpc.composite("epsilon", {nn.Linear: rule}), backend="eager"
    )(x, target=lambda out: seed).relevance
    # z+: x+ = [1, 3], W+ = [2, 0], b+ = 0.5 -> z+ = 2.5; R = x+ W+ R / z+ = [2*4/2.5, 0]
    assert torch.allclose(run(ZPlus(stabilizer=0.0)), torch.tensor([[3.2, 0.0]], dtype=D))
    # flat: every input counts 1 -> z = 2, R = [4/2, 4/2]
    assert torch.allclose(run(Flat(stabilizer=0.0)), torch.tensor([[2.0, 2.0]], dtype=D))
    # w^2: W^2 = [4, 1], b^2 = 0.25, z = 5.25 -> R = [4*4/5.25, 1*4/5.25]
    assert torch.allclose(run(WSquare(stabilizer=0.0)), torch.tensor([[16 / 5.25, 4 / 5.25]], dtype=D))


# --- whole networks: the presets against Zennit's composites -----------------------------------------
def vgg_bn() -> nn.Module:
    torch.manual_seed(1)
    return randomize_batch_norm(
        nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
            nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 5),
        ).to(D)
    )


def resnet18() -> nn.Module:
    torch.manual_seed(2)
    return randomize_batch_norm(torchvision.models.resnet18(num_classes=5).to(D))


PRESETS = [
    ("epsilon-plus-flat", lambda: EpsilonPlusFlat()),
    (lambda: lrpc.presets.epsilon_gamma_box(low=-3.0, high=3.0), lambda: EpsilonGammaBox(low=-3.0, high=3.0)),
    ("epsilon-alpha2-beta1", lambda: EpsilonAlpha2Beta1()),
]


@pytest.mark.parametrize("preset,composite", PRESETS, ids=["epsilon-plus-flat", "epsilon-gamma-box", "epsilon-alpha2-beta1"])
@pytest.mark.parametrize(
    "build,canonizer,shape",
    [(vgg_bn, SequentialMergeBatchNorm, (4, 3, 16, 16)), (resnet18, ResNetCanonizer, (3, 3, 32, 32))],
    ids=["vgg-bn", "resnet18"],
)
def test_preset_equals_zennit_composite(preset, composite, build, canonizer, shape) -> None:
    """Zennit's canonizer changes the function slightly (a merged batch norm computes x/sqrt(1+eps)),
    so both run on the same canonized copy; lrpc folds that batch norm again itself."""
    model = copy.deepcopy(build())
    canonizer().apply(model)
    x = torch.randn(*shape, dtype=D, generator=torch.Generator().manual_seed(4))
    target = torch.tensor([0, 3, 1, 4][: shape[0]])
    rules = preset() if callable(preset) else preset
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = lrpc.compile(model, rules=rules, backend="eager")(x, target=target, seed="one")
        expected = zennit_relevance(model, composite(), x, nn.functional.one_hot(target, 5).to(D))
    assert rel_err(res.relevance, expected) < 1e-5


@pytest.mark.parametrize(
    "preset,composite",
    [
        (lambda: lrpc.presets.epsilon_plus_flat(eps=0.25), lambda: EpsilonPlusFlat(epsilon=0.25)),
        (
            lambda: lrpc.presets.epsilon_gamma_box(low=-3.0, high=3.0, gamma=0.5, eps=0.25),
            lambda: EpsilonGammaBox(low=-3.0, high=3.0, gamma=0.5, epsilon=0.25),
        ),
        (lambda: lrpc.presets.epsilon_alpha2_beta1(eps=0.25), lambda: EpsilonAlpha2Beta1(epsilon=0.25)),
    ],
    ids=["epsilon-plus-flat", "epsilon-gamma-box", "epsilon-alpha2-beta1"],
)
def test_preset_parameters_equal_zennit_composite_parameters(preset, composite) -> None:
    """The presets' own parameters reach their rules (``epsilon_plus_flat(eps=)`` kept ε = 1e-6 on its dense
    layers: 4.2x off Zennit's ``EpsilonPlusFlat(epsilon=0.25)``)."""
    model = copy.deepcopy(vgg_bn())
    SequentialMergeBatchNorm().apply(model)
    x = torch.randn(4, 3, 16, 16, dtype=D, generator=torch.Generator().manual_seed(4))
    target = torch.tensor([0, 3, 1, 4])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = lrpc.compile(model, rules=preset(), backend="eager")(x, target=target, seed="one")
        expected = zennit_relevance(model, composite(), x, nn.functional.one_hot(target, 5).to(D))
    assert rel_err(res.relevance, expected) < 1e-5


@pytest.mark.parametrize("backend", ["eager", "interpret"])
@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular", "zeros"])
def test_per_pixel_box_bounds_are_padded_as_the_input_is(mode: str, backend: str) -> None:
    """A first convolution with ``padding_mode`` other than zeros pads its input itself (index and slice ops in
    the trace): per-pixel bounds go through the same ops, as Zennit pads them. They failed in an ``expand``."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, padding_mode=mode), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(256, 3),
    ).to(D).eval()
    g = torch.Generator().manual_seed(5)
    x = torch.rand(2, 3, 8, 8, dtype=D, generator=g)
    low, high = -torch.rand(3, 8, 8, dtype=D, generator=g), 1 + torch.rand(3, 8, 8, dtype=D, generator=g)
    target = torch.tensor([0, 2])
    rules = lrpc.presets.epsilon_gamma_box(low=low, high=high)
    res = lrpc.compile(model, rules=rules, backend=backend)(x, target=target, seed="one")
    composite = EpsilonGammaBox(low=low.expand(2, 3, 8, 8), high=high.expand(2, 3, 8, 8))
    expected = zennit_relevance(model, composite, x, nn.functional.one_hot(target, 3).to(D))
    assert rel_err(res.relevance, expected) < 1e-12


def test_preset_assignment_is_visible_in_the_report() -> None:
    model = vgg_bn()
    x = torch.randn(2, 3, 16, 16, dtype=D)
    attributor = lrpc.compile(model, rules="epsilon-plus-flat", backend="eager")
    attributor(x)
    report = attributor.report()
    conv_rules = report.rules["aten.convolution.default"]
    assert conv_rules == {"Flat(stabilizer=1e-06)": 1, "ZPlus(stabilizer=1e-06)": 1}, conv_rules
    assert "Epsilon(eps=1e-06)" in report.rules["aten.linear.default"]
    steps = {s.node: s for s in attributor.plan(x).steps}
    first = next(s for s in reversed(list(steps.values())) if s.op == "aten.convolution.default")
    assert first.rule == Flat() and first.module == "0"


# --- composites: overrides by path glob and module type, validation --------------------------------
def test_overrides_by_path_and_type() -> None:
    model = vgg_bn()
    x = torch.randn(2, 3, 16, 16, dtype=D)
    rules = lrpc.composite("epsilon", {"4": ZPlus(), nn.Linear: Epsilon(0.5), "*": Gamma(0.1)})
    plan = lrpc.compile(model, rules=rules, backend="eager").plan(x)
    by_module = {s.module: s.rule for s in plan.steps if s.family in ("conv", "linear")}
    assert by_module["4"] == ZPlus()  # path beats the later "*" glob
    assert by_module["0"] == Gamma(0.1)  # "*" glob, only on layers: ReLUs keep Pass
    assert by_module["9"] == Epsilon(0.5) and by_module["12"] == Epsilon(0.5)
    assert {s.rule for s in plan.steps if s.family == "pass"} == {lrpc.rules.Pass()}


def test_changing_rules_recompiles() -> None:
    model = vgg_bn()
    x = torch.randn(2, 3, 16, 16, dtype=D)
    a = lrpc.compile(model, rules="epsilon-plus-flat", backend="eager")(x).relevance
    b = lrpc.compile(model, rules="epsilon-alpha2-beta1", backend="eager")(x).relevance
    assert rel_err(a, b) > 1e-3


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: lrpc.presets.resolve("no-such-preset"), "unknown rules preset 'no-such-preset'"),
        (lambda: Gamma(-0.5), "gamma >= 0"),
        (lambda: AlphaBeta(2.0, 0.5), r"alpha - beta == 1"),
        (lambda: ZBox(low=0.0), "ZBox needs the input bounds"),
        (lambda: lrpc.presets.resolve("epsilon-gamma-box"), "needs the input bounds"),
        (lambda: lrpc.composite("epsilon", {3: ZPlus()}), "module path globs or module types"),
        (lambda: lrpc.composite("epsilon", {"x": "ZPlus"}), "must be an lrpc.rules.Rule"),
        # these raised AttributeError / TypeError from inside lrpc, or were taken (NaN relevance, low > high)
        (lambda: lrpc.composite("epsilon", first="flat"), "first must be an lrpc.rules.Rule"),
        (lambda: lrpc.composite("epsilon", [ZPlus()]), "a mapping .*or pairs"),
        (lambda: Epsilon("1e-3"), "Epsilon: eps must be a number, got '1e-3'"),
        (lambda: Gamma(float("nan")), "gamma must be a number, got nan"),
        (lambda: ZPlus(stabilizer=True), "stabilizer must be a number"),
        (lambda: lrpc.presets.epsilon_gamma_box(low=1.0, high=0.0), "low must be <= high"),
    ],
)
def test_bad_rules_are_clear_errors(make, match: str) -> None:
    with pytest.raises(lrpc.RuleError, match=match):
        make()


def test_overrides_as_pairs_keep_their_order() -> None:
    """``(key, rule)`` pairs work like a dict: the first matching key wins."""
    model = vgg_bn()
    pairs = lrpc.composite("epsilon", [("4", Gamma(0.5)), (nn.Conv2d, ZPlus())])
    steps = {s.module: s.rule for s in lrpc.compile(model, rules=pairs, backend="eager").plan(torch.randn(1, 3, 16, 16, dtype=D)).steps}
    assert steps["0"] == ZPlus() and steps["4"] == Gamma(0.5)


def test_rule_on_the_wrong_op_family_is_an_error() -> None:
    """ZPlus needs a weight: overriding a residual add with it is refused at compile time."""
    model = resnet18()
    rules = lrpc.composite("epsilon", {"layer1.0": ZPlus()})  # layer1.0's convs: fine
    lrpc.compile(model, rules=rules, backend="eager").plan(torch.randn(1, 3, 32, 32, dtype=D))
    lrpc.register_rule(torch.ops.aten.add.Tensor, ZPlus())
    try:
        with pytest.raises(lrpc.RuleError, match=r"ZPlus.*serves.*'sum' op"):
            lrpc.compile(model, backend="eager").plan(torch.randn(1, 3, 32, 32, dtype=D))
    finally:
        lrpc.register_rule(torch.ops.aten.add.Tensor, None)


# --- the written equations, with explicit matrices (independent of Zennit and of lrpc's code) --------
def _stab(z: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return z + eps * torch.where(z >= 0, 1.0, -1.0).to(z.dtype)


def _equation(name: str, x: torch.Tensor, W: torch.Tensor, b: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """R_x for z = x Wᵀ + b, written out with the positive and negative parts of x, W and b."""
    xp, xn, Wp, Wn, bp, bn = x.clamp(min=0), x.clamp(max=0), W.clamp(min=0), W.clamp(max=0), b.clamp(min=0), b.clamp(max=0)
    if name == "gamma":
        g = 0.25
        W1, W2, b1, b2 = W + g * Wp, W + g * Wn, b + g * bp, b + g * bn
        z = x @ W.T + b
        g1 = (z > 0) * R / _stab(xp @ W1.T + b1 + xn @ W2.T)
        g2 = (z < 0) * R / _stab(xp @ W2.T + b2 + xn @ W1.T)
        return xp * (g1 @ W1) + xn * (g1 @ W2) + xp * (g2 @ W2) + xn * (g2 @ W1)
    if name == "alpha_beta":
        gp = R / _stab(xp @ Wp.T + bp + xn @ Wn.T)
        gn = R / _stab(xp @ Wn.T + bn + xn @ Wp.T)
        return 2 * (xp * (gp @ Wp) + xn * (gp @ Wn)) - 1 * (xp * (gn @ Wn) + xn * (gn @ Wp))
    if name == "zbox":
        lo, hi = torch.full_like(x, -1.5), torch.full_like(x, 2.0)
        g = R / _stab(x @ W.T + b - (lo @ Wp.T + bp) - (hi @ Wn.T + bn))
        return x * (g @ W) - lo * (g @ Wp) - hi * (g @ Wn)
    raise ValueError(name)


@pytest.mark.parametrize(
    "name,rule",
    [("gamma", Gamma(0.25)), ("alpha_beta", AlphaBeta(2.0, 1.0)), ("zbox", ZBox(-1.5, 2.0))],
    ids=["gamma", "alpha_beta", "zbox"],
)
def test_parameter_rule_equals_written_equation(name: str, rule) -> None:
    torch.manual_seed(9)
    layer = nn.Linear(7, 5).to(D)
    x = torch.randn(4, 7, dtype=D)
    seed = torch.randn(4, 5, dtype=D)
    res = lrpc.compile(nn.Sequential(layer).eval(), rules=lrpc.composite("epsilon", {nn.Linear: rule}), backend="eager")(
        x, target=lambda out: seed
    )
    expected = _equation(name, x, layer.weight.detach(), layer.bias.detach(), seed)
    assert rel_err(res.relevance, expected) < 1e-10
