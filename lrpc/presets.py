"""Presets: which rule each op family gets, which rule the first layer gets, and per-module overrides.

A :class:`Preset` is plain data: a name, a table ``Family -> Rule``, an optional rule for the first layer
(the first parameterized op reached from the input, found in the graph as Zennit's composites find it
among modules), overrides keyed by module path glob or module type, and the families whose outputs are
treated as constants (CP-LRP: softmax).

============================  =============================================================================
``"epsilon"`` (default)       LRP-ε everywhere linear (layers, sums, pooling, norms with frozen statistics),
                              identity through nonlinearities, gradient routing, AttnLRP's uniform product
                              and softmax rules
``"lrp0"``                    the same with ε = 0 (equals gradient x input on ReLU networks)
``"epsilon-plus-flat"``       Zennit ``EpsilonPlusFlat``: first layer Flat, convolutions z⁺, dense ε
``"epsilon-gamma-box"``       Zennit ``EpsilonGammaBox``: first convolution z^B(low, high), convolutions γ=0.25,
                              dense ε
``"epsilon-alpha2-beta1"``    Zennit ``EpsilonAlpha2Beta1``: convolutions α2β1, dense ε
``"attnlrp"``                 LXT's AttnLRP (efficient mode): LRP-0, identity nonlinearities, uniform
                              products, AttnLRP softmax, norms with frozen statistics
``"cp-lrp"``                  LXT's CP-LRP: AttnLRP with attention weights and activated gates constant
``"dynamiclrp"``              the DynamicLRP paper's rules: |a|/(|a|+|b|) splits, identity norms, ε = 1e-11
============================  =============================================================================

In the Zennit presets, sums and average pooling use Zennit's ``Norm`` (ε-proportional with stabilizer
1e-6), activations and unfolded batch norms ``Pass``, and every op Zennit leaves unhooked follows the
gradient, exactly as Zennit does; op families Zennit has no rule for get the ``"epsilon"`` rules.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from torch import nn

from .errors import RuleError
from .ops import Family
from .rules import (
    AbsProportional,
    AlphaBeta,
    Embedding,
    Epsilon,
    Flat,
    Gamma,
    Gradient,
    Norm,
    Pass,
    ProportionalProduct,
    Route,
    Rule,
    Softmax,
    UniformProduct,
    ZBox,
    ZPlus,
)

#: Families that count as a "layer" for first-layer rules.
LAYER_FAMILIES = frozenset({Family.LINEAR, Family.CONV, Family.CONV_TRANSPOSE})

OverrideKey = str | type


@dataclass(frozen=True)
class Preset:
    """A named assignment of rules to op families, with first-layer rule and overrides.

    >>> from lrpc.presets import epsilon
    >>> epsilon(eps=0.0).rule_for(Family.LINEAR)
    Epsilon(eps=0.0)
    """

    name: str
    rules: Mapping[Family, Rule] = field(hash=False)
    first: Rule | None = None
    first_families: frozenset[Family] = LAYER_FAMILIES
    overrides: tuple[tuple[OverrideKey, Rule], ...] = ()
    constants: frozenset[Family] = frozenset()
    gates_constant: bool = False  # CP-LRP: in act(g) * u, the activated gate is a constant
    fold_batch_norm: bool = True
    seed: str = "logit"  # the seed a call uses unless it asks for another

    def rule_for(self, family: Family) -> Rule:
        try:
            return self.rules[family]
        except KeyError:
            raise RuleError(f"preset '{self.name}' has no rule for op family '{family.value}'") from None

    def override_for(self, family: Family, stack: list[tuple[str, nn.Module | None]]) -> Rule | None:
        """The first override whose key matches a module the node was created in and whose rule can
        serve the node's family. ``stack`` lists ``(path, module)`` from the outermost module inwards."""
        for key, rule in self.overrides:
            if rule.serves is not None and family.value not in rule.serves:
                continue
            for path, module in reversed(stack):
                if isinstance(key, str) and fnmatch.fnmatchcase(path, key):
                    return rule
                if isinstance(key, type) and module is not None and isinstance(module, key):
                    return rule
        return None

    @property
    def holds_positions(self) -> bool:
        """Whether one of its rules holds values per position of a sample (:attr:`Rule.holds_positions`)."""
        rules = [self.first, *self.rules.values(), *(rule for _, rule in self.overrides)]
        return any(rule is not None and rule.holds_positions for rule in rules)

    @property
    def key(self) -> tuple:
        """What identifies the preset in the compile cache."""
        return (
            self.name,
            tuple(sorted((f.value, repr(r)) for f, r in self.rules.items())),
            repr(self.first),
            tuple(sorted(f.value for f in self.first_families)),
            tuple((repr(k), repr(r)) for k, r in self.overrides),
            tuple(sorted(f.value for f in self.constants)),
            self.gates_constant,
            self.fold_batch_norm,
            self.seed,
        )

    def __hash__(self) -> int:
        return hash(self.key)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Preset) and self.key == other.key


