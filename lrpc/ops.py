"""The op table: for every aten op lrpc knows, which family of LRP rule applies and what its arguments
mean. Adding an op is one :func:`register_op` call; a preset (:mod:`lrpc.presets`) then maps each
family to a rule.

Argument roles are given by the op schema's argument names, so one entry serves every call form:

* ``frozen``: tensor arguments that never receive relevance (a divisor, a mask, indices);
* ``factors``: for multilinear ops (``mul``, ``mm``, ``linear``, ``convolution``), the arguments the
  output is linear in. One relevant factor makes the op a linear layer (its family ``family``); two or
  more make it a product of activations (family ``product``).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from enum import Enum
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .rules import Rule

aten = torch.ops.aten


class Family(str, Enum):
    """What kind of operation a node is, as far as choosing an LRP rule goes."""

    ROUTE = "route"  # moves values around (view, slice, cat, index, max pooling): follow the gradient
    PASS = "pass"  # elementwise nonlinearity: relevance passes unchanged
    LINEAR = "linear"  # dense layer: linear, addmm, mm / bmm with one activation operand
    CONV = "conv"  # convolution
    CONV_TRANSPOSE = "conv_transpose"
    SCALE = "scale"  # elementwise product with / division by a constant
    SUM = "sum"  # add / sub of activations or constants, sum / mean reductions
    AVGPOOL = "avgpool"  # average pooling and linear interpolation
    PRODUCT = "product"  # product of activations (gating, Q K^T, A V)
    SOFTMAX = "softmax"
    NORM = "norm"  # layer / RMS / group norm: linear once the statistics are frozen
    BATCHNORM = "batchnorm"  # eval-mode batch norm that could not be folded: an affine map
    EMBEDDING = "embedding"
    GRADIENT = "gradient"  # nonlinear ops with no rule of their own: gradient x input locally
    CUSTOM = "custom"  # ops covered by a user rule (lrpc.register_rule)


@dataclass(frozen=True)
class OpSpec:
    """How lrpc reads one aten op. See the module docstring for ``frozen`` and ``factors``.

    ``dim(args)`` returns the dimension an op works along (softmax); ``linearize(args, output)``
    returns the op as a function of its input with normalizing statistics held constant (norms).
    ``args`` maps schema argument names to their values. ``rule``, when set, is used whatever the
    preset says (see :func:`register_rule`). ``impl``, when set, is what rules differentiate instead of
    the op itself: the same function, written so that tracing its VJP keeps dynamic sizes symbolic.
    """

    family: Family
    frozen: frozenset[str] = frozenset()
    factors: frozenset[str] = frozenset()
    bias: frozenset[str] = frozenset()  # additive constant arguments of a layer (what gamma & co. modify)
    negated: frozenset[str] = frozenset()  # arguments that enter the output with a minus sign
    dim: Callable[[Mapping[str, Any]], int] | None = None
    linearize: Callable[[Mapping[str, Any], Any], Callable[[Tensor], Tensor]] | None = None
    rule: Rule | None = None  # a rule of this op's own (lrpc.register_rule), above any preset
    impl: Callable[..., Any] | None = None  # same math, written so that its VJP adds no shape guards
    product: str | None = None  # how it multiplies its factors (lrpc.rules.PRODUCT_KINDS), if it does
    # the family of one call from its arguments, where they decide it (a transposed convolution, an
    # index_put that accumulates): ``family`` is then the op's family when nothing is known of the call
    family_of: Callable[[Mapping[str, Any]], Family] | None = None

    def family_for(self, relevant_args: set[str], args: Mapping[str, Any]) -> Family:
        """The family of one call, given which arguments carry relevance."""
        if self.factors and len(self.factors & relevant_args) > 1:
            return Family.PRODUCT
        return self.family_of(args) if self.family_of is not None else self.family


_TABLE: dict[Any, OpSpec] = {}
_USER_RULES: dict[Any, tuple[Rule, frozenset[str]]] = {}  # lrpc.register_rule: op -> (rule, frozen args)
_version = 0  # bumped by every registration: part of the compile cache key


def table_version() -> int:
    """Changes whenever the op table changes, so that programs compiled before are not reused."""
    return _version


def register_op(ops: Any, spec: OpSpec) -> None:
    """Register ``spec`` for ops given as overloads, packets or names (``"view"``, ``"pow.Tensor_Scalar"``).

    Names that this torch version does not have are skipped, so one table serves torch 2.11 onwards. An
    op with ``factors`` that can both carry relevance (a product of activations) says how it multiplies
    them with ``product=`` (``"elementwise"``, ``"matmul"`` or ``"linear"``): the rules that split such
    products (dynamiclrp's) need it, since shapes alone do not tell a square matrix product from an
    elementwise one.
    """
    global _version
    for op in ops if isinstance(ops, (list, tuple)) else [ops]:
        resolved = _resolve(op) if isinstance(op, str) else op
        if resolved is not None:
            _TABLE[resolved] = spec
    _version += 1


def registered_rules() -> list[Rule]:
    """The rules given to ops with :func:`register_rule`."""
    return [rule for rule, _ in _USER_RULES.values()]


def register_rule(op: Any, rule: Rule | None, *, frozen: tuple[str, ...] = ()) -> None:
    """Use ``rule`` at every call of ``op`` (an aten overload, a packet, a name such as ``"tanh"``, a
    custom op), above any preset; ``rule=None`` removes it again (the preset decides, or, for an op lrpc
    does not know, it is unsupported again).

    ``frozen`` names tensor arguments (by schema name) that never receive relevance. For an op lrpc
    already knows, its argument roles are kept and only the rule changes.

    >>> import torch, lrpc
    >>> lrpc.register_rule(torch.ops.aten.tanh.default, lrpc.rules.Gradient())
    >>> lrpc.register_rule(torch.ops.aten.tanh.default, None)  # back to the preset's rule
    """
    from .rules import Rule

    global _version
    if rule is not None and not isinstance(rule, Rule):
        raise TypeError(f"rule must be an lrpc.rules.Rule, got {type(rule).__name__}")
    key = _resolve(op) if isinstance(op, str) else op
    if key is None:
        raise ValueError(f"register_rule: torch.ops.aten has no op named {op!r}")
    if rule is None:
        _USER_RULES.pop(key, None)
    else:
        _USER_RULES[key] = (rule, frozenset(frozen))
    _version += 1


def _resolve(name: str) -> Any:
    packet, _, overload = name.partition(".")
    op = getattr(aten, packet, None)
    return getattr(op, overload, None) if (op is not None and overload) else op


def lookup(target: Any) -> OpSpec | None:
    """The spec of an op overload (falling back to its overload packet), with a user rule applied."""
    packet = target.overloadpacket if isinstance(target, torch._ops.OpOverload) else None
    spec = _TABLE.get(target) or _TABLE.get(packet)
    user = _USER_RULES.get(target) or _USER_RULES.get(packet)
    if user is None:
        return spec
    rule, frozen = user
    if spec is None:
        return OpSpec(Family.CUSTOM, frozen=frozen, rule=rule)
    return replace(spec, rule=rule, frozen=spec.frozen | frozen)


def arg_names(target: Any, n_args: int) -> list[str]:
    """Schema names of the first ``n_args`` positional arguments of an op."""
    schema = getattr(target, "_schema", None)
    if schema is None:
        return [f"arg{i}" for i in range(n_args)]
    names = [a.name for a in schema.arguments]
    return names[:n_args] + [f"arg{i}" for i in range(len(names), n_args)]


# Ops that check or assert and produce nothing the relevance pass needs.
SIDE_EFFECT_OPS = {
    aten._assert_scalar.default,
    aten.sym_constrain_range_for_size.default,
    aten._assert_tensor_metadata.default,
    aten._assert_async.msg,
}
#: Ops whose values do not depend on their tensor arguments' values (only on shapes and dtypes): their
#: outputs are constants, whatever they are computed from.
CONSTANT_OPS = {
    getattr(aten, name).default
    for name in ("full_like", "zeros_like", "ones_like", "empty_like", "rand_like", "randn_like", "new_zeros", "new_ones", "new_full", "new_empty")
    if hasattr(aten, name)
}

def _existing(names: tuple[str, ...]) -> frozenset:
    return frozenset(op for op in (_resolve(n) for n in names) if op is not None)


#: Ops whose output is never negative: a layer reading it has no x⁻ terms (z⁺, αβ and γ skip them).
NONNEGATIVE_OPS = _existing(
    ("relu.default", "sigmoid.default", "_softmax.default", "softmax.int", "exp.default", "abs.default",
     "hardsigmoid.default", "sqrt.default", "rsqrt.default")
)
#: Ops every output element of which is one of the input elements, unchanged: they move or select values.
#: Routed (:class:`lrpc.rules.Route`), an input element's relevance comes from outputs holding its value.
VALUE_MOVING_OPS = _existing(
    ("view.default", "_unsafe_view.default", "reshape.default", "permute.default", "transpose.int", "t.default",
     "clone.default", "contiguous.default", "alias.default", "detach.default", "expand.default",
     "squeeze.dim", "squeeze.dims", "squeeze.default", "unsqueeze.default", "flatten.using_ints",
     "slice.Tensor", "select.int", "cat.default",
     "max_pool1d.default", "max_pool2d.default", "max_pool3d.default",
     "max_pool2d_with_indices.default", "max_pool3d_with_indices.default",
     "adaptive_max_pool1d.default", "adaptive_max_pool2d.default", "adaptive_max_pool3d.default")
)
#: Ops whose output is non-negative when every tensor input is: they move, select, pool or average values.
SIGN_PRESERVING_OPS = VALUE_MOVING_OPS | _existing(
    ("_to_copy.default",
     "avg_pool1d.default", "avg_pool2d.default", "avg_pool3d.default",
     "adaptive_avg_pool1d.default", "adaptive_avg_pool2d.default", "_adaptive_avg_pool2d.default",
     "adaptive_avg_pool3d.default", "_adaptive_avg_pool3d.default", "mean.dim", "sum.dim_IntList")
)

#: ``operator.getitem`` picks one output of a multi-output op; the codegen routes it structurally.
GETITEM = operator.getitem


def _spec(family: Family, **kw: Any) -> OpSpec:
    return OpSpec(family, **{k: frozenset(v) if isinstance(v, (set, tuple, list)) else v for k, v in kw.items()})


# --- routing: relevance follows the gradient --------------------------------------------------------
register_op(
    [
        "view", "_unsafe_view", "reshape", "permute", "transpose", "t", "expand", "slice", "select",
        "unsqueeze", "squeeze", "clone", "alias", "lift_fresh_copy", "_to_copy", "detach", "cat",
        "split", "split_with_sizes", "unbind", "stack", "narrow", "flip", "roll", "repeat",
        "constant_pad_nd", "unfold", "diagonal", "as_strided", "pixel_shuffle", "pixel_unshuffle",
        "channel_shuffle", "movedim", "contiguous", "alias_copy", "view_copy", "permute_copy",
        "expand_copy", "unsqueeze_copy", "squeeze_copy", "slice_copy", "select_copy", "transpose_copy",
        "slice_scatter", "select_scatter", "tile", "chunk", "upsample_nearest1d",
        "upsample_nearest2d", "upsample_nearest3d", "_unsafe_index", "reflection_pad1d",
        "reflection_pad2d", "replication_pad1d", "replication_pad2d", "zero_pad2d",
    ],
    _spec(Family.ROUTE),
)


def _copy(self: Tensor, src: Tensor, non_blocking: bool = False) -> Tensor:
    """``aten.copy`` (an in-place write such as ``out[:, t] = h``, made functional): ``src`` in ``self``'s
    place. Autograd has no derivative for it; this function has the same values and one."""
    return src.to(device=self.device, dtype=self.dtype).expand_as(self)


# the old values are overwritten: none of their relevance survives
register_op("copy", _spec(Family.ROUTE, frozen={"self"}, impl=_copy))
register_op(["index", "_unsafe_index"], _spec(Family.ROUTE, frozen={"indices"}))
register_op(["index_select", "gather"], _spec(Family.ROUTE, frozen={"index"}))
# an index_put that accumulates adds its values in (index_add and F.fold decompose to it): a sum, whose
# routed VJP would hand each value the whole relevance of the element it was added to
register_op(
    ["index_put", "_unsafe_index_put"],
    _spec(Family.ROUTE, frozen={"indices"}, family_of=lambda a: Family.SUM if a.get("accumulate") else Family.ROUTE),
)
register_op(["scatter.src", "scatter.value"], _spec(Family.ROUTE, frozen={"index"}))
_REDUCE_FAMILY = {
    "sum": Family.SUM, "add": Family.SUM, "mean": Family.SUM,
    "amax": Family.ROUTE, "amin": Family.ROUTE,
    "prod": Family.GRADIENT, "multiply": Family.GRADIENT,
}


def _reduce_family(args: Mapping[str, Any]) -> Family:
    return _REDUCE_FAMILY[args["reduce"]]


def _scatter_reduce(self: Tensor, dim: int, index: Tensor, src: Tensor, reduce: str) -> Tensor:
    """``aten.scatter(..., reduce=)``, which autograd cannot differentiate, as the ``scatter_reduce`` it
    equals (``self`` included), which it can."""
    return self.scatter_reduce(dim, index, src, {"add": "sum", "multiply": "prod"}[reduce])


def _scatter_value_reduce(self: Tensor, dim: int, index: Tensor, value: float, reduce: str) -> Tensor:
    """The same with one value scattered everywhere ``index`` points."""
    return _scatter_reduce(self, dim, index, torch.full(index.shape, value, dtype=self.dtype, device=self.device), reduce)


register_op("scatter.reduce", _spec(Family.SUM, frozen={"index"}, family_of=_reduce_family, impl=_scatter_reduce))
register_op(
    "scatter.value_reduce", _spec(Family.SUM, frozen={"index"}, family_of=_reduce_family, impl=_scatter_value_reduce)
)
# sum and mean split relevance over what was reduced; amax / amin route it to the winner
register_op(["scatter_reduce", "index_reduce"], _spec(Family.SUM, frozen={"index"}, family_of=_reduce_family))
register_op(["where"], _spec(Family.ROUTE, frozen={"condition"}))
register_op(["masked_fill"], _spec(Family.ROUTE, frozen={"mask"}))
# Winner-take-all: the gradient of a max goes to the arg max.
register_op(
    [
        "max_pool1d_with_indices", "max_pool2d_with_indices", "max_pool3d_with_indices", "amax", "amin", "max", "min", "maximum",
        "minimum", "topk", "sort", "adaptive_max_pool2d", "adaptive_max_pool1d", "adaptive_max_pool3d", "fmax", "fmin",
        "median", "nanmedian", "kthvalue", "mode", "cummax", "cummin",
    ],
    _spec(Family.ROUTE),
)

# --- elementwise nonlinearities: relevance passes ----------------------------------------------------
register_op(
    [
        "relu", "gelu", "silu", "sigmoid", "tanh", "elu", "leaky_relu", "hardtanh", "hardswish",
        "hardsigmoid", "softplus", "mish", "celu", "selu", "relu6", "exp", "exp2", "log", "log1p",
        "log2", "expm1", "sqrt", "rsqrt", "abs", "clamp", "clamp_min", "clamp_max", "sin", "cos",
        "erf", "erfc", "reciprocal", "sign", "neg", "square", "logit", "softshrink", "hardshrink",
        "tanhshrink", "round", "floor", "ceil", "trunc", "frac", "sgn",
        "atan", "asin", "acos", "sinh", "cosh", "asinh", "acosh", "atanh", "tan", "nan_to_num",
    ],
    _spec(Family.PASS),
)
register_op("pow.Tensor_Scalar", _spec(Family.PASS))
register_op("pow.Scalar", _spec(Family.PASS))
register_op("_prelu_kernel", _spec(Family.PASS, frozen={"weight"}))
register_op("prelu", _spec(Family.PASS, frozen={"weight"}))
# nn.RReLU in eval mode: a leaky ReLU with the mean slope (the noise buffer is only written in training)
register_op(["rrelu_with_noise", "rrelu_with_noise_functional"], _spec(Family.PASS, frozen={"noise"}))

# --- linear layers and products -------------------------------------------------------------------
def _linear(input: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``aten.linear`` as ``reshape + mm``: the VJP of the composite op specializes dynamic sizes."""
    out = torch.mm(input.reshape(-1, input.shape[-1]), weight.t())
    if bias is not None:
        out = out + bias
    return out.view(*input.shape[:-1], weight.shape[0])


register_op(
    "linear", _spec(Family.LINEAR, factors={"input", "weight"}, bias={"bias"}, impl=_linear, product="linear")
)
register_op(["mm", "bmm"], _spec(Family.LINEAR, factors={"self", "mat2"}, product="matmul"))
register_op("addmm", _spec(Family.LINEAR, factors={"mat1", "mat2"}, bias={"self"}, product="matmul"))
register_op("baddbmm", _spec(Family.LINEAR, factors={"batch1", "batch2"}, bias={"self"}, product="matmul"))
# nn.Bilinear, x1ᵀ W x2: a product of its two inputs, or a layer where one of them is a constant
register_op("_trilinear", _spec(Family.LINEAR, factors={"i1", "i2", "i3"}))
register_op(
    "convolution",
    _spec(
        Family.CONV,
        factors={"input", "weight"},
        bias={"bias"},
        family_of=lambda a: Family.CONV_TRANSPOSE if a.get("transposed") else Family.CONV,
    ),
)
register_op("mul", _spec(Family.SCALE, factors={"self", "other"}, product="elementwise"))
# The divisor is treated as a normalizing constant: relevance flows to the numerator only.
register_op("div", _spec(Family.SCALE, frozen={"other"}))

# --- additive ops: the signed proportional (epsilon) split ------------------------------------------
register_op("sub", _spec(Family.SUM, negated={"other"}))
register_op("rsub", _spec(Family.SUM, negated={"self"}))
register_op(
    [
        "add", "sum", "mean", "cumsum", "scatter_add", "index_add",
        "upsample_bilinear2d", "upsample_linear1d", "upsample_trilinear3d", "upsample_bicubic2d",
        "_upsample_bilinear2d_aa", "_upsample_bicubic2d_aa",
        "col2im", "im2col", "trace",
    ],
    _spec(Family.SUM, frozen={"index"}),
)
# sampling at given coordinates (a spatial transformer, an optical-flow warp): linear in the sampled values;
# the coordinates say where to look, like attention weights held constant, and get no relevance
register_op(["grid_sampler_2d", "grid_sampler_3d"], _spec(Family.SUM, frozen={"grid"}))
register_op(
    [
        "avg_pool1d", "avg_pool2d", "avg_pool3d", "_adaptive_avg_pool2d", "_adaptive_avg_pool3d",
        "adaptive_avg_pool1d",
    ],
    _spec(Family.AVGPOOL),
)

# --- nonlinear ops with no dedicated rule: gradient x input locally --------------------------------
register_op(
    [
        "_log_softmax", "glu", "var", "std", "var_mean", "prod", "logsumexp", "linalg_vector_norm",
        "cumprod", "atan2", "pow.Tensor_Tensor", "_cdist_forward", "_pdist_forward", "dist",
    ],
    _spec(Family.GRADIENT),
)

# --- softmax, norms, embeddings ----------------------------------------------------------------
register_op("_softmax", _spec(Family.SOFTMAX, dim=lambda a: a["dim"]))


def _layer_norm_map(args: Mapping[str, Any], output: Any) -> Callable[[Tensor], Tensor]:
    """``(x - mean(x)) * rstd * w`` with ``rstd`` (the op's third output) held constant."""
    dims = tuple(range(-len(args["normalized_shape"]), 0))
    rstd, weight = output[2], args.get("weight")

    def f(x: Tensor) -> Tensor:
        y = (x - x.mean(dims, keepdim=True)) * rstd
        return y if weight is None else y * weight

    return f


def _rms_norm_map(args: Mapping[str, Any], output: Any) -> Callable[[Tensor], Tensor]:
    """``x * rstd * w`` with ``rstd = rsqrt(mean(x^2) + eps)`` computed once and held constant."""
    x0, weight = args["input"], args.get("weight")
    dims = tuple(range(-len(args["normalized_shape"]), 0))
    eps = args.get("eps")
    eps = torch.finfo(x0.dtype).eps if eps is None else eps
    rstd = torch.rsqrt(x0.pow(2).mean(dims, keepdim=True) + eps)

    def f(x: Tensor) -> Tensor:
        y = x * rstd
        return y if weight is None else y * weight

    return f


def _group_norm_map(args: Mapping[str, Any], output: Any) -> Callable[[Tensor], Tensor]:
    """Group norm with its per-group ``rstd`` (third output) held constant."""
    groups, weight = args["group"], args.get("weight")
    rstd = output[2]

    def f(x: Tensor) -> Tensor:
        n, c = x.shape[0], x.shape[1]
        g = x.reshape(n, groups, -1)
        y = ((g - g.mean(-1, keepdim=True)) * rstd.reshape(n, groups, 1)).reshape(x.shape)
        if weight is not None:
            y = y * weight.reshape((1, c) + (1,) * (x.dim() - 2))
        return y

    return f


def _instance_stats_map(args: Mapping[str, Any], output: Any) -> Callable[[Tensor], Tensor]:
    """Batch norm computed with the batch's own statistics (instance norm exports as this on a
    ``(1, N*C, ...)`` view): ``(x - mean_c) * rstd_c * w_c`` with ``rstd`` (third output) constant."""
    rstd, weight = output[2], args.get("weight")

    def f(x: Tensor) -> Tensor:
        dims = [0] + list(range(2, x.dim()))
        shape = (1, -1) + (1,) * (x.dim() - 2)
        y = (x - x.mean(dims, keepdim=True)) * rstd.reshape(shape)
        return y if weight is None else y * weight.reshape(shape)

    return f


_NORM_FROZEN = {"weight", "bias", "running_mean", "running_var"}
register_op("native_layer_norm", _spec(Family.NORM, frozen=_NORM_FROZEN, linearize=_layer_norm_map))
register_op("rms_norm", _spec(Family.NORM, frozen=_NORM_FROZEN, linearize=_rms_norm_map))
register_op("native_group_norm", _spec(Family.NORM, frozen=_NORM_FROZEN, linearize=_group_norm_map))
register_op(
    [aten._native_batch_norm_legit_no_training, aten.native_batch_norm],
    _spec(Family.BATCHNORM, frozen=_NORM_FROZEN),
)
register_op("_native_batch_norm_legit", _spec(Family.NORM, frozen=_NORM_FROZEN, linearize=_instance_stats_map))
register_op("embedding", _spec(Family.EMBEDDING, frozen={"weight"}))


def registered_ops() -> list[Any]:
    """Every op (overload or packet) with an entry in the table."""
    return list(_TABLE)
