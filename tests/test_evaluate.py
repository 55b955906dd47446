"""lrpc.evaluate: perturbation curves worked out by hand, the ABPC ordering on models where the true
contributions are known, token removal under an attention mask, and the Quantus adapter."""

from __future__ import annotations

import doctest

import numpy as np
import pytest
import torch
from torch import nn

import lrpc
from lrpc import evaluate
from lrpc.evaluate import Curves, perturbation_curves, quantus_explain_func

D = torch.float64


def test_docstring_examples_run() -> None:
    result = doctest.testmod(evaluate)
    assert result.attempted > 0 and result.failed == 0


def test_hand_computed_curves_on_a_linear_model() -> None:
    """f(x) = 4 x0 + 3 x1 + 2 x2 + 1 x3 + 0.5 at x = 1, baseline 0: the contributions are the weights."""
    w, bias = torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=D), 0.5
    model_fn = lambda x: x @ w + bias
    x = torch.ones(1, 4, dtype=D)
    c = perturbation_curves(model_fn, x, x * w, steps=4, baseline=0.0)
    assert c.morf.tolist() == [[10.5, 6.5, 3.5, 1.5, 0.5]]  # 4 goes first, then 3, 2, 1
    assert c.lerf.tolist() == [[10.5, 9.5, 7.5, 4.5, 0.5]]  # 1 goes first, then 2, 3, 4
    assert c.removed.tolist() == [[0, 1, 2, 3, 4]]
    assert c.fractions.tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert c.clean.tolist() == [10.5] and c.target is None
    # trapezoids over [0, 1]: AUC(MoRF) = 0.25 * ((10.5 + 0.5)/2 + 6.5 + 3.5 + 1.5) = 4.25,
    # AUC(LeRF) = 0.25 * (5.5 + 9.5 + 7.5 + 4.5) = 6.75
    assert c.auc_morf.tolist() == [4.25] and c.auc_lerf.tolist() == [6.75]
    assert c.abpc.tolist() == [2.5]
    # the order backwards swaps the curves
    back = perturbation_curves(model_fn, x, -x * w, steps=4)
    assert back.morf.tolist() == c.lerf.tolist() and back.abpc.tolist() == [-2.5]
    # fewer steps than features: round(i * 4 / 2) features after step i
    two = perturbation_curves(model_fn, x, x * w, steps=2)
    assert two.removed.tolist() == [[0, 2, 4]] and two.morf.tolist() == [[10.5, 3.5, 0.5]]
    assert two.abpc.tolist() == [(7.5 - 3.5) / 2]
    # steps=None: one feature per step
    assert perturbation_curves(model_fn, x, x * w, steps=None).morf.tolist() == c.morf.tolist()
    # normalize="clean": divided by |f(x)|
    norm = perturbation_curves(model_fn, x, x * w, steps=4, normalize="clean")
    assert torch.allclose(norm.abpc, torch.tensor([2.5 / 10.5], dtype=D))
    # a non-zero baseline: removing x1 = 1 -> 3 adds 3 * 2 = 6
    up = perturbation_curves(model_fn, x, x * w, steps=4, baseline=torch.tensor([0.0, 3.0, 0.0, 0.0], dtype=D))
    assert up.morf[0, 2].item() == 10.5 - 4 + 6


def test_target_is_fixed_on_the_clean_input() -> None:
    """Class 0 wins on the clean input; removing x0 makes class 1 win, but class 0 stays the target."""
    w = torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=D)  # logits = [2 x0, x1]
    model_fn = lambda x: x @ w
    x = torch.tensor([[1.0, 1.0]], dtype=D)
    c = perturbation_curves(model_fn, x, torch.tensor([[2.0, 0.0]], dtype=D), steps=2)
    assert c.target.tolist() == [0] and c.morf.tolist() == [[2.0, 0.0, 0.0]] and c.lerf.tolist() == [[2.0, 2.0, 0.0]]
    c1 = perturbation_curves(model_fn, x, torch.tensor([[0.0, 1.0]], dtype=D), target=1, steps=2)
    assert c1.morf.tolist() == [[1.0, 0.0, 0.0]] and c1.target.tolist() == [1]
    c2 = perturbation_curves(model_fn, x, torch.tensor([[0.0, 1.0]], dtype=D), target=lambda out: out.sum(-1), steps=2)
    assert c2.clean.tolist() == [3.0] and c2.target is None


