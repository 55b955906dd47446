"""Triton kernels for fused LRP rule steps (installed as ``lrpc.kernels``).

Each kernel comes with a plain-torch reference (``*_reference``) it is tested against:

* :func:`linear_epsilon`: ``R_x = x ⊙ ((R ⊘ stab(z)) W)``, division and product fused into the matmul;
* :func:`linear_zplus`, :func:`linear_alpha_beta`, :func:`linear_gamma`: the sign-split rules, positive
  and negative parts accumulated in one pass;
* :func:`softmax_relevance`: AttnLRP's ``R_x = x ⊙ (R − s ⊙ Σ R)`` row-wise;
* :func:`uniform_product`: AttnLRP's uniform rule for ``a ⊙ b``.

The kernels run on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (Triton's interpreter, for
tests; set it before triton is first imported: Triton settles the mode for the whole process then). The
references need only torch. :mod:`lrpc.kernels.fusion` swaps the kernels into generated relevance programs (the
``"triton"`` backend); :mod:`lrpc.kernels.ops` registers them as ``torch.ops.lrpc_kernels.*`` for that.
"""

from ._common import HAS_TRITON, available, interpreting
from .linear import (
    linear_alpha_beta,
    linear_alpha_beta_reference,
    linear_epsilon,
    linear_epsilon_reference,
    linear_gamma,
    linear_gamma_reference,
    linear_zplus,
    linear_zplus_reference,
)
from .product import uniform_product, uniform_product_reference
from .softmax import softmax_relevance, softmax_relevance_reference

__all__ = [
    "HAS_TRITON",
    "available",
    "interpreting",
    "linear_epsilon",
    "linear_epsilon_reference",
    "linear_zplus",
    "linear_zplus_reference",
    "linear_alpha_beta",
    "linear_alpha_beta_reference",
    "linear_gamma",
    "linear_gamma_reference",
    "softmax_relevance",
    "softmax_relevance_reference",
    "uniform_product",
    "uniform_product_reference",
]
