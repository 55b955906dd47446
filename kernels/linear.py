"""Relevance through a linear layer ``z = x Wᵀ + b`` in fused matmul kernels.

Notation (as in :mod:`lrpc.rules`): ``x`` the layer input ``(..., in)``, ``W`` the weight ``(out, in)``,
``b`` the bias ``(out,)``, ``z`` the layer output and ``R`` the relevance arriving at it ``(..., out)``;
``t⁺ = max(t, 0)``, ``t⁻ = min(t, 0)``; ``q = R ⊘ stab(d)`` is :func:`lrpc.rules.divide`:
``stab(d) = d + eps·sign(d)`` with ``sign(0) = +1``, and for ``eps == 0`` a zero denominator gives 0.

* :func:`linear_epsilon`: ``R_x = x ⊙ ((R ⊘ stab(z)) W)``, one kernel: the division is the prologue of the
  matmul (applied to the tiles of ``R`` and ``z`` as they are loaded), the product with ``x`` its epilogue;
  neither ``R ⊘ stab(z)`` nor the matmul result is written to memory.
* :func:`linear_zplus`, :func:`linear_alpha_beta`, :func:`linear_gamma`: the sign-split rules. All three
  have the form ``R_x = x⁺ ⊙ (g_a A + g_b B) + x⁻ ⊙ (g_a B + g_b A)`` for two weight matrices ``A, B``
  derived from ``W`` (``A = W⁺, B = W⁻`` for z⁺ and αβ; ``A = W + γW⁺, B = W + γW⁻`` for γ) and two
  output-side factors ``g_a, g_b`` computed from the "positive" and "negative" pre-activations
  ``z_a = x⁺Aᵀ + x⁻Bᵀ + b_a`` and ``z_b = x⁺Bᵀ + x⁻Aᵀ + b_b``. Two kernels: a forward matmul that
  builds ``A, B`` and ``x⁺, x⁻`` from one load of ``W`` and ``x`` tiles, accumulates ``z_a`` and ``z_b``
  together and ends in the rule's division (writing only ``g_a, g_b``), and a backward matmul that
  accumulates both products per tile and ends in the product with ``x⁺, x⁻``. (The two reductions run
  over different dimensions, so one kernel cannot hold both.)

Each wrapper has a ``*_reference`` twin in plain torch, written from the same equation the way
:mod:`lrpc.rules` computes it; the tests check the kernels against the twins and the twins against lrpc.
"""

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from ._common import block, check, dot_precision, jit, rows, tl, triton, upcast_dot


class Launch(NamedTuple):
    """A matmul kernel's tile caps (output rows, output columns, reduction step) and launch parameters."""

    rows: int
    cols: int
    red: int
    warps: int
    stages: int


#: Tiles of at most 64 x 64 outputs and 32-wide reduction steps, Triton's default 3 pipeline stages: the
#: fastest or within 10% of it on every benchmark shape (H200, ``bench/kernels.py --sweep``).
LAUNCH = Launch(rows=64, cols=64, red=32, warps=4, stages=3)
#: The sign-split kernels with float32 operands in IEEE precision (torch's default matmul precision), where
#: ``tl.dot`` runs on the FMA units. With :data:`LAUNCH` their two or four float32 accumulators left ptxas
#: no registers: 2-42 KB spilled per thread (sm_90, ``bench/registers.py``), and they ran at ~1 TFLOP/s on
#: an H200. One stage, 8 warps and 16-wide reduction steps compile without spills.
LAUNCH_SIGNED_FMA = Launch(rows=64, cols=64, red=16, warps=8, stages=1)

ZPLUS, ALPHA_BETA, GAMMA = 0, 1, 2


# --- references ------------------------------------------------------------------------------------
def _divide(num: Tensor, den: Tensor, eps: float) -> Tensor:
    """``num ⊘ stab(den)``; for ``eps == 0`` a zero denominator gives 0 (lrpc.rules.divide's convention)."""
    if eps == 0:
        zero = den == 0
        return torch.where(zero, 0.0, num / torch.where(zero, 1.0, den))
    return num / (den + eps * ((den >= 0).to(den.dtype) * 2 - 1))


