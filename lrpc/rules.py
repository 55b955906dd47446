"""LRP rules: small pure functions from forward values and output relevance to input relevances.

A rule sees one forward operation as an :class:`Operation` (the op as a function of its tensor
arguments, their values, its output) and the relevance ``R`` that arrived at the output. It returns
one relevance per tensor argument (``None`` where none flows). Rules are written with ordinary torch
ops: run on real tensors they are the reference; traced by ``make_fx`` they become the relevance
program. Notation: ``x`` the inputs, ``z`` the output, ``J_i`` the Jacobian of ``z`` w.r.t. ``x_i``,
``⊙``/``⊘`` elementwise product/division, ``stab(z) = z + eps * sign(z)`` with ``sign(0) = +1``.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .errors import RuleError

Relevances = tuple[Tensor | None, ...]


def stabilize(z: Tensor, eps: float) -> Tensor:
    """``z + eps * sign(z)`` with ``sign(0) = +1``: moves the denominator away from zero."""
    if eps == 0:
        return z
    # three passes (compare, select, add) where the arithmetic form (z >= 0) * 2 - 1 takes six; the
    # scalars in z's dtype keep a bfloat16 z bfloat16
    return z + torch.where(z >= 0, z.new_full((), eps), z.new_full((), -eps))


def divide(numerator: Tensor, denominator: Tensor, eps: float) -> Tensor:
    """``numerator ⊘ stab(denominator)``; with ``eps == 0``, ``0/0`` (and ``x/0``) are taken as 0."""
    if eps == 0:
        zero = denominator == 0
        return torch.where(zero, 0.0, numerator / torch.where(zero, 1.0, denominator))
    return numerator / stabilize(denominator, eps)


@dataclass(frozen=True)
class Operation:
    """One forward operation as a rule sees it.

    ``fn(*inputs)`` recomputes the op (non-tensor arguments are bound); ``inputs`` are the values of
    its tensor arguments in order; ``output`` is the forward result (a tuple for multi-output ops);
    ``relevant[i]`` says whether input ``i`` can receive relevance (it depends on an explained input
    and the op does not treat it as a constant); ``linear_map``, where the op table provides one, is
    the op with its normalizing statistics frozen, and ``dim`` the dimension an op like softmax works
    along (both supplied by :mod:`lrpc.ops`).
    """

    fn: Callable[..., Any]
    inputs: tuple[Tensor, ...]
    output: Any
    relevant: tuple[bool, ...]
    dim: int | None = None
    linear_map: Callable[[Tensor], Tensor] | None = None
    # per input: "input" (relevant), "weight", "bias", "frozen" (a parameter of the op that is never part
    # of what it sums or multiplies: a sampling grid, a divisor, a mask) or "other"
    roles: tuple[str, ...] = ()
    signs: tuple[int, ...] = ()  # per input: -1 where it enters the output negated (sub's subtrahend)
    nonnegative: tuple[bool, ...] = ()  # per input: >= 0 by construction (a ReLU output): no x⁻ terms
    negative_outputs_dead: bool = False  # R is 0 wherever the output is < 0 (it feeds a ReLU): Gamma's g₂ = 0
    # what kind of product the op is (:data:`PRODUCT_KINDS`), for rules that split products of activations
    product: str | None = None
    # for rules that hold a value per position (ZBox bounds, shaped like one sample of what the layer's module
    # receives): the ops that module applies before the layer (padding), replayed on such a value
    positions: Callable[[Tensor], Tensor] | None = None

    def role(self, name: str) -> Tensor | None:
        """The value of the (first) input with this role, or ``None``."""
        return next((x for x, r in zip(self.inputs, self.roles) if r == name), None)

    def layer(
        self, x: Tensor, weight: Tensor, bias: Tensor | None
    ) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
        """The op evaluated at a modified input, weight and bias (``None`` zeroes the bias), and the
        pullback ``g -> J_xᵀ g`` at those values. What the parameter rules (ZPlus, Gamma, ...) are made of."""
        values = list(self.inputs)
        slot = self.roles.index("input")
        for i, r in enumerate(self.roles):
            if r == "weight":
                values[i] = weight
            elif r == "bias":
                values[i] = torch.zeros_like(values[i]) if bias is None else bias

        def f(t: Tensor) -> Tensor:
            values[slot] = t
            out = self.fn(*values)
            return out[0] if isinstance(out, (tuple, list)) else out

        z, pullback = torch.func.vjp(f, x)
        return z, lambda g: pullback(g)[0]

    def place(self, relevance: Tensor) -> Relevances:
        """Relevance for the op's one relevant input, in argument order."""
        return tuple(relevance if r == "input" else None for r in self.roles)

    @property
    def z(self) -> Tensor:
        """The main (first) output."""
        return self.output[0] if isinstance(self.output, (tuple, list)) else self.output

    def vjp(self, cotangent: Any, inputs: Sequence[Tensor] | None = None) -> Relevances:
        """``J_iᵀ cotangent`` for every relevant input ``i`` (``None`` for the others).

        ``inputs`` replaces the argument values (modified weights, clamped inputs); the Jacobian is taken
        at those values. Integer inputs (token ids routed by views) are differentiated as floats.
        """
        values = list(self.inputs if inputs is None else inputs)
        index = [i for i, r in enumerate(self.relevant) if r]
        dtype = _cotangent_dtype(cotangent)
        primals = [values[i] if values[i].is_floating_point() else values[i].to(dtype) for i in index]
        multi = isinstance(self.output, (tuple, list))
        float_outputs = [i for i, o in enumerate(_as_tuple(self.output)) if _is_float_tensor(o)]

        def fn(*args: Tensor) -> Any:
            full = list(values)
            for i, a in zip(index, args):
                full[i] = a
            out = self.fn(*full)
            if multi:
                return tuple(out[i] for i in float_outputs)
            # token ids moved by a routing op that also converts them (int32 -> int64): route as floats
            return out if out.is_floating_point() else out.to(dtype)

        try:
            _, pullback = torch.func.vjp(fn, *primals)
        except RuntimeError as e:  # torch.library custom ops: their autograd formula is not functorch-aware
            if "functorch transforms" not in str(e):
                raise
            pullback = _autograd_pullback(fn, primals)
        if multi:
            cots = _as_tuple(cotangent)
            outs = _as_tuple(self.output)
            cotangent = tuple(
                cots[i] if i < len(cots) and cots[i] is not None else torch.zeros_like(outs[i])
                for i in float_outputs
            )
        grads = pullback(cotangent)
        result: list[Tensor | None] = [None] * len(values)
        for i, g in zip(index, grads):
            result[i] = g
        return tuple(result)


