"""The "dynamiclrp" preset (the DynamicLRP paper's rules) against its written equations, computed here
independently: absolute-value splits for sums and products, identity through norms, uniform average
pooling, unfolded batch norm, seed 1. Float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lrpc

D = torch.float64
EPS = 1e-11


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert b.abs().max() > 0, "reference is all zero: the test would be vacuous"
    return float((a - b).abs().max() / b.abs().max())


def stab(z: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    return z + eps * torch.where(z >= 0, 1.0, -1.0).to(z.dtype)


class Binary(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, a, b):
        return self.fn(a, b)


def explain(model: nn.Module, *args, seed: torch.Tensor):
    return lrpc.compile(model.eval(), rules="dynamiclrp", backend="eager")(*args, target=lambda out: seed)


@pytest.mark.parametrize("op", ["add", "sub"])
def test_sum_splits_by_absolute_value(op: str) -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 4, dtype=D, generator=g), torch.randn(3, 4, dtype=D, generator=g)
    seed = torch.randn(3, 4, dtype=D, generator=g)
    fn = torch.add if op == "add" else torch.sub
    res = explain(Binary(fn), a, b, seed=seed)
    total = stab(a.abs() + b.abs())
    ra, rb = res.relevance
    assert rel_err(ra, a.abs() / total * seed) < 1e-12
    assert rel_err(rb, b.abs() / total * seed) < 1e-12


def test_reduction_splits_by_absolute_value() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, dtype=D, generator=g)
    seed = torch.randn(3, dtype=D, generator=g)

    class Sum(nn.Module):
        def forward(self, x):
            return x.sum(-1)

    res = explain(Sum(), x, seed=seed)
    expected = x.abs() / stab(x.abs().sum(-1, keepdim=True)) * seed[:, None]
    assert rel_err(res.relevance, expected) < 1e-12



def test_a_sampling_grid_is_not_a_summand() -> None:
    """grid_sample sums its input's pixels with bilinear weights: the split takes their magnitudes, not
    the grid's (|grid| would sample mirrored coordinates). A flip written as a grid moves relevance back
    exactly where the flip moved the pixels."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 1, 4, 5, dtype=D, generator=g)
    seed = torch.randn(2, 1, 4, 5, dtype=D, generator=g)
    theta = torch.tensor([[[-1.0, 0, 0], [0, 1.0, 0]]], dtype=D).expand(2, 2, 3)

    class Flip(nn.Module):
        def forward(self, x):
            grid = F.affine_grid(theta, list(x.shape), align_corners=True)
            return F.grid_sample(x, grid, align_corners=True)

    assert torch.allclose(Flip()(x), x.flip(-1))
    res = explain(Flip(), x, seed=seed)
    # each output pixel samples one input pixel (weights 1 and 0 up to rounding): its relevance lands there
    assert rel_err(res.relevance, seed.flip(-1)) < 1e-9

def test_elementwise_product_splits_by_magnitude() -> None:
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(2, 6, dtype=D, generator=g), torch.randn(2, 6, dtype=D, generator=g)
    seed = torch.randn(2, 6, dtype=D, generator=g)
    ra, rb = explain(Binary(torch.mul), a, b, seed=seed).relevance
    share = seed / stab(a * b) * (a * b)  # the term's epsilon share: R up to the stabilizer
    assert rel_err(ra, share * a.abs() / stab(a.abs() + b.abs())) < 1e-12
    assert rel_err(rb, share * b.abs() / stab(a.abs() + b.abs())) < 1e-12
    assert rel_err(ra + rb, seed) < 1e-9  # conservative up to the stabilizers


def test_a_broadcast_product_sums_each_factors_share() -> None:
    """``a (2, 6) * b (1, 6)``: the split is made per term of the broadcast product, and ``b``'s shares
    summed over the rows it was broadcast along."""
    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(2, 6, dtype=D, generator=g), torch.randn(1, 6, dtype=D, generator=g)
    seed = torch.randn(2, 6, dtype=D, generator=g)
    ra, rb = explain(Binary(torch.mul), a, b, seed=seed).relevance
    share = seed / stab(a * b) * (a * b)
    assert rel_err(ra, share * a.abs() / stab(a.abs() + b.abs())) < 1e-12
    assert rel_err(rb, (share * b.abs() / stab(a.abs() + b.abs())).sum(0, keepdim=True)) < 1e-12


def test_a_product_of_routed_rows_splits_without_guarding_on_their_number() -> None:
    """A mixture-of-experts router sends a data-dependent number of rows to an expert (Mixtral): the split
    of a product of such rows must not ask whether that number is 1 (export cannot answer)."""

    class Routed(nn.Module):
        def forward(self, x, gate):
            rows = torch.nonzero(x[:, 0] > 0).squeeze(-1)
            return torch.zeros_like(x).index_add(0, rows, x[rows] * gate[rows])

    g = torch.Generator().manual_seed(3)
    x, gate = torch.randn(6, 4, dtype=D, generator=g), torch.randn(6, 4, dtype=D, generator=g)
    seed = torch.randn(6, 4, dtype=D, generator=g)
    rx, rgate = explain(Routed(), x, gate, seed=seed).relevance
    routed = (x[:, :1] > 0).to(D)
    share = routed * seed / stab(x * gate) * (x * gate)  # the index_add's zeros take no share
    assert 0 < routed.sum() < 6
    assert rel_err(rx, share * x.abs() / stab(x.abs() + gate.abs())) < 1e-9
    assert rel_err(rgate, share * gate.abs() / stab(x.abs() + gate.abs())) < 1e-9