def _linear(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    return torch.nn.functional.linear(x, w, b)


def linear_epsilon_reference(x: Tensor, R: Tensor, z: Tensor, weight: Tensor, eps: float = 1e-6) -> Tensor:
    """Plain-torch ``R_x = x ⊙ ((R ⊘ stab(z)) W)`` (see :func:`linear_epsilon`)."""
    return x * (_divide(R, z, eps) @ weight)


def linear_zplus_reference(
    x: Tensor, R: Tensor, weight: Tensor, bias: Tensor | None = None, stabilizer: float = 1e-6
) -> Tensor:
    """Plain-torch z⁺ (see :func:`linear_zplus`)."""
    xp, xn, wp, wn = x.clamp(min=0), x.clamp(max=0), weight.clamp(min=0), weight.clamp(max=0)
    z = _linear(xp, wp, None if bias is None else bias.clamp(min=0)) + _linear(xn, wn, None)
    g = _divide(R, z, stabilizer)
    return xp * (g @ wp) + xn * (g @ wn)


def linear_alpha_beta_reference(
    x: Tensor,
    R: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    alpha: float = 2.0,
    beta: float = 1.0,
    stabilizer: float = 1e-6,
) -> Tensor:
    """Plain-torch αβ (see :func:`linear_alpha_beta`)."""
    xp, xn, wp, wn = x.clamp(min=0), x.clamp(max=0), weight.clamp(min=0), weight.clamp(max=0)
    bp, bn = (None, None) if bias is None else (bias.clamp(min=0), bias.clamp(max=0))
    gp = _divide(R, _linear(xp, wp, bp) + _linear(xn, wn, None), stabilizer)
    gn = _divide(R, _linear(xp, wn, bn) + _linear(xn, wp, None), stabilizer)
    positive = xp * (gp @ wp) + xn * (gp @ wn)
    negative = xp * (gn @ wn) + xn * (gn @ wp)
    return alpha * positive - beta * negative


def linear_gamma_reference(
    x: Tensor,
    R: Tensor,
    z: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    gamma: float = 0.25,
    stabilizer: float = 1e-6,
) -> Tensor:
    """Plain-torch generalized γ (see :func:`linear_gamma`)."""
    xp, xn = x.clamp(min=0), x.clamp(max=0)
    w1, w2 = weight + gamma * weight.clamp(min=0), weight + gamma * weight.clamp(max=0)
    b1 = None if bias is None else bias + gamma * bias.clamp(min=0)
    b2 = None if bias is None else bias + gamma * bias.clamp(max=0)
    g1 = (z > 0).to(R.dtype) * _divide(R, _linear(xp, w1, b1) + _linear(xn, w2, None), stabilizer)
    g2 = (z < 0).to(R.dtype) * _divide(R, _linear(xp, w2, b2) + _linear(xn, w1, None), stabilizer)
    return xp * (g1 @ w1) + xn * (g1 @ w2) + xp * (g2 @ w2) + xn * (g2 @ w1)


# --- kernels -------------------------------------------------------------------------------------------
# Kernels are self-contained (no jitted helpers): see kernels._common.jit.
@jit
def _epsilon_kernel(
    x_ptr,
    r_ptr,
    z_ptr,
    w_ptr,
    out_ptr,
    M,
    N,
    K,
    sxm,
    sxk,
    srm,
    srn,
    szm,
    szn,
    swn,
    swk,
    som,
    sok,
    eps,
    EPS_ZERO: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # out[M, K] = x[M, K] * (q[M, N] @ w[N, K]),  q = r / stab(z): reduction over N (the layer's outputs)
    rm = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rk = (tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)).to(tl.int64)
    mask_m, mask_k = rm < M, rk < K
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rn = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        mask_n = rn < N
        mask_mn = mask_m[:, None] & mask_n[None, :]
        r = tl.load(r_ptr + rm[:, None] * srm + rn[None, :] * srn, mask=mask_mn, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + rm[:, None] * szm + rn[None, :] * szn, mask=mask_mn, other=0.0).to(tl.float32)
        if EPS_ZERO:
            q = tl.where(z == 0, 0.0, r / tl.where(z == 0, 1.0, z))
        else:
            q = r / (z + tl.where(z >= 0, eps, -eps))
        w = tl.load(
            w_ptr + rn[:, None] * swn + rk[None, :] * swk, mask=mask_n[:, None] & mask_k[None, :], other=0.0
        )
        if UPCAST:
            w = w.to(tl.float32)
        acc = tl.dot(q.to(w.dtype), w, acc=acc, input_precision=PRECISION)
    mask_mk = mask_m[:, None] & mask_k[None, :]
    x = tl.load(x_ptr + rm[:, None] * sxm + rk[None, :] * sxk, mask=mask_mk, other=0.0).to(tl.float32)
    out = x * acc
    tl.store(out_ptr + rm[:, None] * som + rk[None, :] * sok, out.to(out_ptr.dtype.element_ty), mask=mask_mk)


@jit
def _signed_forward_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    r_ptr,
    z_ptr,
    ga_ptr,
    gb_ptr,
    M,
    N,
    K,
    sxm,
    sxk,
    swn,
    swk,
    sb,
    srm,
    srn,
    szm,
    szn,
    sgm,
    sgn,
    wscale,
    gamma,
    ca,
    cb,
    eps,
    MODE: tl.constexpr,
    TWO: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    EPS_ZERO: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # z_a = x⁺Aᵀ + x⁻Bᵀ + b_a, z_b = x⁺Bᵀ + x⁻Aᵀ + b_b over tiles [M, N], reduction over K (the inputs);
    # A = wscale·W + γW⁺, B = wscale·W + γW⁻. Epilogue: g_a, g_b from R (and z for γ); z_a, z_b stay here.
    # TWO (MODE != ZPLUS): whether the negative part z_b, g_b is needed at all.
    rm = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rn = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    mask_m, mask_n = rm < M, rn < N
    za = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    zb = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        mask_k = rk < K
        x = tl.load(
            x_ptr + rm[:, None] * sxm + rk[None, :] * sxk, mask=mask_m[:, None] & mask_k[None, :], other=0.0
        )
        w = tl.load(
            w_ptr + rn[None, :] * swn + rk[:, None] * swk, mask=mask_k[:, None] & mask_n[None, :], other=0.0
        )
        if UPCAST:
            x, w = x.to(tl.float32), w.to(tl.float32)
        xf, wf = x.to(tl.float32), w.to(tl.float32)
        xp, xn = tl.maximum(xf, 0.0).to(x.dtype), tl.minimum(xf, 0.0).to(x.dtype)
        wa = (wscale * wf + gamma * tl.maximum(wf, 0.0)).to(w.dtype)  # Aᵀ tile [K, N]
        wb = (wscale * wf + gamma * tl.minimum(wf, 0.0)).to(w.dtype)  # Bᵀ tile
        za = tl.dot(xp, wa, acc=za, input_precision=PRECISION)
        za = tl.dot(xn, wb, acc=za, input_precision=PRECISION)
        if TWO:
            zb = tl.dot(xp, wb, acc=zb, input_precision=PRECISION)
            zb = tl.dot(xn, wa, acc=zb, input_precision=PRECISION)
    if HAS_BIAS:
        b = tl.load(b_ptr + rn * sb, mask=mask_n, other=0.0).to(tl.float32)
        za += (wscale * b + gamma * tl.maximum(b, 0.0))[None, :]
        zb += (wscale * b + gamma * tl.minimum(b, 0.0))[None, :]
    mask_mn = mask_m[:, None] & mask_n[None, :]
    offsets = rm[:, None] * sgm + rn[None, :] * sgn
    r = tl.load(r_ptr + rm[:, None] * srm + rn[None, :] * srn, mask=mask_mn, other=0.0).to(tl.float32)
    if EPS_ZERO:
        da = tl.where(za == 0, 0.0, r / tl.where(za == 0, 1.0, za))
    else:
        da = r / (za + tl.where(za >= 0, eps, -eps))
    if MODE == 2:  # γ: the positive part serves outputs z > 0, the negative part outputs z < 0
        z = tl.load(z_ptr + rm[:, None] * szm + rn[None, :] * szn, mask=mask_mn, other=0.0).to(tl.float32)
        ga = (z > 0).to(tl.float32) * da
    else:  # z⁺: ca = 1; αβ: ca = α
        ga = ca * da
    tl.store(ga_ptr + offsets, ga.to(ga_ptr.dtype.element_ty), mask=mask_mn)
    if TWO:
        if EPS_ZERO:
            db = tl.where(zb == 0, 0.0, r / tl.where(zb == 0, 1.0, zb))
        else:
            db = r / (zb + tl.where(zb >= 0, eps, -eps))
        if MODE == 2:
            gb = (z < 0).to(tl.float32) * db
        else:  # αβ: cb = -β
            gb = cb * db
        tl.store(gb_ptr + offsets, gb.to(gb_ptr.dtype.element_ty), mask=mask_mn)


@jit
def _signed_backward_kernel(
    x_ptr,
    w_ptr,
    ga_ptr,
    gb_ptr,
    out_ptr,
    M,
    N,
    K,
    sxm,
    sxk,
    swn,
    swk,
    sgm,
    sgn,
    som,
    sok,
    wscale,
    gamma,
    TWO: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # out = x⁺ ⊙ (g_a A + g_b B) + x⁻ ⊙ (g_a B + g_b A) over tiles [M, K], reduction over N (the outputs)
    rm = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rk = (tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)).to(tl.int64)
    mask_m, mask_k = rm < M, rk < K
    acc_p = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    acc_n = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rn = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        mask_n = rn < N
        mask_mn = mask_m[:, None] & mask_n[None, :]
        w = tl.load(
            w_ptr + rn[:, None] * swn + rk[None, :] * swk, mask=mask_n[:, None] & mask_k[None, :], other=0.0
        )
        if UPCAST:
            w = w.to(tl.float32)
        wf = w.to(tl.float32)
        wa = (wscale * wf + gamma * tl.maximum(wf, 0.0)).to(w.dtype)
        wb = (wscale * wf + gamma * tl.minimum(wf, 0.0)).to(w.dtype)
        ga = tl.load(ga_ptr + rm[:, None] * sgm + rn[None, :] * sgn, mask=mask_mn, other=0.0).to(w.dtype)
        acc_p = tl.dot(ga, wa, acc=acc_p, input_precision=PRECISION)
        acc_n = tl.dot(ga, wb, acc=acc_n, input_precision=PRECISION)
        if TWO:
            gb = tl.load(gb_ptr + rm[:, None] * sgm + rn[None, :] * sgn, mask=mask_mn, other=0.0).to(w.dtype)
            acc_p = tl.dot(gb, wb, acc=acc_p, input_precision=PRECISION)
            acc_n = tl.dot(gb, wa, acc=acc_n, input_precision=PRECISION)
    mask_mk = mask_m[:, None] & mask_k[None, :]
    x = tl.load(x_ptr + rm[:, None] * sxm + rk[None, :] * sxk, mask=mask_mk, other=0.0).to(tl.float32)
    out = tl.maximum(x, 0.0) * acc_p + tl.minimum(x, 0.0) * acc_n
    tl.store(out_ptr + rm[:, None] * som + rk[None, :] * sok, out.to(out_ptr.dtype.element_ty), mask=mask_mk)


# --- wrappers --------------------------------------------------------------------------------------
def _check_layer(
    fn: str, x: Tensor, R: Tensor, weight: Tensor, z: Tensor | None, bias: Tensor | None
) -> None:
    check(
        fn,
        {"x": x, "R": R, "z": z, "weight": weight, "bias": bias},
        dims={"x": -1, "R": -1, "weight": 2, "bias": 1},
    )
    out_features, in_features = weight.shape
    if x.shape[-1] != in_features:
        raise ValueError(
            f"{fn}: x {tuple(x.shape)} does not match weight {tuple(weight.shape)} (in features)"
        )
    if R.shape[-1] != out_features or R.shape[:-1] != x.shape[:-1]:
        raise ValueError(
            f"{fn}: R must have shape {(*x.shape[:-1], out_features)} (x's leading dims, weight's out "
            f"features), got {tuple(R.shape)}"
        )
    if z is not None and z.shape != R.shape:
        raise ValueError(f"{fn}: z must have R's shape {tuple(R.shape)}, got {tuple(z.shape)}")
    if bias is not None and bias.shape != (out_features,):
        raise ValueError(f"{fn}: bias must have shape ({out_features},), got {tuple(bias.shape)}")


def _eps(fn: str, eps: float) -> float:
    eps = float(eps)
    if not eps >= 0:
        raise ValueError(f"{fn}: the stabilizer must be >= 0, got {eps}")
    return eps


def linear_epsilon(x: Tensor, R: Tensor, z: Tensor, weight: Tensor, eps: float = 1e-6) -> Tensor:
    """LRP-ε through ``z = x Wᵀ + b``: ``R_x = x ⊙ ((R ⊘ stab(z)) W)`` in one kernel.

    ``x``: ``(..., in)``; ``R``, ``z``: ``(..., out)``; ``weight``: ``(out, in)`` (any strides). One floating
    dtype for all (float32, float16, bfloat16), products accumulated in float32; the result has ``x``'s
    shape and dtype. ``stab(z) = z + eps·sign(z)``, ``sign(0) = +1``; ``eps = 0`` is LRP-0 with ``R/0 = 0``.
    The bias is not needed: it is inside ``z``.
    """
    eps = _eps("linear_epsilon", eps)
    dtype, device = check("linear_epsilon", {"x": x, "R": R, "z": z, "weight": weight})
    _check_layer("linear_epsilon", x, R, weight, z, None)
    N, K = weight.shape
    x2, r2, z2 = rows(x, K), rows(R, N), rows(z, N)
    M = x2.shape[0]
    out = torch.empty((M, K), dtype=dtype, device=device)
    if M and K:
        bm, bn, bk = block(M, 16, LAUNCH.rows), block(N, 16, LAUNCH.red), block(K, 16, LAUNCH.cols)
        grid = (triton.cdiv(M, bm), triton.cdiv(K, bk))
        _epsilon_kernel[grid](
            x2,
            r2,
            z2,
            weight,
            out,
            M,
            N,
            K,
            *x2.stride(),
            *r2.stride(),
            *z2.stride(),
            *weight.stride(),
            *out.stride(),
            eps,
            EPS_ZERO=eps == 0,
            PRECISION=dot_precision(dtype),
            UPCAST=upcast_dot(dtype),
            BLOCK_M=bm,
            BLOCK_N=bn,
            BLOCK_K=bk,
            num_warps=LAUNCH.warps,
            num_stages=LAUNCH.stages,
        )
    return out.reshape(x.shape)


def signed_launch(dtype: torch.dtype) -> Launch:
    """The sign-split kernels' launch for operands of ``dtype`` (read at each call: for float32 it follows
    torch's matmul precision)."""
    return LAUNCH_SIGNED_FMA if dtype == torch.float32 and dot_precision(dtype) == "ieee" else LAUNCH


def _signed(
    fn: str,
    mode: int,
    x: Tensor,
    R: Tensor,
    z: Tensor | None,
    weight: Tensor,
    bias: Tensor | None,
    wscale: float,
    gamma: float,
    ca: float,
    cb: float,
    eps: float,
) -> Tensor:
    """Run the forward (z_a, z_b -> g_a, g_b) and backward (-> R_x) sign-split kernels."""
    eps = _eps(fn, eps)
    dtype, device = check(fn, {"x": x, "R": R, "z": z, "weight": weight, "bias": bias})
    _check_layer(fn, x, R, weight, z, bias)
    N, K = weight.shape
    x2, r2 = rows(x, K), rows(R, N)
    z2 = rows(z, N) if z is not None else r2  # unread unless MODE == GAMMA
    M = x2.shape[0]
    out = torch.empty((M, K), dtype=dtype, device=device)
    if not (M and K):
        return out.reshape(x.shape)
    two = mode != ZPLUS
    ga = torch.empty((M, N), dtype=dtype, device=device)
    gb = torch.empty((M, N), dtype=dtype, device=device) if two else ga
    b = bias if bias is not None else weight  # a valid pointer; unread without HAS_BIAS
    precision, launch = dot_precision(dtype), signed_launch(dtype)
    bm = block(M, 16, launch.rows)
    if N:
        bn, bk = block(N, 16, launch.cols), block(K, 16, launch.red)
        _signed_forward_kernel[(triton.cdiv(M, bm), triton.cdiv(N, bn))](
            x2,
            weight,
            b,
            r2,
            z2,
            ga,
            gb,
            M,
            N,
            K,
            *x2.stride(),
            *weight.stride(),
            b.stride(0),
            *r2.stride(),
            *z2.stride(),
            *ga.stride(),
            wscale,
            gamma,
            ca,
            cb,
            eps,
            MODE=mode,
            TWO=two,
            HAS_BIAS=bias is not None,
            EPS_ZERO=eps == 0,
            PRECISION=precision,
            UPCAST=upcast_dot(dtype),
            BLOCK_M=bm,
            BLOCK_N=bn,
            BLOCK_K=bk,
            num_warps=launch.warps,
            num_stages=launch.stages,
        )
    bn, bk = block(N, 16, launch.red), block(K, 16, launch.cols)
    _signed_backward_kernel[(triton.cdiv(M, bm), triton.cdiv(K, bk))](
        x2,
        weight,
        ga,
        gb,
        out,
        M,
        N,
        K,
        *x2.stride(),
        *weight.stride(),
        *ga.stride(),
        *out.stride(),
        wscale,
        gamma,
        TWO=two,
        PRECISION=precision,
        UPCAST=upcast_dot(dtype),
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_K=bk,
        num_warps=launch.warps,
        num_stages=launch.stages,
    )
    return out.reshape(x.shape)


def linear_zplus(
    x: Tensor, R: Tensor, weight: Tensor, bias: Tensor | None = None, stabilizer: float = 1e-6
) -> Tensor:
    """LRP-z⁺ (lrpc.rules.ZPlus) through ``z = x Wᵀ + b``:
    ``R_x = x⁺ ⊙ (g W⁺) + x⁻ ⊙ (g W⁻)``, ``g = R ⊘ stab(x⁺W⁺ᵀ + b⁺ + x⁻W⁻ᵀ)``.

    Shapes and dtypes as in :func:`linear_epsilon`; ``bias``: ``(out,)`` or ``None``.
    """
    return _signed("linear_zplus", ZPLUS, x, R, None, weight, bias, 0.0, 1.0, 1.0, 0.0, stabilizer)


def linear_alpha_beta(
    x: Tensor,
    R: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    alpha: float = 2.0,
    beta: float = 1.0,
    stabilizer: float = 1e-6,
) -> Tensor:
    """LRP-αβ (lrpc.rules.AlphaBeta) through ``z = x Wᵀ + b``:
    ``R_x = α (x⁺ ⊙ g⁺W⁺ + x⁻ ⊙ g⁺W⁻) − β (x⁺ ⊙ g⁻W⁻ + x⁻ ⊙ g⁻W⁺)`` with
    ``g⁺ = R ⊘ stab(x⁺W⁺ᵀ + b⁺ + x⁻W⁻ᵀ)``, ``g⁻ = R ⊘ stab(x⁺W⁻ᵀ + b⁻ + x⁻W⁺ᵀ)``.

    Shapes and dtypes as in :func:`linear_epsilon`; any ``alpha, beta >= 0`` (the rule asks α − β = 1).
    """
    if alpha < 0 or beta < 0:
        raise ValueError(f"linear_alpha_beta: alpha and beta must be >= 0, got {alpha}, {beta}")
    return _signed(
        "linear_alpha_beta",
        ALPHA_BETA,
        x,
        R,
        None,
        weight,
        bias,
        0.0,
        1.0,
        float(alpha),
        -float(beta),
        stabilizer,
    )


def linear_gamma(
    x: Tensor,
    R: Tensor,
    z: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    gamma: float = 0.25,
    stabilizer: float = 1e-6,
) -> Tensor:
    """Generalized LRP-γ (lrpc.rules.Gamma) through ``z = x Wᵀ + b``, with ``W₁ = W + γW⁺``,
    ``W₂ = W + γW⁻``, ``b₁ = b + γb⁺``, ``b₂ = b + γb⁻``:
    ``R_x = x⁺ ⊙ (g₁W₁ + g₂W₂) + x⁻ ⊙ (g₁W₂ + g₂W₁)``,
    ``g₁ = 1[z>0] ⊙ R ⊘ stab(x⁺W₁ᵀ + b₁ + x⁻W₂ᵀ)``, ``g₂ = 1[z<0] ⊙ R ⊘ stab(x⁺W₂ᵀ + b₂ + x⁻W₁ᵀ)``.

    ``z`` is the layer's output (it selects which outputs count as positive). Shapes and dtypes as in
    :func:`linear_epsilon`.
    """
    if gamma < 0:
        raise ValueError(f"linear_gamma: gamma must be >= 0, got {gamma}")
    return _signed("linear_gamma", GAMMA, x, R, z, weight, bias, 1.0, float(gamma), 1.0, 1.0, stabilizer)


#: kernel wrapper -> its reference, for tests and benchmarks.
REFERENCES: dict[Callable[..., Tensor], Callable[..., Tensor]] = {
    linear_epsilon: linear_epsilon_reference,
    linear_zplus: linear_zplus_reference,
    linear_alpha_beta: linear_alpha_beta_reference,
    linear_gamma: linear_gamma_reference,
}