def _autograd_pullback(fn: Callable[..., Any], primals: Sequence[Tensor]) -> Callable[[Any], tuple]:
    """The pullback of ``fn`` at ``primals`` through ``torch.autograd.grad``, for ops that
    ``torch.func.vjp`` cannot differentiate (custom ops registered with ``torch.library``)."""
    leaves = [p.detach().requires_grad_() for p in primals]
    with torch.enable_grad():
        out = fn(*leaves)

    def pullback(cotangent: Any) -> tuple:
        pairs = [(o, c) for o, c in zip(_as_tuple(out), _as_tuple(cotangent)) if o.requires_grad]
        grads = (
            torch.autograd.grad([o for o, _ in pairs], leaves, [c for _, c in pairs], allow_unused=True)
            if pairs
            else (None,) * len(leaves)
        )
        return tuple(torch.zeros_like(x) if g is None else g for x, g in zip(leaves, grads))

    return pullback


def _as_tuple(value: Any) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def _is_float_tensor(value: Any) -> bool:
    return isinstance(value, Tensor) and value.is_floating_point()


def _cotangent_dtype(cotangent: Any) -> torch.dtype:
    for c in _as_tuple(cotangent):
        if isinstance(c, Tensor):
            return c.dtype
    return torch.get_default_dtype()


def _main(R: Any) -> Tensor:
    """The relevance of the main output of a (possibly multi-output) op."""
    return R[0] if isinstance(R, (tuple, list)) else R


def _times_inputs(op: Operation, grads: Relevances, scale: float = 1.0) -> Relevances:
    """``x_i ⊙ g_i`` per input. Outside layers, 0 where ``g_i`` is: scores at -inf (a mask added before they
    are scaled) that no relevance reaches get none, as at any finite mask value, not ``-inf * 0 = NaN``. A
    layer's inputs are activations: it keeps the plain product, which the fused kernels match."""
    guard = "weight" not in op.roles
    out = []
    for x, g in zip(op.inputs, grads):
        r = None if g is None else (x * g if scale == 1.0 else scale * x * g)
        out.append(torch.where(g == 0, 0.0, r) if guard and r is not None else r)
    return tuple(out)