def epsilon(eps: float = 1e-6) -> Preset:
    """LRP-epsilon everywhere linear (layers, sums, pooling, norms with frozen statistics), identity
    through elementwise nonlinearities, gradient routing through data movement, AttnLRP's uniform
    product and softmax rules for products of activations and softmax. ``eps=0`` is LRP-0: on ReLU
    networks it equals gradient x input."""
    linear = Epsilon(eps)
    return Preset(
        "epsilon" if eps == 1e-6 else f"epsilon(eps={eps:g})",
        {
            Family.ROUTE: Route(),
            Family.PASS: Pass(),
            Family.LINEAR: linear,
            Family.CONV: linear,
            Family.CONV_TRANSPOSE: linear,
            Family.SCALE: linear,
            Family.SUM: linear,
            Family.AVGPOOL: linear,
            Family.PRODUCT: UniformProduct(eps),
            Family.SOFTMAX: Softmax(),
            Family.NORM: linear,
            Family.BATCHNORM: linear,
            Family.EMBEDDING: Embedding(),
            Family.GRADIENT: Gradient(),
        },
    )


def _zennit(name: str, conv: Rule, *, first: Rule | None = None, first_families=LAYER_FAMILIES, eps: float = 1e-6) -> Preset:
    """A Zennit ``LayerMapComposite``: its ``layer_map_base`` plus a convolution and a dense rule."""
    norm = Norm(1e-6)
    rules = dict(epsilon().rules)
    rules.update(
        {
            Family.PASS: Pass(),
            Family.SUM: norm,
            Family.AVGPOOL: norm,
            Family.BATCHNORM: Pass(),
            Family.CONV: conv,
            Family.CONV_TRANSPOSE: conv,
            Family.LINEAR: Epsilon(eps),
        }
    )
    return Preset(name, rules, first=first, first_families=first_families)


def epsilon_plus_flat(eps: float = 1e-6) -> Preset:
    """Zennit's ``EpsilonPlusFlat``: Flat on the first layer, z⁺ on convolutions, ε on dense layers."""
    return _zennit("epsilon-plus-flat", ZPlus(), first=Flat(), eps=eps)


def epsilon_gamma_box(low: Any = None, high: Any = None, gamma: float = 0.25, eps: float = 1e-6) -> Preset:
    """Zennit's ``EpsilonGammaBox``: z^B(low, high) on the first convolution, γ on convolutions, ε on dense
    layers. ``low`` and ``high`` bound the input (floats, or tensors broadcasting against one sample)."""
    if low is None or high is None:
        raise RuleError("epsilon-gamma-box needs the input bounds: lrpc.presets.epsilon_gamma_box(low=..., high=...)")
    conv = frozenset({Family.CONV, Family.CONV_TRANSPOSE})
    return _zennit("epsilon-gamma-box", Gamma(gamma), first=ZBox(low, high), first_families=conv, eps=eps)


def epsilon_alpha2_beta1(eps: float = 1e-6) -> Preset:
    """Zennit's ``EpsilonAlpha2Beta1``: α2β1 on convolutions, ε on dense layers."""
    return _zennit("epsilon-alpha2-beta1", AlphaBeta(2.0, 1.0), eps=eps)


def attnlrp() -> Preset:
    """AttnLRP as LXT implements it (``lxt.efficient``, the gradient x input framework): LRP-0 through
    every linear op (layers, sums, norms with frozen statistics), identity through elementwise
    nonlinearities, the uniform rule (each operand half) for products of activations, AttnLRP's softmax
    rule. Equal to ``epsilon(0)``; named for the reference it reproduces."""
    return replace(epsilon(0.0), name="attnlrp")


def cp_lrp() -> Preset:
    """CP-LRP as LXT implements it: AttnLRP, but the attention weights (softmax outputs) and activated
    gates (``act(g)`` in ``act(g) * u``) are constants, so relevance flows only through the value path
    and the gated branch."""
    return replace(attnlrp(), name="cp-lrp", constants=frozenset({Family.SOFTMAX}), gates_constant=True)


