"""AttnLRP's softmax rule in one row-wise kernel.

``R_x = x ⊙ (R − s ⊙ Σ_dim R)`` with ``s = softmax(x, dim)`` the forward output, and 0 wherever ``s == 0``
(masked positions, ``x = −inf``, where the product would be ``nan``): :class:`lrpc.rules.Softmax`. The
kernel reads ``R`` (the row sum in float32), ``s`` and ``x`` once per row and writes ``R_x``; the
unfused program materializes ``s ⊙ Σ R``, the difference and the product before masking.
"""

import torch
from torch import Tensor

from ._common import check, jit, tl, triton

#: Rows up to this length are held in registers in one block; longer rows are walked twice in chunks.
MAX_BLOCK = 4096
#: Elements a program handles when it takes several short rows at once.
ELEMENTS_PER_PROGRAM = 4096
NUM_WARPS = 4


def softmax_relevance_reference(x: Tensor, s: Tensor, R: Tensor, dim: int = -1) -> Tensor:
    """Plain-torch ``R_x = where(s == 0, 0, x ⊙ (R − s ⊙ Σ_dim R))`` (see :func:`softmax_relevance`)."""
    out = x * (R - s * R.sum(dim, keepdim=True))
    return torch.where(s == 0, 0.0, out)


@jit
def _softmax_kernel(
    x_ptr,
    s_ptr,
    r_ptr,
    out_ptr,
    n_rows,
    L,
    inner,
    SINGLE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    # Contiguous tensors seen as (outer, L, inner): row (o, i) starts at o·L·inner + i, its elements are
    # ``inner`` apart. BLOCK_R rows per program.
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    mask_r = rows < n_rows
    base = (rows // inner) * (L * inner) + rows % inner
    cols = tl.arange(0, BLOCK_L).to(tl.int64)
    if SINGLE:  # the whole row in one block: R is read once
        mask = mask_r[:, None] & (cols < L)[None, :]
        offsets = base[:, None] + cols[None, :] * inner
        r = tl.load(r_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        total = tl.sum(r, axis=1)
        s = tl.load(s_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        out = tl.where(s == 0, 0.0, x * (r - s * total[:, None]))
        tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=mask)
    else:  # long rows: one pass for the sum, one for the output
        acc = tl.zeros((BLOCK_R, BLOCK_L), dtype=tl.float32)
        for c0 in range(0, L, BLOCK_L):
            mask = mask_r[:, None] & (c0 + cols < L)[None, :]
            offsets = base[:, None] + (c0 + cols)[None, :] * inner
            acc += tl.load(r_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        total = tl.sum(acc, axis=1)
        for c0 in range(0, L, BLOCK_L):
            mask = mask_r[:, None] & (c0 + cols < L)[None, :]
            offsets = base[:, None] + (c0 + cols)[None, :] * inner
            r = tl.load(r_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            s = tl.load(s_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            out = tl.where(s == 0, 0.0, x * (r - s * total[:, None]))
            tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=mask)


def softmax_relevance(x: Tensor, s: Tensor, R: Tensor, dim: int = -1) -> Tensor:
    """AttnLRP softmax rule: ``R_x = x ⊙ (R − s ⊙ Σ_dim R)``, and 0 where ``s == 0``.

    ``x`` the softmax input, ``s = softmax(x, dim)`` its output, ``R`` the relevance at ``s``; one shape,
    one floating dtype (float32, float16, bfloat16; the sum and products in float32). Masked inputs
    (``x = −inf``, ``s = 0``) get exactly 0. The result has ``x``'s shape and dtype.
    """
    check("softmax_relevance", {"x": x, "s": s, "R": R})
    if not (x.shape == s.shape == R.shape):
        raise ValueError(
            "softmax_relevance: x, s and R must have one shape, got "
            f"{tuple(x.shape)}, {tuple(s.shape)}, {tuple(R.shape)}"
        )
    if x.dim() == 0:
        raise ValueError("softmax_relevance: the inputs must have at least one dimension")
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"softmax_relevance: dim {dim} out of range for {x.dim()} dims")
    dim = dim % x.dim()
    L = x.shape[dim]
    inner = 1
    for size in x.shape[dim + 1 :]:
        inner *= size
    x, s, R = x.contiguous(), s.contiguous(), R.contiguous()  # no-ops for the usual contiguous inputs
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    n_rows = x.numel() // L if L else 0
    if n_rows:
        block_l = min(triton.next_power_of_2(L), MAX_BLOCK)
        block_r = max(1, min(ELEMENTS_PER_PROGRAM // block_l, triton.next_power_of_2(n_rows)))
        _softmax_kernel[(triton.cdiv(n_rows, block_r),)](
            x,
            s,
            R,
            out,
            n_rows,
            L,
            inner,
            SINGLE=L <= block_l,
            BLOCK_R=block_r,
            BLOCK_L=block_l,
            num_warps=NUM_WARPS,
        )
    return out