def _linear_setup(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    model = nn.Linear(32, 5).to(D).eval()
    with torch.no_grad():
        model.weight.copy_(torch.randn(5, 32, generator=g, dtype=D))
    x = torch.randn(64, 32, generator=g, dtype=D)
    target = model(x).argmax(1)
    xg = x.clone().requires_grad_()
    (grad,) = torch.autograd.grad(model(xg).gather(1, target[:, None]).sum(), xg)
    return model, x, target, grad, g


def test_true_contributions_beat_random_and_negated_relevance() -> None:
    """On a linear model gradient x input (baseline 0) is each feature's exact contribution, so its
    order is the best possible: for every sample MoRF is as low and LeRF as high as any order can make
    them. Random relevance scores about 0, the negated relevance minus the true ABPC."""
    model, x, target, grad, g = _linear_setup()
    fn = lambda inp: model(inp)
    true = perturbation_curves(fn, x, grad * x, steps=8)
    random = perturbation_curves(fn, x, torch.randn(x.shape, generator=g, dtype=D), steps=8)
    negated = perturbation_curves(fn, x, -grad * x, steps=8)
    gradient_only = perturbation_curves(fn, x, grad, steps=8)
    assert torch.equal(true.target, target)
    assert (true.abpc >= random.abpc - 1e-9).all() and (true.abpc >= gradient_only.abpc - 1e-9).all()
    assert (true.morf <= random.morf + 1e-9).all() and (true.lerf >= random.lerf - 1e-9).all()
    assert true.summary().mean > 1.0
    assert abs(random.summary().mean) < 3 * random.summary().sem + 0.1 * true.summary().mean
    assert torch.allclose(negated.abpc, -true.abpc)
    # lrpc's LRP-0 with the logit as seed is gradient x input on a linear layer: the same curves
    res = lrpc.compile(model, rules="lrp0", backend="eager")(x, target=target)
    ours = perturbation_curves(fn, x, res.relevance, steps=8)
    assert torch.allclose(ours.abpc, true.abpc)


def test_with_the_baseline_the_contribution_changes() -> None:
    """With a non-zero baseline the exact contribution is w * (x - baseline), not w * x: the ABPC sees it."""
    model, x, _, grad, _ = _linear_setup(1)
    base = torch.full((32,), 0.7, dtype=D)
    exact = perturbation_curves(model, x, grad * (x - base), baseline=base, steps=8)
    wrong = perturbation_curves(model, x, grad * x, baseline=base, steps=8)
    assert (exact.abpc >= wrong.abpc - 1e-9).all() and exact.summary().mean > wrong.summary().mean


def test_images_channels_and_patches() -> None:
    """(B, C, H, W): a pixel is removed across channels (relevance summed over them); patches 2x2."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(2 * 4 * 4, 3)).to(D).eval()
    x = torch.rand(3, 2, 4, 4, dtype=D)
    seen = []

    def fn(inp):
        seen.append(inp.clone())
        return model(inp)

    rel = torch.zeros(3, 2, 4, 4, dtype=D)
    rel[:, 0, 0, 0], rel[:, 1, 0, 0] = 5.0, -1.0  # pixel (0, 0): 4 in total, the largest
    rel[:, 1, 3, 3] = 2.0  # pixel (3, 3): second
    c = perturbation_curves(fn, x, rel, steps=16, seed=1)
    assert c.morf.shape == (3, 17)
    first, lerf_first = seen[1], seen[2]  # seen: clean, MoRF step 1, LeRF step 1, MoRF step 2, ...
    assert (first[:, :, 0, 0] == 0).all() and (first != 0).sum() == x.numel() - 3 * 2
    assert (lerf_first[:, :, 0, 0] != 0).all()  # the most relevant pixel is kept longest under LeRF
    # patches: relevance per 2x2 patch; the patch holding (0, 0) goes first, whole and in both channels
    seen.clear()
    p = perturbation_curves(fn, x, rel, steps=4, patch_size=2)
    assert p.removed[0].tolist() == [0, 1, 2, 3, 4]
    step1 = seen[1]
    assert (step1[:, :, :2, :2] == 0).all() and (step1[:, :, 2:, :] == x[:, :, 2:, :]).all()
    assert (step1[:, :, :2, 2:] == x[:, :, :2, 2:]).all()
    # LeRF: patch (3, 3)'s is second-most relevant: removed at step 3 of 4, (0, 0)'s last
    assert (seen[2 * 3][:, :, 2:, 2:] == 0).all() and (seen[2 * 3][:, :, :2, :2] == x[:, :, :2, :2]).all()
    # relevance already per pixel (B, H, W) gives the same curves
    same = perturbation_curves(model, x, rel.sum(1), steps=16, seed=1)
    assert torch.equal(same.morf, c.morf) and torch.equal(same.lerf, c.lerf)
    with pytest.raises(ValueError, match="not divisible"):
        perturbation_curves(model, x, rel, patch_size=3)
    with pytest.raises(ValueError, match="does not fit"):
        perturbation_curves(model, x, rel[:, :, :2])


def test_token_removal_respects_the_attention_mask() -> None:
    """Token ids: removed tokens become the mask id; padding is never touched and does not count."""
    pad, mask_id = 0, 99
    scores = torch.arange(100, dtype=D) / 10  # each token id contributes id / 10
    attention = torch.tensor([[1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0, 0]])
    ids = torch.tensor([[5, 30, 10, 20, 7, pad, pad], [40, 2, 11, pad, pad, pad, pad]])
    calls = []

    def fn(inp):
        calls.append(inp.clone())
        return (scores[inp] * attention).sum(-1)  # the mask multiplies: padding never counts

    relevance = scores[ids] * attention
    relevance[attention == 0] = 100.0  # huge relevance on padding: must still never be removed
    c = perturbation_curves(fn, ids, relevance, steps=None, baseline=mask_id, mask=attention)
    assert c.removed.tolist() == [[0, 1, 2, 3, 4, 5], [0, 1, 1, 2, 2, 3]]  # 5 and 3 removable tokens
    for inp in calls:
        assert (inp[attention == 0] == pad).all()  # padding untouched
        assert set(inp[attention == 1].tolist()) <= set(ids[attention == 1].tolist()) | {mask_id}
    assert (calls[-1][attention == 1] == mask_id).all()  # the last step removes every real token
    # MoRF sample 0 removes 30, 20, 10, 7, 5 -> replaced by 99 (9.9 each)
    expected = [7.2]
    for tok in (30, 20, 10, 7, 5):
        expected.append(expected[-1] - tok / 10 + 9.9)
    assert torch.allclose(c.morf[0], torch.tensor(expected, dtype=D))
    # special tokens excluded through the mask: the first token of every sample stays
    keep_first = attention.clone()
    keep_first[:, 0] = 0
    calls.clear()
    c2 = perturbation_curves(fn, ids, relevance, steps=2, baseline=mask_id, mask=keep_first)
    assert all((inp[:, 0] == ids[:, 0]).all() for inp in calls)
    assert c2.removed[:, -1].tolist() == [4, 2]
    # (B, T, D) relevance is summed over D
    c3 = perturbation_curves(fn, ids, relevance[..., None].expand(-1, -1, 3) / 3, steps=None, baseline=mask_id, mask=attention)
    assert torch.allclose(c3.morf, c.morf)


def test_curves_cat_and_summary() -> None:
    w = torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=D)
    x = torch.ones(1, 4, dtype=D)
    a = perturbation_curves(lambda t: t @ w, x, x * w, steps=4)
    b = perturbation_curves(lambda t: t @ w, x, -x * w, steps=4)
    both = Curves.cat([a, b])
    s = both.summary()
    assert s.n == 2 and s.mean == 0.0 and abs(s.sem - 2.5) < 1e-12  # std of (2.5, -2.5) = 2.5 * sqrt 2
    assert "n=2" in str(s)


def test_quantus_adapter_returns_numpy_of_the_right_shape() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)
    ).eval()
    x = np.random.default_rng(0).random((4, 3, 6, 6), dtype=np.float64)  # Quantus hands numpy batches
    y = np.array([0, 3, 1, 4])
    explain = quantus_explain_func("epsilon-plus-flat")
    a = explain(model=model, inputs=x, targets=y, device="cpu", softmax=False)  # unknown kwargs ignored
    assert isinstance(a, np.ndarray) and a.shape == (4, 3, 6, 6) and a.dtype == np.float32
    expected = lrpc.compile(model, rules="epsilon-plus-flat", backend="eager")(
        torch.as_tensor(x, dtype=torch.float32), target=torch.as_tensor(y)
    ).relevance
    assert np.allclose(a, expected.numpy(), atol=1e-6)
    reduced = quantus_explain_func("epsilon", reduce_axes=(1,))(model, x[:2], 2)  # one target for all
    assert reduced.shape == (2, 1, 6, 6)
    # one attributor per model object: a second call compiles nothing new
    explain(model, x, y)
    (attributor,) = explain.attributors.values()
    assert attributor.stats["traces"] == 1
    # the adapter's output ranks the pixels well: the curves of its relevance beat random ones
    xt = torch.as_tensor(x, dtype=torch.float32)
    good = perturbation_curves(model, xt, torch.as_tensor(a), target=torch.as_tensor(y), steps=9)
    rand = perturbation_curves(model, xt, torch.rand(4, 3, 6, 6), target=torch.as_tensor(y), steps=9)
    assert good.summary().mean > rand.summary().mean


def test_quantus_adapter_keeps_only_the_latest_model_alive() -> None:
    """Quantus' randomisation metrics explain a fresh copy per layer: the dropped copies must be freed."""
    import copy
    import gc
    import weakref

    base = nn.Sequential(nn.Linear(4, 3)).eval()
    explain = quantus_explain_func("epsilon")
    x, y = np.random.default_rng(0).random((2, 4), dtype=np.float32), np.array([0, 1])
    refs = []
    for _ in range(3):
        model = copy.deepcopy(base)
        explain(model, x, y)
        explain(model, x, y)  # the same model: its attributor is reused
        refs.append(weakref.ref(model))
        del model
    gc.collect()
    assert [r() is not None for r in refs] == [False, False, True]
    (attributor,) = explain.attributors.values()
    assert attributor.stats["traces"] == 1