@dataclass(frozen=True)
class Rule:
    """Base class: a configured LRP rule. Subclasses document their equation.

    ``reads`` names the forward values the rule needs (``"inputs"``, ``"output"``): the planner
    keeps exactly those alive for the relevance pass (the statically resolved "promises").
    """

    reads: ClassVar[frozenset[str]] = frozenset({"inputs", "output"})
    #: Rules that only make sense for ops with a single relevant input (Pass) say so here.
    unary: ClassVar[bool] = False
    #: Op families (:class:`lrpc.ops.Family` values) the rule can serve; ``None``: any.
    serves: ClassVar[frozenset[str] | None] = None
    #: Whether every input's relevance is zero wherever that input is zero (``R_i = x_i ⊙ ...``, or no
    #: relevance at all): planning uses it to prove where relevance vanishes (see Gamma).
    zero_where_input_zero: ClassVar[bool] = False
    #: Whether, on a layer, each output unit's relevance is shared among the inputs by that unit's weights,
    #: bias and output alone: then relevance at one unit equals the rule on the layer cut down to that
    #: unit's row, and codegen explains one class of a large output layer (a language model's vocabulary)
    #: without the full matmul.
    unit_wise: ClassVar[bool] = False

    @property
    def name(self) -> str:
        return repr(self)

    @property
    def holds_positions(self) -> bool:
        """Whether the rule holds a value per position of a sample (ZBox bounds shaped like one): the layer
        it applies to must then see every position, so :mod:`lrpc.narrowing` leaves that layer whole."""
        return False

    def __post_init__(self) -> None:
        """Every parameter annotated ``float`` is a real number (not a string, not NaN)."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type in ("float", float) and (
                isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value)
            ):
                raise RuleError(f"{type(self).__name__}: {f.name} must be a number, got {value!r}")

    def __call__(self, op: Operation, R: Any) -> Relevances:  # pragma: no cover - abstract
        raise NotImplementedError


@dataclass(frozen=True)
class Epsilon(Rule):
    """LRP-epsilon: ``R_i = x_i ⊙ J_iᵀ (R ⊘ stab(z))`` for every relevant input ``x_i``.

    For a layer ``z = W x + b`` this is ``R_x = x ⊙ Wᵀ (R ⊘ stab(z))``; for ``z = a + b`` the signed
    proportional split ``R_a = a ⊘ stab(a + b) ⊙ R``. Constants (biases) absorb their share.
    ``eps = 0`` is LRP-0, which equals gradient x input on ReLU networks.
    """

    unit_wise: ClassVar[bool] = True
    zero_where_input_zero: ClassVar[bool] = True

    eps: float = 1e-6

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.eps < 0:
            raise RuleError(f"Epsilon: eps must be >= 0, got {self.eps}")

    def __call__(self, op: Operation, R: Any) -> Relevances:
        if op.linear_map is not None:  # normalization with frozen statistics
            return _linearized(op, _main(R), self.eps)
        return _times_inputs(op, op.vjp(divide(_main(R), op.z, self.eps)))


@dataclass(frozen=True)
class Norm(Epsilon):
    """Zennit's ``Norm``: the epsilon formula with ``eps`` only a stabilizer, for ops without parameters
    (sums, average pooling): ``R_i = x_i ⊙ J_iᵀ (R ⊘ stab(z))``, the signed proportional split."""


def _linearized(op: Operation, R: Tensor, eps: float) -> Relevances:
    """Epsilon through ``op.linear_map`` (the op with its statistics held constant)."""
    x = op.inputs[0]
    assert op.linear_map is not None
    _, pullback = torch.func.vjp(op.linear_map, x)
    (g,) = pullback(divide(R, op.z, eps))
    return (x * g,) + (None,) * (len(op.inputs) - 1)


def _nonnegative_input(op: Operation) -> bool:
    """Whether the layer's input is >= 0 by construction (planning proved it from the graph)."""
    return any(n for n, role in zip(op.nonnegative, op.roles) if role == "input")


def _parts(op: Operation, rule: Rule) -> tuple[Tensor, Tensor, Tensor | None]:
    """Input, weight and bias of a parameterized linear op (linear, conv, mm with a constant)."""
    if op.roles.count("input") != 1 or op.roles.count("weight") != 1:
        # two constant factors (nn.Bilinear with one input fixed): no single weight to take W⁺ or 1 of
        raise RuleError(f"{rule.name} needs a layer with one relevant input and one weight (roles {op.roles})")
    return op.role("input"), op.role("weight"), op.role("bias")  # type: ignore[return-value]