@pytest.mark.parametrize(
    "rows,inner,cols",
    [(3, 4, 5), (4, 4, 4)],
    ids=["rectangular", "square (shaped like an elementwise product: attention with length = head dim)"],
)
def test_matrix_product_splits_each_term_by_magnitude(rows: int, inner: int, cols: int) -> None:
    g = torch.Generator().manual_seed(3)
    A, B = torch.randn(2, rows, inner, dtype=D, generator=g), torch.randn(2, inner, cols, dtype=D, generator=g)
    seed = torch.randn(2, rows, cols, dtype=D, generator=g)
    rA, rB = explain(Binary(torch.matmul), A, B, seed=seed).relevance
    z = A @ B  # terms divided by small z cancel in the sums: float64 rounding reaches ~1e-11 here
    terms = torch.einsum("bik,bkj->bikj", A, B) * (seed / stab(z))[:, :, None, :]
    frac = A.abs()[..., None] / (A.abs()[..., None] + B.abs()[:, None])
    assert rel_err(rA, (terms * frac).sum(-1)) < 1e-10
    assert rel_err(rB, (terms * (1 - frac)).sum(1)) < 1e-10


def test_linear_with_an_activation_weight_splits_each_term_by_magnitude() -> None:
    """``linear(x, W) = x @ Wᵀ`` where ``W`` is an activation too (a hypernetwork's output): the terms
    ``x_bik W_jk``, with ``W``'s relevance summed over the batch and rows that share it."""
    g = torch.Generator().manual_seed(4)
    x, W = torch.randn(2, 3, 4, dtype=D, generator=g), torch.randn(5, 4, dtype=D, generator=g)
    seed = torch.randn(2, 3, 5, dtype=D, generator=g)
    rx, rW = explain(Binary(F.linear), x, W, seed=seed).relevance
    terms = torch.einsum("bik,jk->bikj", x, W) * (seed / stab(x @ W.T))[:, :, None, :]
    frac = x.abs()[..., None] / (x.abs()[..., None] + W.T.abs())
    assert rel_err(rx, (terms * frac).sum(-1)) < 1e-10
    assert rel_err(rW, torch.einsum("bikj->jk", terms * (1 - frac))) < 1e-10


def test_norms_are_identity_and_pooling_is_uniform() -> None:
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 4, 4, dtype=D, generator=g)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.GroupNorm(1, 3).to(D)

        def forward(self, x):
            return F.avg_pool2d(self.norm(x), 2)

    seed = torch.randn(2, 3, 2, 2, dtype=D, generator=g)
    res = explain(Net(), x, seed=seed)
    expected = seed.repeat_interleave(2, -1).repeat_interleave(2, -2) / 4  # each window element gets R/4
    assert rel_err(res.relevance, expected) < 1e-12


def test_batch_norm_is_not_folded_and_passes_relevance() -> None:
    torch.manual_seed(5)
    conv, bn = nn.Conv2d(2, 3, 3, bias=False).to(D), nn.BatchNorm2d(3).to(D)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 1.5)
    model = nn.Sequential(conv, bn).eval()
    x = torch.randn(2, 2, 5, 5, dtype=D)
    seed = torch.randn(2, 3, 3, 3, dtype=D)
    res = explain(model, x, seed=seed)
    z = conv(x)  # epsilon on the convolution alone: batch norm passed the relevance through unchanged
    xg = x.clone().requires_grad_()
    (grad,) = torch.autograd.grad(conv(xg), xg, seed / stab(z))
    assert rel_err(res.relevance, x * grad) < 1e-10
    plan = lrpc.compile(model, rules="dynamiclrp", backend="eager").plan(x, target=lambda out: seed)
    assert any(s.family == "batchnorm" and s.rule == lrpc.rules.Pass() for s in plan.steps)


def test_dynamiclrp_seeds_one() -> None:
    model = nn.Sequential(nn.Linear(4, 3, bias=False)).to(D).eval()
    x = torch.randn(5, 4, dtype=D)
    res = lrpc.compile(model, rules="dynamiclrp", backend="eager")(x, target=1)
    torch.testing.assert_close(res.relevance.sum(1), torch.ones(5, dtype=D))


def test_a_registered_product_op_must_say_how_it_multiplies(monkeypatch) -> None:
    """An op registered with two factors that both carry relevance, but no ``product=``: the product rule
    cannot tell a square matrix product from an elementwise one by shapes, so it asks, by name."""
    from lrpc import ops

    monkeypatch.setattr(ops, "_TABLE", dict(ops._TABLE))  # restored after the test
    ops.register_op("mul", ops.OpSpec(ops.Family.SCALE, factors=frozenset({"self", "other"})))
    a = torch.randn(2, 3, dtype=D)
    asks = r"product=\.\.\.\), one of \('elementwise', 'matmul', 'linear'\) \(at node 'mul', aten\.mul\.Tensor"
    with pytest.raises(lrpc.RuleError, match=asks):
        explain(Binary(torch.mul), a, a + 1, seed=torch.ones(2, 3, dtype=D))
