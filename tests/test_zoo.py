"""Every zoo model compiles with the default rules and no per-model code: coverage 1.0 (no fallback),
finite relevance shaped like the input, and (slow) the Inductor backend agrees with eager."""

from __future__ import annotations

import importlib.util
import warnings

import pytest
import torch

import lrpc
from lrpc import zoo

NAMES = zoo.names()
#: Zoo entries with a known gap, and why: checked to still fail (strict xfail), so a fix shows up.
KNOWN_GAPS: dict[str, str] = {}


def _params(names):
    params = []
    for n in names:
        marks = []
        needs = zoo.get(n).needs
        if needs and importlib.util.find_spec(needs) is None:
            marks.append(pytest.mark.skip(reason=f"needs {needs}"))
        if n in KNOWN_GAPS:
            marks.append(pytest.mark.xfail(reason=KNOWN_GAPS[n], strict=True))
        params.append(pytest.param(n, marks=marks))
    return params


def _relevances(res: lrpc.Attribution) -> list[torch.Tensor]:
    return list(res.inputs.values())


@pytest.mark.parametrize("name", _params(NAMES))
def test_zoo_model_is_fully_covered(name: str) -> None:
    model, args, kwargs = zoo.build(name)
    attributor = lrpc.compile(model, backend="eager")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = attributor(*args, **kwargs)
    ours = [str(w.message) for w in caught if "lrpc" in str(w.message) or "training mode" in str(w.message)]
    assert not ours, ours  # no gradient fallback, no training-mode model
    report = attributor.report()
    assert report.coverage == 1.0 and not report.fallbacks, str(report)
    relevances = _relevances(res)
    assert relevances, "no input received relevance"
    tensors = {n: t for n, t in zip(attributor.program(*args, **kwargs).signature.input_names, [*args, *kwargs.values()])}
    for input_name, r in res.inputs.items():
        assert torch.isfinite(r).all(), input_name
        x = tensors[input_name]
        assert r.shape == (x.shape if x.is_floating_point() else x.shape[:2]), (input_name, r.shape)
    assert any(r.abs().sum() > 0 for r in relevances), "all relevance is zero: the check would be vacuous"
    assert not [n for n in res.inputs if "mask" in n], "attention masks are constants, not explained inputs"


def test_zoo_has_the_papers_architectures() -> None:
    paper = {e.name for e in zoo.entries() if e.paper}
    assert {"vgg16", "vgg16-bn", "resnet50", "vit-b16", "efficientnet-v2"} <= paper


@pytest.mark.slow
@pytest.mark.parametrize("name", _params(NAMES))
def test_zoo_model_inductor_matches_eager(name: str) -> None:
    model, args, kwargs = zoo.build(name)
    eager = lrpc.compile(model, backend="eager")(*args, **kwargs)
    compiled = lrpc.compile(model, backend="inductor")(*args, **kwargs)
    for key, r in eager.inputs.items():
        torch.testing.assert_close(compiled.inputs[key], r, rtol=1e-5, atol=1e-5 * float(r.abs().max()))
