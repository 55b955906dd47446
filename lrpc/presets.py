"""Presets: which rule each op family gets. A preset is a name plus a table ``Family -> Rule``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from .errors import RuleError
from .ops import Family
from .rules import Embedding, Epsilon, Gradient, Pass, Route, Rule, Softmax, UniformProduct


@dataclass(frozen=True)
class Preset:
    """A named assignment of rules to op families.

    >>> from lrpc.presets import epsilon
    >>> epsilon(eps=0.0).rule_for(Family.LINEAR)
    Epsilon(eps=0.0)
    """

    name: str
    rules: Mapping[Family, Rule] = field(hash=False)

    def rule_for(self, family: Family) -> Rule:
        try:
            return self.rules[family]
        except KeyError:
            raise RuleError(f"preset '{self.name}' has no rule for op family '{family.value}'") from None

    @property
    def key(self) -> tuple:
        """What identifies the preset in the compile cache."""
        return (self.name, tuple(sorted((f.value, repr(r)) for f, r in self.rules.items())))

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


PRESETS = {"epsilon": epsilon, "lrp0": lambda: epsilon(0.0)}


def resolve(rules: str | Preset) -> Preset:
    """Turn the ``rules=`` argument of :func:`lrpc.compile` into a :class:`Preset`."""
    if isinstance(rules, Preset):
        return rules
    if isinstance(rules, str):
        if rules not in PRESETS:
            raise RuleError(f"unknown rules preset '{rules}'; known presets: {', '.join(sorted(PRESETS))}")
        return PRESETS[rules]()
    raise RuleError(f"rules must be a preset name or an lrpc.presets.Preset, got {type(rules).__name__}")