def dynamiclrp() -> Preset:
    """The DynamicLRP paper's rule set: ε = 1e-11 (with sign) on layers, sums and reductions split by
    absolute contribution ``|a| / (|a| + |b|)``, products split by magnitude, layer and batch norm as
    identity (batch norm is not folded), average pooling split uniformly over each window, max pooling
    winner takes all, seed 1.0 at the target. Scaling by a constant gives all relevance to the
    activation; softmax uses AttnLRP's rule (the paper does not specify these two)."""
    eps = 1e-11
    rules = dict(epsilon(eps).rules)
    rules.update(
        {
            Family.SUM: AbsProportional(eps),
            Family.AVGPOOL: Route(),
            Family.PRODUCT: ProportionalProduct(eps),
            Family.NORM: Pass(),
            Family.BATCHNORM: Pass(),
        }
    )
    return Preset("dynamiclrp", rules, fold_batch_norm=False, seed="one")


PRESETS = {
    "epsilon": epsilon,
    "lrp0": lambda: epsilon(0.0),
    "attnlrp": attnlrp,
    "cp-lrp": cp_lrp,
    "dynamiclrp": dynamiclrp,
    "epsilon-plus-flat": epsilon_plus_flat,
    "epsilon-gamma-box": epsilon_gamma_box,
    "epsilon-alpha2-beta1": epsilon_alpha2_beta1,
}


def composite(
    preset: str | Preset = "epsilon",
    overrides: Mapping[OverrideKey, Rule] | Iterable[tuple[OverrideKey, Rule]] | None = None,
    *,
    first: Rule | None = None,
    gates_constant: bool | None = None,
) -> Preset:
    """A preset plus overrides keyed by module path glob (``"features.0"``, ``"*.attn.*"``) or module type
    (``nn.Linear``), as a dict or as ``(key, rule)`` pairs. An override applies to the ops created inside
    matching modules that its rule can serve (a ``ZPlus`` override on ``"features"`` changes the convolutions
    there, not the ReLUs); the first matching key wins, in the order given. ``first`` replaces the preset's first-layer rule.
    ``gates_constant=True`` holds activated gates constant (``x * sigmoid(g)``: all relevance stays with
    ``x``), as CP-LRP does: for squeeze-excitation CNNs, where the uniform split sends half of it into the
    gate and the stabilizer amplifies it at the gate's near-zero pre-activation.

    >>> import torch.nn as nn, lrpc
    >>> rules = lrpc.composite("epsilon-plus-flat", {nn.Linear: lrpc.rules.Epsilon(1e-3)})
    >>> rules.name
    'epsilon-plus-flat+overrides'
    """
    base = resolve(preset)
    try:  # a mapping, or (key, rule) pairs: both keep the order given
        items = tuple(overrides.items() if isinstance(overrides, Mapping) else overrides or ())
        items = tuple((key, rule) for key, rule in items)
    except (TypeError, ValueError):
        raise RuleError(
            f"overrides are a mapping (or pairs) of module path glob or module type -> rule, got {overrides!r}"
        ) from None
    if first is not None and not isinstance(first, Rule):
        raise RuleError(f"first must be an lrpc.rules.Rule (e.g. lrpc.rules.Flat()), got {first!r}")
    for key, rule in items:
        if not isinstance(key, (str, type)):
            raise RuleError(f"override keys are module path globs or module types, got {key!r}")
        if not isinstance(rule, Rule):
            raise RuleError(f"override for {key!r} must be an lrpc.rules.Rule, got {type(rule).__name__}")
    gates = base.gates_constant if gates_constant is None else gates_constant
    name = base.name + ("+overrides" if items else "") + ("+gates-constant" if gates and not base.gates_constant else "")
    return replace(base, name=name, overrides=items + base.overrides, first=first or base.first, gates_constant=gates)


def resolve(rules: str | Preset) -> Preset:
    """Turn the ``rules=`` argument of :func:`lrpc.compile` into a :class:`Preset`."""
    if isinstance(rules, Preset):
        return rules
    if isinstance(rules, str):
        if rules not in PRESETS:
            raise RuleError(f"unknown rules preset '{rules}'; known presets: {', '.join(sorted(PRESETS))}")
        return PRESETS[rules]()
    raise RuleError(f"rules must be a preset name or an lrpc.presets.Preset, got {type(rules).__name__}")
