"""AttnLRP's uniform rule for an elementwise product of two activations in one elementwise kernel.

For ``z = a ⊙ b`` (:class:`lrpc.rules.UniformProduct` with both operands relevant, k = 2) each operand gets
half of its epsilon share: ``q = R ⊘ stab(z)``, ``R_a = (a/2) ⊙ (q ⊙ b)``, ``R_b = (b/2) ⊙ (q ⊙ a)``;
for ``eps = 0`` that is ``R/2`` each (and 0 where ``z = 0``). The kernel recomputes ``z`` from ``a`` and
``b`` (rounded to their dtype, as the forward stored it) instead of reading it, reads ``a, b, R`` once and
writes both relevances; the unfused program materializes ``stab(z)``, ``q``, ``q ⊙ a``, ``q ⊙ b`` and
the halves.
"""

import torch
from torch import Tensor

from ._common import check, jit, tl, triton

BLOCK = 1024
NUM_WARPS = 4


def _divide(num: Tensor, den: Tensor, eps: float) -> Tensor:
    if eps == 0:
        zero = den == 0
        return torch.where(zero, 0.0, num / torch.where(zero, 1.0, den))
    return num / (den + eps * ((den >= 0).to(den.dtype) * 2 - 1))


def uniform_product_reference(a: Tensor, b: Tensor, R: Tensor, eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """Plain-torch ``(R_a, R_b)`` for ``z = a ⊙ b`` (see :func:`uniform_product`), in the order of
    operations lrpc's rule uses."""
    q = _divide(R, a * b, eps)
    return a * 0.5 * (q * b), b * 0.5 * (q * a)


@jit
def _product_kernel(
    a_ptr,
    b_ptr,
    r_ptr,
    ra_ptr,
    rb_ptr,
    n,
    eps,
    EPS_ZERO: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    a_raw = tl.load(a_ptr + offsets, mask=mask, other=0.0)
    a = a_raw.to(tl.float32)
    b = tl.load(b_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    r = tl.load(r_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    z = (a * b).to(a_raw.dtype).to(tl.float32)  # the forward's z, stored in the inputs' dtype
    if EPS_ZERO:
        q = tl.where(z == 0, 0.0, r / tl.where(z == 0, 1.0, z))
    else:
        q = r / (z + tl.where(z >= 0, eps, -eps))
    tl.store(ra_ptr + offsets, ((a * 0.5) * (q * b)).to(ra_ptr.dtype.element_ty), mask=mask)
    tl.store(rb_ptr + offsets, ((b * 0.5) * (q * a)).to(rb_ptr.dtype.element_ty), mask=mask)


def uniform_product(a: Tensor, b: Tensor, R: Tensor, eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """Uniform product rule for ``z = a ⊙ b``: ``R_a = (a/2) ⊙ (b ⊙ R ⊘ stab(z))``,
    ``R_b = (b/2) ⊙ (a ⊙ R ⊘ stab(z))``; ``stab(z) = z + eps·sign(z)``, ``sign(0) = +1``, and for
    ``eps = 0`` a zero ``z`` gives 0.

    ``a``, ``b``, ``R``: one shape (no broadcasting), one floating dtype (float32, float16, bfloat16;
    computed in float32). Returns ``(R_a, R_b)`` in that shape and dtype.
    """
    eps = float(eps)
    if not eps >= 0:
        raise ValueError(f"uniform_product: eps must be >= 0, got {eps}")
    check("uniform_product", {"a": a, "b": b, "R": R})
    if not (a.shape == b.shape == R.shape):
        raise ValueError(
            f"uniform_product: a, b and R must have one shape (no broadcasting), got {tuple(a.shape)}, "
            f"{tuple(b.shape)}, {tuple(R.shape)}"
        )
    a, b, R = a.contiguous(), b.contiguous(), R.contiguous()
    ra = torch.empty_like(a, memory_format=torch.contiguous_format)
    rb = torch.empty_like(a, memory_format=torch.contiguous_format)
    n = a.numel()
    if n:
        _product_kernel[(triton.cdiv(n, BLOCK),)](
            a, b, R, ra, rb, n, eps, EPS_ZERO=eps == 0, BLOCK=BLOCK, num_warps=NUM_WARPS
        )
    return ra, rb
