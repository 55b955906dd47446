"""Measured faithfulness: perturbation curves and the area between them (ABPC).

An explanation is faithful when the features it calls most relevant are the ones the model's score
depends on. The perturbation test measures this without ground truth (Samek et al. 2017, "Evaluating the
visualization of what a deep neural network has learned"; the MoRF / LeRF pair and the area between
them as in Blücher et al. 2024 and the DynamicLRP paper):

1. order each sample's features by relevance;
2. **MoRF** (most relevant first): replace the features by a baseline in ``steps`` equal steps, the most
   relevant first, and record the model's score for the explained target after each step;
3. **LeRF** (least relevant first): the same, the least relevant first;
4. **ABPC** = area between the two curves, LeRF minus MoRF, over the fraction of features removed.

A faithful explanation makes the score fall fast under MoRF and stay up under LeRF: a high ABPC. A random
ordering gives about 0, an ordering that has the sign backwards a negative ABPC.

Conventions (all per sample):

- The **target** is fixed on the clean input (``target=None``: its arg max) and kept while features are
  removed; the score is that output (a logit, a similarity: whatever ``model_fn`` returns), not a
  softmax probability.
- **Steps.** After step ``i`` of ``k`` the ``round(i · n / k)`` first features of the order are removed,
  ``n`` the sample's number of removable features. Point 0 is the clean input, point ``k`` has every
  removable feature removed; both curves share these two points.
- **Area.** Trapezoidal rule over the fraction removed, ``i / k`` in [0, 1]. Because both curves share
  their end points, ``ABPC = (1/k) · Σ_{i=1}^{k-1} (LeRF_i − MoRF_i)``: the mean gap between the curves,
  independent of the number of steps or features.
- **Normalisation.** ``normalize="none"`` (default): in the units of the score (logits, cosine
  similarity), which is what the benchmark reports: comparable between explanation methods on the same
  model and data, not between models. ``normalize="clean"``: every curve divided by ``|clean score|``
  (the sample's score before any removal), so ABPC is a fraction of the prediction; it is unstable for
  scores near 0.
- **Ties** in the relevance are broken by a seeded random permutation (``seed``), the same for MoRF and
  LeRF, so that a constant relevance scores about 0 rather than whatever the memory order gives.

Features:

- **Float inputs** (images, tabular): one feature per element, except the channel dimension, which is
  removed as a whole and whose relevance is summed (``channel_dim="auto"``: dimension 1 for inputs of
  rank >= 4, i.e. ``(B, C, H, W)``; none for ``(B, D)``). ``patch_size=p`` groups the remaining grid into
  ``p x p`` patches (relevance summed per patch). The baseline is a number or a tensor broadcastable to
  the input (the data set mean image, a blurred copy, ...).
- **Token inputs** (integer ids ``(B, T)``): one feature per token; removal replaces the id by
  ``baseline`` (a mask or pad token id); the attention mask stays as it was. ``mask`` (e.g. the attention
  mask, with special tokens zeroed) says which tokens may be removed: padding never is and does not count
  in ``n``. Relevance ``(B, T)`` as lrpc returns it for token ids, or ``(B, T, D)`` (summed over ``D``).

>>> import torch
>>> from lrpc.evaluate import perturbation_curves
>>> w = torch.tensor([4.0, 3.0, 2.0, 1.0])
>>> model_fn = lambda x: x @ w                      # (B,) scores: no target needed
>>> x = torch.ones(1, 4)
>>> curves = perturbation_curves(model_fn, x, x * w, steps=4, baseline=0.0)
>>> curves.morf.tolist(), curves.lerf.tolist()
([[10.0, 6.0, 3.0, 1.0, 0.0]], [[10.0, 9.0, 7.0, 4.0, 0.0]])
>>> curves.abpc.tolist()                             # (3 + 4 + 3) / 4
[2.5]
>>> perturbation_curves(model_fn, x, -x * w, steps=4).abpc.tolist()   # the order backwards
[-2.5]
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import torch
from torch import Tensor, nn

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

    from .presets import Preset

__all__ = ["Curves", "Summary", "perturbation_curves", "quantus_explain_func"]

Target = None | int | Tensor | Callable[[Tensor], Tensor]


class Summary(NamedTuple):
    """Mean over samples, its standard error (sample std / sqrt(n)) and the number of samples."""

    mean: float
    sem: float
    n: int

    def __str__(self) -> str:
        return f"{self.mean:.4g} ± {self.sem:.2g} (n={self.n})"


@dataclass
class Curves:
    """Perturbation curves of a batch, one row per sample.

    ``morf`` and ``lerf`` are ``(B, steps + 1)``: the target score after each step (divided by
    ``|clean|`` when ``normalize == "clean"``), point 0 being the clean input. ``fractions`` is the
    nominal fraction removed per point, ``i / steps``; ``removed`` the number of features actually removed
    per sample and point; ``clean`` the unnormalised clean score ``(B,)``; ``target`` the explained class
    per sample (``None`` for scalar outputs or a callable target).
    """

    morf: Tensor
    lerf: Tensor
    fractions: Tensor
    removed: Tensor
    clean: Tensor
    target: Tensor | None
    normalize: str = "none"

    @property
    def auc_morf(self) -> Tensor:
        """Area under the MoRF curve per sample (trapezoidal, over the fraction removed): lower is better."""
        return torch.trapezoid(self.morf, self.fractions, dim=-1)

    @property
    def auc_lerf(self) -> Tensor:
        """Area under the LeRF curve per sample: higher is better."""
        return torch.trapezoid(self.lerf, self.fractions, dim=-1)

    @property
    def abpc(self) -> Tensor:
        """Area between the curves per sample, ``auc_lerf - auc_morf`` ``(B,)``: higher is better."""
        return self.auc_lerf - self.auc_morf

    def summary(self, values: Tensor | None = None) -> Summary:
        """Mean ± standard error of ``values`` (default: :attr:`abpc`) over the samples."""
        v = (self.abpc if values is None else values).double().flatten()
        n = v.numel()
        sem = float(v.std(correction=1) / math.sqrt(n)) if n > 1 else float("nan")
        return Summary(float(v.mean()), sem, n)

    @staticmethod
    def cat(parts: Sequence[Curves]) -> Curves:
        """Concatenate curves of several batches (same ``steps`` and ``normalize``) along the samples."""
        first = parts[0]
        if any(p.morf.shape[1] != first.morf.shape[1] or p.normalize != first.normalize for p in parts):
            raise ValueError("curves to concatenate need the same number of steps and the same normalize")
        targets = [p.target for p in parts]
        return Curves(
            morf=torch.cat([p.morf for p in parts]),
            lerf=torch.cat([p.lerf for p in parts]),
            fractions=first.fractions,
            removed=torch.cat([p.removed for p in parts]),
            clean=torch.cat([p.clean for p in parts]),
            target=None if any(t is None for t in targets) else torch.cat(targets),
            normalize=first.normalize,
        )


# --- helpers ------------------------------------------------------------------------------------------
def _first_tensor(out: Any) -> Tensor:
    if isinstance(out, Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    raise TypeError(f"model_fn must return a tensor (or an output with .logits), got {type(out).__name__}")


def _resolve_target(out: Tensor, target: Target) -> tuple[Target, Tensor | None]:
    """The target to keep for every step, fixed on the clean output, and the class index it names."""
    if callable(target):
        return target, None
    if out.dim() == 1:
        if target is not None:
            raise ValueError("model_fn returns one score per sample (B,): leave target=None")
        return None, None
    if out.dim() != 2:
        raise ValueError(f"model_fn output has shape {tuple(out.shape)}: pass a callable target -> (B,)")
    b = out.shape[0]
    if target is None:
        index = out.argmax(-1)
    elif isinstance(target, int):
        index = torch.full((b,), target, dtype=torch.long, device=out.device)
    else:
        index = torch.as_tensor(target, device=out.device).long().reshape(-1).expand(b)
    return index, index


def _scores(out: Any, target: Target) -> Tensor:
    out = _first_tensor(out)
    if callable(target):
        s = target(out)
    elif target is None:
        s = out
    else:
        s = out.gather(-1, target[:, None]).squeeze(-1)
    if s.dim() != 1:
        raise ValueError(f"the target score must have shape (B,), got {tuple(s.shape)}")
    return s.detach().double()


def _channel_dim(x: Tensor, channel_dim: int | None | str) -> int | None:
    if channel_dim == "auto":
        return 1 if x.dim() >= 4 else None
    if channel_dim is None:
        return None
    d = int(channel_dim) % x.dim()
    if d == 0:
        raise ValueError("channel_dim cannot be the batch dimension")
    return d


# --- the curves ---------------------------------------------------------------------------------------
@torch.no_grad()
def perturbation_curves(
    model_fn: Callable[[Tensor], Any],
    x: Tensor,
    relevance: Tensor,
    *,
    target: Target = None,
    steps: int | None = 20,
    baseline: float | Tensor = 0,
    mask: Tensor | None = None,
    channel_dim: int | None | Literal["auto"] = "auto",
    patch_size: int | Sequence[int] = 1,
    normalize: Literal["none", "clean"] = "none",
    seed: int = 0,
) -> Curves:
    """MoRF and LeRF perturbation curves of ``model_fn`` at ``x`` for the feature order ``relevance`` gives.

    Args:
        model_fn: called with a perturbed copy of ``x`` (same shape, dtype and device) and returns the
            model's output: ``(B,)`` scores or ``(B, C)`` logits (a tuple or an output with ``.logits``:
            its first tensor). Close over the other arguments, e.g. ``lambda ids: model(ids, mask, ref)``.
        x: the clean batch: float ``(B, ...)`` or integer token ids ``(B, T)``.
        relevance: one value per element of ``x`` (float inputs; summed over the channel dimension and
            over patches), or already per feature ``(B, *grid)``; for token ids ``(B, T)`` or ``(B, T, D)``.
        target: ``None`` (the clean output's arg max for ``(B, C)`` outputs; scalar outputs need none),
            a class index, a LongTensor of one class per sample, or a callable ``output -> (B,)`` score.
            Fixed on the clean input and kept for every step.
        steps: number of removal steps ``k``; the curves have ``k + 1`` points. ``None``: one feature per
            step for the sample with the most features.
        baseline: what removed features become: a number or a tensor broadcastable to ``x`` (float), or a
            token id (token inputs: the tokenizer's mask or pad id).
        mask: which features may be removed (nonzero) ``(B, *grid)``, e.g. the attention mask; ``None``:
            all. Features outside it are never touched and do not count. With ``patch_size > 1`` give it
            per patch, or per grid element (a patch counts when all of its elements do).
        channel_dim: the dimension removed as a whole with each feature (relevance summed over it);
            ``"auto"``: 1 for float inputs of rank >= 4, else none. Ignored for token ids.
        patch_size: group the feature grid into patches of this size per grid dimension (an int applies
            to all); each grid dimension must be divisible by it.
        normalize: ``"none"`` (score units) or ``"clean"`` (curves divided by ``|clean score|``).
        seed: seeds the random permutation that breaks ties in the relevance.

    Returns:
        :class:`Curves` with ``.morf``, ``.lerf``, ``.abpc`` (per sample) and ``.summary()``.

    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
    >>> x = torch.rand(2, 1, 4, 4)
    >>> x.requires_grad_(True); logits = model(x)        # doctest: +ELLIPSIS
    tensor(...)
    >>> grad, = torch.autograd.grad(logits.gather(1, logits.argmax(1, keepdim=True)).sum(), x)
    >>> curves = perturbation_curves(model, x.detach(), grad * x.detach(), steps=8, patch_size=2)
    >>> curves.morf.shape, curves.removed[0].tolist()    # 4 patches of 2x2, removed in 8 steps
    (torch.Size([2, 9]), [0, 1, 1, 2, 2, 3, 3, 4, 4])
    >>> bool((curves.abpc > 0).all())                    # gradient x input is exact on a linear model
    True
    """
    if normalize not in ("none", "clean"):
        raise ValueError(f"normalize must be 'none' or 'clean', got {normalize!r}")
    x = x.detach()
    relevance = relevance.detach()
    b = x.shape[0]
    tokens = not (x.is_floating_point() or x.is_complex())

    # features: a grid (B, *grid), mapped back to x's shape by `expand`
    if tokens:
        if x.dim() != 2:
            raise ValueError(f"token inputs must be (B, T), got {tuple(x.shape)}")
        cd = None
        grid = tuple(x.shape[1:])
        if relevance.dim() == 3:
            relevance = relevance.sum(-1)
        patch: tuple[int, ...] = (1,)
    else:
        cd = _channel_dim(x, channel_dim)
        grid = tuple(s for d, s in enumerate(x.shape) if d not in (0, cd))
        patch = (patch_size,) * len(grid) if isinstance(patch_size, int) else tuple(patch_size)
        if len(patch) != len(grid):
            raise ValueError(f"patch_size {patch} does not match the feature grid {grid}")
        if relevance.shape == x.shape and cd is not None:
            relevance = relevance.sum(cd)
    if tuple(relevance.shape) != (b, *grid):
        raise ValueError(
            f"relevance of shape {tuple(relevance.shape)} does not fit the input {tuple(x.shape)} "
            f"(expected {tuple(x.shape)} or per feature {(b, *grid)})"
        )
    if any(g % p for g, p in zip(grid, patch)):
        raise ValueError(f"the feature grid {grid} is not divisible by patch_size {patch}")
    pgrid = tuple(g // p for g, p in zip(grid, patch))

    def pool(t: Tensor, reduce: str) -> Tensor:  # (B, *grid) -> (B, *pgrid)
        if all(p == 1 for p in patch):
            return t
        split = [b] + [s for n, p in zip(pgrid, patch) for s in (n, p)]
        t = t.reshape(split)
        dims = tuple(range(2, 2 * len(pgrid) + 1, 2))
        return t.sum(dims) if reduce == "sum" else _all(t, dims)

    def expand(f: Tensor) -> Tensor:  # (B, *pgrid) bool -> x's shape
        for d, p in enumerate(patch):
            if p > 1:
                f = f.repeat_interleave(p, dim=d + 1)
        if cd is not None:
            f = f.unsqueeze(cd)
        return f.expand(x.shape)

    rel = pool(relevance.to(device=x.device, dtype=torch.float64), "sum").reshape(b, -1)  # kept on the CPU, say
    n_features = rel.shape[1]
    if mask is None:
        eligible = torch.ones(b, n_features, dtype=torch.bool, device=x.device)
    else:
        mask = torch.as_tensor(mask, device=x.device)
        if tuple(mask.shape) == (b, *pgrid):
            eligible = mask.bool().reshape(b, -1)
        elif tuple(mask.shape) == (b, *grid):
            eligible = pool(mask.bool(), "all").reshape(b, -1)
        else:
            raise ValueError(f"mask of shape {tuple(mask.shape)} fits neither {(b, *grid)} nor {(b, *pgrid)}")
    n = eligible.sum(1)  # (B,)
    k = int(n.max()) if steps is None else int(steps)
    if k < 1:
        raise ValueError("steps must be at least 1 (and some feature must be removable)")

    # rank of each feature in MoRF and LeRF order; features outside the mask rank last in both
    generator = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n_features, generator=generator).to(x.device)
    inf = torch.tensor(float("inf"), dtype=rel.dtype, device=rel.device)

    def ranks(key: Tensor, descending: bool) -> Tensor:
        order = perm[torch.sort(key[:, perm], dim=1, descending=descending, stable=True).indices]
        r = torch.empty_like(order)
        r.scatter_(1, order, torch.arange(n_features, device=x.device).expand(b, -1))
        return r

    rank_morf = ranks(torch.where(eligible, rel, -inf), descending=True)
    rank_lerf = ranks(torch.where(eligible, rel, inf), descending=False)

    if isinstance(baseline, Tensor):
        base = baseline.to(device=x.device, dtype=x.dtype)
    else:
        base = torch.tensor(baseline, device=x.device, dtype=x.dtype)
    base = torch.broadcast_to(base, x.shape)

    def perturbed(rank: Tensor, m: Tensor) -> Tensor:
        removed = (rank < m[:, None]).reshape(b, *pgrid)
        return torch.where(expand(removed), base, x)

    clean_out = _first_tensor(model_fn(x))
    kept_target, index = _resolve_target(clean_out, target)
    clean = _scores(clean_out, kept_target)
    morf, lerf, removed = [clean], [clean], [torch.zeros_like(n)]
    for i in range(1, k + 1):
        m = torch.div(2 * i * n + k, 2 * k, rounding_mode="floor")  # round(i * n / k), halves up
        removed.append(m)
        morf.append(_scores(model_fn(perturbed(rank_morf, m)), kept_target))
        # the last point removes every eligible feature in both orders: the same input
        lerf.append(morf[-1] if i == k else _scores(model_fn(perturbed(rank_lerf, m)), kept_target))
    morf_t, lerf_t = torch.stack(morf, 1), torch.stack(lerf, 1)
    if normalize == "clean":
        scale = clean.abs().clamp_min(torch.finfo(torch.float64).tiny)[:, None]
        morf_t, lerf_t = morf_t / scale, lerf_t / scale
    return Curves(
        morf=morf_t.cpu(),
        lerf=lerf_t.cpu(),
        fractions=torch.arange(k + 1, dtype=torch.float64) / k,
        removed=torch.stack(removed, 1).cpu(),
        clean=clean.cpu(),
        target=None if index is None else index.cpu(),
        normalize=normalize,
    )


def _all(t: Tensor, dims: tuple[int, ...]) -> Tensor:
    t = t.bool()
    for d in sorted(dims, reverse=True):
        t = t.all(d)
    return t


# --- Quantus ------------------------------------------------------------------------------------------
def quantus_explain_func(
    rules: str | Preset = "epsilon",
    *,
    backend: str = "eager",
    reduce_axes: Sequence[int] | None = None,
    **compile_options: Any,
) -> Callable[..., np.ndarray]:
    """An ``explain_func`` for Quantus (``quantus.Metric(...)(model, x_batch, y_batch,
    explain_func=quantus_explain_func("epsilon-plus-flat"))``): lrpc explanations as numpy arrays.

    Quantus calls ``explain_func(model=..., inputs=..., targets=..., **explain_func_kwargs)`` with numpy
    (or torch) inputs and class indices; the returned function compiles ``model`` with ``rules`` on first
    use, explains ``targets`` and returns the input relevance as a float numpy array of the inputs' shape,
    or summed over ``reduce_axes`` with the axes kept (``reduce_axes=(1,)``: one channel, the
    ``(B, 1, H, W)`` shape several Quantus metrics expect). ``device=`` in the call's keyword arguments
    moves the inputs there (default: the model's parameters' device); other keyword arguments Quantus
    passes along are ignored. Quantus itself is not needed to build or call it.

    Calls on the same model object reuse its :class:`lrpc.Attributor`; a call on another model (one of
    Quantus' randomised copies) compiles one for it and drops the previous one, so that only the latest
    model is kept alive (an attributor holds its model). ``explain_func.attributors`` maps the latest
    model to its attributor.

    >>> import numpy as np, torch
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
    ...                             torch.nn.Linear(4 * 6 * 6, 5)).eval()
    >>> explain = quantus_explain_func("epsilon", reduce_axes=(1,))
    >>> a = explain(model, np.random.rand(2, 3, 8, 8).astype("float32"), np.array([1, 4]))
    >>> type(a).__name__, a.shape
    ('ndarray', (2, 1, 8, 8))
    """
    from .attributor import compile as lrpc_compile

    # only the latest model's attributor: it references its model, so a cache of every model seen (even
    # weakly keyed) would keep them all alive, and the randomisation metrics make one per layer
    cache: dict[nn.Module, Any] = {}

    def explain_func(model: nn.Module, inputs: Any, targets: Any, **kwargs: Any) -> np.ndarray:
        if not isinstance(model, nn.Module) and hasattr(model, "get_model"):
            model = model.get_model()  # a Quantus ModelInterface wrapper
        attributor = cache.get(model)
        if attributor is None:
            cache.clear()  # before compiling, so that the previous model can be freed meanwhile
            attributor = cache[model] = lrpc_compile(model, rules=rules, backend=backend, **compile_options)
        param = next(model.parameters(), None)
        device = kwargs.get("device") or (param.device if param is not None else "cpu")
        x = torch.as_tensor(inputs, device=device)
        if x.is_floating_point() and param is not None and param.is_floating_point():
            x = x.to(param.dtype)
        t = torch.as_tensor(targets, device=device).long().reshape(-1).expand(x.shape[0])
        relevance = attributor(x, target=t).relevance
        if isinstance(relevance, tuple):
            relevance = relevance[0]
        out = relevance.detach().float().cpu().numpy()
        if reduce_axes:
            out = out.sum(axis=tuple(reduce_axes), keepdims=True)
        return out

    explain_func.attributors = cache  # type: ignore[attr-defined]  # latest model -> Attributor, for inspection
    explain_func.__name__ = f"lrpc_{rules if isinstance(rules, str) else getattr(rules, 'name', 'preset')}"
    return explain_func