def _pos(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.clamp(min=0)


def _neg(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.clamp(max=0)


def _gamma(t: Tensor | None, gamma: float, part: Callable[[Tensor | None], Tensor | None]) -> Tensor | None:
    return None if t is None else t + gamma * part(t)  # type: ignore[operator]


#: Families a parameter rule can serve.
LAYERS = frozenset({"linear", "conv", "conv_transpose"})


@dataclass(frozen=True)
class ZPlus(Rule):
    """LRP-z⁺ (Zennit's ``ZPlus``, alpha=1 beta=0 with negative inputs allowed):
    ``R_x = x⁺ ⊙ W⁺ᵀ(R ⊘ s) + x⁻ ⊙ W⁻ᵀ(R ⊘ s)`` with ``s = stab(W⁺x⁺ + b⁺ + W⁻x⁻)``."""

    reads: ClassVar[frozenset[str]] = frozenset({"inputs"})  # z with the rule's own weights
    unit_wise: ClassVar[bool] = True
    zero_where_input_zero: ClassVar[bool] = True

    stabilizer: float = 1e-6
    serves: ClassVar[frozenset[str] | None] = LAYERS

    def __call__(self, op: Operation, R: Any) -> Relevances:
        x, w, b = _parts(op, self)
        if _nonnegative_input(op):  # x⁻ = 0: its terms are exactly zero, skip them
            z, back = op.layer(x, w.clamp(min=0), _pos(b))
            return op.place(x * back(divide(_main(R), z, self.stabilizer)))
        xp, xn = x.clamp(min=0), x.clamp(max=0)
        z1, back1 = op.layer(xp, w.clamp(min=0), _pos(b))
        z2, back2 = op.layer(xn, w.clamp(max=0), None)
        g = divide(_main(R), z1 + z2, self.stabilizer)
        return op.place(xp * back1(g) + xn * back2(g))


@dataclass(frozen=True)
class AlphaBeta(Rule):
    """LRP-αβ (Zennit's ``AlphaBeta``): positive contributions weighted by α, negative by β,
    ``R_x = α (x⁺⊙W⁺ᵀg⁺ + x⁻⊙W⁻ᵀg⁺) − β (x⁺⊙W⁻ᵀg⁻ + x⁻⊙W⁺ᵀg⁻)`` with
    ``g⁺ = R ⊘ stab(W⁺x⁺ + b⁺ + W⁻x⁻)``, ``g⁻ = R ⊘ stab(W⁻x⁺ + b⁻ + W⁺x⁻)``; requires α − β = 1."""

    reads: ClassVar[frozenset[str]] = frozenset({"inputs"})  # z with the rule's own weights
    unit_wise: ClassVar[bool] = True
    zero_where_input_zero: ClassVar[bool] = True

    alpha: float = 2.0
    beta: float = 1.0
    stabilizer: float = 1e-6
    serves: ClassVar[frozenset[str] | None] = LAYERS

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.alpha < 0 or self.beta < 0 or self.alpha - self.beta != 1:
            raise RuleError(
                f"AlphaBeta needs alpha, beta >= 0 and alpha - beta == 1, got {self.alpha}, {self.beta}"
            )

    def __call__(self, op: Operation, R: Any) -> Relevances:
        x, w, b = _parts(op, self)
        wp, wn, r = w.clamp(min=0), w.clamp(max=0), _main(R)
        if _nonnegative_input(op):  # x⁻ = 0: its terms are exactly zero, skip them
            z1, back1 = op.layer(x, wp, _pos(b))
            z3, back3 = op.layer(x, wn, _neg(b))
            positive = x * back1(divide(r, z1, self.stabilizer))
            negative = x * back3(divide(r, z3, self.stabilizer))
            return op.place(self.alpha * positive - self.beta * negative)
        xp, xn = x.clamp(min=0), x.clamp(max=0)
        z1, back1 = op.layer(xp, wp, _pos(b))
        z2, back2 = op.layer(xn, wn, None)
        z3, back3 = op.layer(xp, wn, _neg(b))
        z4, back4 = op.layer(xn, wp, None)
        gp, gn = divide(r, z1 + z2, self.stabilizer), divide(r, z3 + z4, self.stabilizer)
        positive = xp * back1(gp) + xn * back2(gp)
        negative = xp * back3(gn) + xn * back4(gn)
        return op.place(self.alpha * positive - self.beta * negative)


@dataclass(frozen=True)
class Gamma(Rule):
    """Generalized LRP-γ (Zennit's ``Gamma``): positive and negative outputs handled separately,
    ``R_x = x⁺⊙W₁ᵀg₁ + x⁻⊙W₂ᵀg₁ + x⁺⊙W₂ᵀg₂ + x⁻⊙W₁ᵀg₂`` with ``W₁ = W + γW⁺``, ``W₂ = W + γW⁻``,
    ``g₁ = 1[z>0] ⊙ R ⊘ stab(W₁x⁺ + b₁ + W₂x⁻)``, ``g₂ = 1[z<0] ⊙ R ⊘ stab(W₂x⁺ + b₂ + W₁x⁻)``,
    ``b₁ = b + γb⁺``, ``b₂ = b + γb⁻``. Where planning proved ``x ≥ 0`` the ``x⁻`` terms are skipped, and
    where it proved ``R = 0`` at every ``z < 0`` (the layer feeds a ReLU) the ``g₂`` terms: both are exactly
    zero there."""

    unit_wise: ClassVar[bool] = True
    zero_where_input_zero: ClassVar[bool] = True

    gamma: float = 0.25
    stabilizer: float = 1e-6
    serves: ClassVar[frozenset[str] | None] = LAYERS

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.gamma < 0:
            raise RuleError(f"Gamma needs gamma >= 0, got {self.gamma}")

    def __call__(self, op: Operation, R: Any) -> Relevances:
        x, w, b = _parts(op, self)
        w1, w2 = _gamma(w, self.gamma, _pos), _gamma(w, self.gamma, _neg)
        if _nonnegative_input(op):  # x⁻ = 0: its terms are exactly zero, skip them
            z1, back1 = op.layer(x, w1, _gamma(b, self.gamma, _pos))  # type: ignore[arg-type]
            r, z = _main(R), op.z
            g1 = (z > 0).to(r.dtype) * divide(r, z1, self.stabilizer)
            if op.negative_outputs_dead:  # g₂ = 1[z<0] ⊙ R = 0: skip its two products too
                return op.place(x * back1(g1))
            z3, back3 = op.layer(x, w2, _gamma(b, self.gamma, _neg))  # type: ignore[arg-type]
            g2 = (z < 0).to(r.dtype) * divide(r, z3, self.stabilizer)
            return op.place(x * back1(g1) + x * back3(g2))
        xp, xn = x.clamp(min=0), x.clamp(max=0)
        z1, back1 = op.layer(xp, w1, _gamma(b, self.gamma, _pos))  # type: ignore[arg-type]
        z2, back2 = op.layer(xn, w2, None)  # type: ignore[arg-type]
        r, z = _main(R), op.z
        g1 = (z > 0).to(r.dtype) * divide(r, z1 + z2, self.stabilizer)
        if op.negative_outputs_dead:
            return op.place(xp * back1(g1) + xn * back2(g1))
        z3, back3 = op.layer(xp, w2, _gamma(b, self.gamma, _neg))  # type: ignore[arg-type]
        z4, back4 = op.layer(xn, w1, None)  # type: ignore[arg-type]
        g2 = (z < 0).to(r.dtype) * divide(r, z3 + z4, self.stabilizer)
        return op.place(xp * back1(g1) + xn * back2(g1) + xp * back3(g2) + xn * back4(g2))


@dataclass(frozen=True)
class Flat(Rule):
    """LRP-flat (Zennit's ``Flat``): inputs and weights taken as 1, bias 0:
    ``R_x = 1ᵀ(R ⊘ stab(1·1))``: relevance spread uniformly over each receptive field."""

    reads: ClassVar[frozenset[str]] = frozenset({"inputs"})  # x's shape only; z from ones
    stabilizer: float = 1e-6
    unit_wise: ClassVar[bool] = True
    serves: ClassVar[frozenset[str] | None] = LAYERS

    def __call__(self, op: Operation, R: Any) -> Relevances:
        x, w, _ = _parts(op, self)
        z, back = op.layer(torch.ones_like(x), torch.ones_like(w), None)
        return op.place(back(divide(_main(R), z, self.stabilizer)))


@dataclass(frozen=True)
class WSquare(Rule):
    """LRP-w² (Zennit's ``WSquare``): ``R_x = (W²)ᵀ(R ⊘ stab(W²·1 + b²))``."""

    reads: ClassVar[frozenset[str]] = frozenset({"inputs"})  # x's shape only; z from W²
    stabilizer: float = 1e-6
    unit_wise: ClassVar[bool] = True
    serves: ClassVar[frozenset[str] | None] = LAYERS

    def __call__(self, op: Operation, R: Any) -> Relevances:
        x, w, b = _parts(op, self)
        z, back = op.layer(torch.ones_like(x), w * w, None if b is None else b * b)
        return op.place(back(divide(_main(R), z, self.stabilizer)))


@dataclass(frozen=True)
class ZBox(Rule):
    """LRP-z^B (Zennit's ``ZBox``) for inputs bounded by ``low <= x <= high`` (floats or tensors that
    broadcast against one sample, e.g. per channel ``(3, 1, 1)``):
    ``R_x = x⊙Wᵀg − l⊙W⁺ᵀg − h⊙W⁻ᵀg`` with ``g = R ⊘ stab(Wx + b − (W⁺l + b⁺) − (W⁻h + b⁻))``."""

    reads: ClassVar[frozenset[str]] = frozenset({"inputs"})  # z with the rule's own weights and bounds
    low: Any = None
    high: Any = None
    stabilizer: float = 1e-6
    unit_wise: ClassVar[bool] = True
    serves: ClassVar[frozenset[str] | None] = LAYERS

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.low is None or self.high is None:
            raise RuleError("ZBox needs the input bounds: ZBox(low=..., high=...)")
        try:
            inverted = bool((torch.as_tensor(self.low) > torch.as_tensor(self.high)).any())
        except (TypeError, ValueError, RuntimeError) as e:
            raise RuleError(f"ZBox: low and high must be numbers or tensors that broadcast together: {e}") from None
        if inverted:
            raise RuleError("ZBox: low must be <= high everywhere (the input's lower and upper bounds)")

    @property
    def holds_positions(self) -> bool:
        # a scalar or per-feature bound fits any position; anything larger may differ between positions
        return any(torch.as_tensor(v).dim() >= 2 for v in (self.low, self.high))

    @staticmethod
    def _bound(value: Any, x: Tensor, positions: Callable[[Tensor], Tensor] | None) -> Tensor:
        bound = torch.as_tensor(value, dtype=x.dtype, device=x.device)
        try:
            if positions is not None and bound.dim() >= 2:  # per position: padded as the layer's input was
                bound = positions(bound)
            return bound.expand_as(x)
        except RuntimeError:
            raise RuleError(
                f"ZBox: a bound of shape {tuple(bound.shape)} does not fit the layer's input, "
                f"{tuple(x.shape[1:])} per sample: bounds are numbers, per channel (shape (C, 1, 1)), or shaped "
                "like one sample of the model's input"
            ) from None

    def __call__(self, op: Operation, R: Any) -> Relevances:
        x, w, b = _parts(op, self)
        if all(torch.as_tensor(v).numel() == 1 for v in (self.low, self.high)):
            return op.place(self._number_bounds(op, R, x, w))
        low, high = (self._bound(v, x, op.positions) for v in (self.low, self.high))
        z1, back1 = op.layer(x, w, b)
        z2, back2 = op.layer(low, w.clamp(min=0), _pos(b))
        z3, back3 = op.layer(high, w.clamp(max=0), _neg(b))
        g = divide(_main(R), z1 - z2 - z3, self.stabilizer)
        return op.place(x * back1(g) - low * back2(g) - high * back3(g))

    def _number_bounds(self, op: Operation, R: Any, x: Tensor, w: Tensor) -> Tensor:
        """The same for numbers ``l``, ``h``: both bound terms are one layer call on ones, with the weight
        ``W_lh = l W⁺ + h W⁻`` (``l⊙W⁺ᵀg + h⊙W⁻ᵀg = W_lhᵀg``), and the biases cancel in z (``b = b⁺ + b⁻``):
        ``R_x = x⊙Wᵀg − W_lhᵀg`` with ``g = R ⊘ stab(Wx − W_lh 1)``. One convolution and one
        transposed convolution fewer than the general form, and one output-sized value fewer alive."""
        low, high = (torch.as_tensor(v, dtype=w.dtype, device=w.device).reshape(()) for v in (self.low, self.high))
        z, back = op.layer(x, w, None)
        z_box, back_box = op.layer(torch.ones_like(x), low * w.clamp(min=0) + high * w.clamp(max=0), None)
        g = divide(_main(R), z - z_box, self.stabilizer)
        return x * back(g) - back_box(g)


@dataclass(frozen=True)
class Pass(Rule):
    """Identity: ``R_x = R``. For elementwise nonlinearities (ReLU, GELU, SiLU, tanh, ...)."""

    reads: ClassVar[frozenset[str]] = frozenset()
    unary: ClassVar[bool] = True

    def __call__(self, op: Operation, R: Any) -> Relevances:
        return tuple(_main(R) if r else None for r in op.relevant)


@dataclass(frozen=True)
class Route(Rule):
    """Gradient routing: ``R_i = J_iᵀ R``. For ops that only move values (view, permute, slice, cat,
    index, max pooling's winner-take-all, ...): relevance goes exactly where the gradient would."""

    reads: ClassVar[frozenset[str]] = frozenset({"inputs"})

    def __call__(self, op: Operation, R: Any) -> Relevances:
        return op.vjp(R)


@dataclass(frozen=True)
class Gradient(Rule):
    """Gradient x input locally (LRP-0 read through the gradient): ``R_i = x_i ⊙ J_iᵀ (R ⊘ z)``.

    The fallback for ops without a dedicated rule (``on_unsupported="warn"``); exact LRP-0 for ops
    linear in their inputs.
    """

    zero_where_input_zero: ClassVar[bool] = True

    def __call__(self, op: Operation, R: Any) -> Relevances:
        outs = _as_tuple(op.output)
        rel = _as_tuple(R)
        scaled = tuple(None if r is None else divide(r, o, 0.0) for r, o in zip(rel, outs))
        cot = scaled if isinstance(op.output, (tuple, list)) else scaled[0]
        return _times_inputs(op, op.vjp(cot))


@dataclass(frozen=True)
class UniformProduct(Rule):
    """AttnLRP's uniform rule for a product of ``k`` activations (``a * b``, ``A @ B``):
    ``R_i = (1/k) x_i ⊙ J_iᵀ (R ⊘ stab(z))``: each operand gets ``1/k`` of its epsilon share."""

    zero_where_input_zero: ClassVar[bool] = True

    eps: float = 1e-6

    def __call__(self, op: Operation, R: Any) -> Relevances:
        k = sum(op.relevant)
        return _times_inputs(op, op.vjp(divide(_main(R), op.z, self.eps)), 1.0 / max(k, 1))


@dataclass(frozen=True)
class AbsProportional(Rule):
    """DynamicLRP's split for additive ops: each input gets its share by absolute contribution,
    ``R_i = |x_i| ⊙ |J_i|ᵀ (R ⊘ stab(Σ_j |J_j| |x_j|))``: for ``a + b`` (or ``a - b``),
    ``R_a = |a| / (|a| + |b|) ⊙ R``; for ``sum(x)``, ``R_i = |x_i| / Σ|x| ⊙ R``. Constants absorb their share."""

    reads: ClassVar[frozenset[str]] = frozenset({"inputs"})  # the total from |x|
    eps: float = 1e-11
    serves: ClassVar[frozenset[str] | None] = frozenset({"sum", "scale"})

    def __call__(self, op: Operation, R: Any) -> Relevances:
        signs = op.signs or (1,) * len(op.inputs)
        roles = op.roles or ("other",) * len(op.inputs)
        magnitudes = tuple(
            x.abs() * s if x.is_floating_point() and role != "frozen" else x
            for x, s, role in zip(op.inputs, signs, roles)
        )
        out = op.fn(*magnitudes)
        total = out[0] if isinstance(out, (tuple, list)) else out
        grads = op.vjp(divide(_main(R), total, self.eps), inputs=magnitudes)
        return tuple(None if g is None else m * g for m, g in zip(magnitudes, grads))


#: ``Operation.product`` of the ops that multiply: ``a * b``; ``A @ B`` (``mm``, ``bmm``, ``addmm``,
#: ``baddbmm``: ``[..., i, k] @ [..., k, j]``); ``linear(x, W) = x @ Wᵀ``.
PRODUCT_KINDS = ("elementwise", "matmul", "linear")


@dataclass(frozen=True)
class ProportionalProduct(Rule):
    """DynamicLRP's split for a product of two activations: each product term ``a·b`` first gets its
    epsilon share of ``R``, which is then split between its factors by magnitude, ``|a| / (|a| + |b|)``.
    For ``a * b`` elementwise that is ``R_a = |a| / (|a| + |b|) ⊙ R``; for ``A @ B`` the terms
    ``A_ik B_kj`` are formed explicitly (memory ``i·k·j`` per batch)."""

    eps: float = 1e-11
    serves: ClassVar[frozenset[str] | None] = frozenset({"product"})

    def __call__(self, op: Operation, R: Any) -> Relevances:
        index = [i for i, r in enumerate(op.relevant) if r]
        if len(index) != 2:
            raise RuleError(f"{self.name} splits products of two activations, got {len(index)}")
        a, b = (op.inputs[i] for i in index)
        r = _main(R)
        # by the op, not by shapes: a matrix product of square operands has the shapes of an elementwise one
        if op.product == "elementwise":
            share = divide(r, op.z, self.eps) * op.z
            total = a.abs() + b.abs()
            ra = _reduce_to(divide(share * a.abs(), total, self.eps), a.shape)
            rb = _reduce_to(divide(share * b.abs(), total, self.eps), b.shape)
        elif op.product in ("matmul", "linear"):  # terms t[..., i, k, j] = A[..., i, k] B[..., k, j]
            B = b.mT if op.product == "linear" else b
            g = divide(r, op.z, self.eps).unsqueeze(-2)  # [..., i, 1, j]
            A3, B3 = a.unsqueeze(-1), B.unsqueeze(-3)  # [..., i, k, 1], [..., 1, k, j]
            term = A3 * B3 * g
            frac = divide(A3.abs(), A3.abs() + B3.abs(), self.eps)
            ra = _reduce_to((term * frac).sum(-1), a.shape)
            rb = (term * (1 - frac)).sum(-3)  # shaped like B
            rb = _reduce_to(rb.mT if op.product == "linear" else rb, b.shape)
        else:
            raise RuleError(
                f"{self.name} splits elementwise and matrix products of two activations, and this op is neither "
                f"(product kind {op.product!r}; nn.Bilinear's x1ᵀ W x2 is such an op). Give it "
                "another rule, e.g. lrpc.composite(preset, {nn.Bilinear: lrpc.rules.UniformProduct()}), or, "
                "for an op registered with lrpc.ops.register_op, say how it multiplies its factors with "
                f"OpSpec(..., product=...), one of {PRODUCT_KINDS}"
            )
        out: list[Tensor | None] = [None] * len(op.inputs)
        out[index[0]], out[index[1]] = ra, rb
        return tuple(out)


def _reduce_to(t: Tensor, shape: torch.Size) -> Tensor:
    """Sum a broadcast result back to an operand's shape."""
    while t.dim() > len(shape):
        t = t.sum(0)
    # no guard on the sizes: they may be data-dependent (the tokens an MoE router sends to an expert)
    dims = [
        d for d, (have, want) in enumerate(zip(t.shape, shape))
        if statically_known_true(want == 1) and not statically_known_true(have == 1)
    ]
    return t.sum(dims, keepdim=True) if dims else t


@dataclass(frozen=True)
class Softmax(Rule):
    """AttnLRP's softmax rule: ``R_x = x ⊙ (R - s ⊙ Σ R)`` with ``s`` the softmax output and the sum
    over the softmax dimension. Positions with ``s == 0`` (masked, ``x = -inf``) get no relevance."""

    def __call__(self, op: Operation, R: Any) -> Relevances:
        x, s, r = op.inputs[0], op.z, _main(R)
        out = x * (r - s * r.sum(op.dim, keepdim=True))
        return (torch.where(s == 0, 0.0, out),) + (None,) * (len(op.inputs) - 1)


@dataclass(frozen=True)
class Embedding(Rule):
    """Token relevance: the relevance at the embedding output summed over the hidden dimension
    ``R_token = Σ_h R[..., h]``, given to the integer indices; the table gets none."""

    reads: ClassVar[frozenset[str]] = frozenset()

    def __call__(self, op: Operation, R: Any) -> Relevances:
        # aten.embedding(weight, indices, ...): the indices are the second tensor argument.
        return (None, _main(R).sum(-1)) + (None,) * (len(op.inputs) - 2)


@dataclass(frozen=True)
class Stop(Rule):
    """No relevance flows to any input (the op absorbs it)."""

    zero_where_input_zero: ClassVar[bool] = True

    reads: ClassVar[frozenset[str]] = frozenset()

    def __call__(self, op: Operation, R: Any) -> Relevances:
        return (None,) * len(op.inputs)


__all__ = [
    "Operation",
    "Rule",
    "Epsilon",
    "Norm",
    "Pass",
    "Route",
    "Gradient",
    "UniformProduct",
    "ZPlus",
    "AlphaBeta",
    "Gamma",
    "Flat",
    "WSquare",
    "ZBox",
    "AbsProportional",
    "ProportionalProduct",
    "Softmax",
    "Embedding",
    "Stop",
    "stabilize",
    "divide",
]
