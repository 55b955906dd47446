"""The kernels as ``torch.library`` custom ops (``torch.ops.lrpc_kernels.*``), so that an FX graph (and
Inductor, which treats them as opaque calls) can hold them. Each has a fake implementation for tracing:
the result's shape, dtype and (contiguous) layout, as the kernel wrappers return it.

The namespace ``lrpc_kernels`` keeps clear of ops that lrpc or its tests register elsewhere.
"""

import torch
from torch import Tensor

from . import linear, product, softmax

NAMESPACE = "lrpc_kernels"


def _like(x: Tensor) -> Tensor:
    return x.new_empty(x.shape)  # contiguous, like the wrappers' outputs


@torch.library.custom_op(f"{NAMESPACE}::linear_epsilon", mutates_args=())
def linear_epsilon(x: Tensor, R: Tensor, z: Tensor, weight: Tensor, eps: float) -> Tensor:
    """:func:`lrpc.kernels.linear_epsilon`: ``x ⊙ ((R ⊘ stab(z)) W)``."""
    return linear.linear_epsilon(x, R, z, weight, eps)


@linear_epsilon.register_fake
def _(x: Tensor, R: Tensor, z: Tensor, weight: Tensor, eps: float) -> Tensor:
    return _like(x)


@torch.library.custom_op(f"{NAMESPACE}::linear_zplus", mutates_args=())
def linear_zplus(x: Tensor, R: Tensor, weight: Tensor, bias: Tensor | None, stabilizer: float) -> Tensor:
    """:func:`lrpc.kernels.linear_zplus`."""
    return linear.linear_zplus(x, R, weight, bias, stabilizer)


@linear_zplus.register_fake
def _(x: Tensor, R: Tensor, weight: Tensor, bias: Tensor | None, stabilizer: float) -> Tensor:
    return _like(x)


@torch.library.custom_op(f"{NAMESPACE}::linear_alpha_beta", mutates_args=())
def linear_alpha_beta(
    x: Tensor, R: Tensor, weight: Tensor, bias: Tensor | None, alpha: float, beta: float, stabilizer: float
) -> Tensor:
    """:func:`lrpc.kernels.linear_alpha_beta`."""
    return linear.linear_alpha_beta(x, R, weight, bias, alpha, beta, stabilizer)


@linear_alpha_beta.register_fake
def _(
    x: Tensor, R: Tensor, weight: Tensor, bias: Tensor | None, alpha: float, beta: float, stabilizer: float
) -> Tensor:
    return _like(x)


@torch.library.custom_op(f"{NAMESPACE}::linear_gamma", mutates_args=())
def linear_gamma(
    x: Tensor, R: Tensor, z: Tensor, weight: Tensor, bias: Tensor | None, gamma: float, stabilizer: float
) -> Tensor:
    """:func:`lrpc.kernels.linear_gamma`."""
    return linear.linear_gamma(x, R, z, weight, bias, gamma, stabilizer)


@linear_gamma.register_fake
def _(
    x: Tensor, R: Tensor, z: Tensor, weight: Tensor, bias: Tensor | None, gamma: float, stabilizer: float
) -> Tensor:
    return _like(x)


@torch.library.custom_op(f"{NAMESPACE}::softmax_relevance", mutates_args=())
def softmax_relevance(x: Tensor, s: Tensor, R: Tensor, dim: int) -> Tensor:
    """:func:`lrpc.kernels.softmax_relevance`."""
    return softmax.softmax_relevance(x, s, R, dim)


@softmax_relevance.register_fake
def _(x: Tensor, s: Tensor, R: Tensor, dim: int) -> Tensor:
    return _like(x)


@torch.library.custom_op(f"{NAMESPACE}::uniform_product", mutates_args=())
def uniform_product(a: Tensor, b: Tensor, R: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """:func:`lrpc.kernels.uniform_product`."""
    return product.uniform_product(a, b, R, eps)


@uniform_product.register_fake
def _(a: Tensor, b: Tensor, R: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    return _like(a), _like(a)


#: The overloads the fusion pass inserts.
LINEAR_EPSILON = torch.ops.lrpc_kernels.linear_epsilon.default
LINEAR_ZPLUS = torch.ops.lrpc_kernels.linear_zplus.default
LINEAR_ALPHA_BETA = torch.ops.lrpc_kernels.linear_alpha_beta.default
LINEAR_GAMMA = torch.ops.lrpc_kernels.linear_gamma.default
SOFTMAX_RELEVANCE = torch.ops.lrpc_kernels.softmax_relevance.default
UNIFORM_PRODUCT = torch.ops.lrpc_kernels.uniform_product.default
