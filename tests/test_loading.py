"""lrpc.loading: which arguments are files and which are text, how wide-range images are scaled, and
``python -m lrpc``."""

from __future__ import annotations

import runpy
import sys

import pytest
import torch
from PIL import Image
from torch import nn

from lrpc.errors import LRPCError
from lrpc.loading import LoadedModel, load_inputs


def text_model() -> LoadedModel:
    """A stand-in token model: ``load_inputs`` needs only its example's dtype and a tokenizer."""
    ids = torch.zeros(1, 4, dtype=torch.long)
    return LoadedModel(nn.Identity(), (), {"input_ids": ids}, tokenizer=object())


def image_model(channels: int, height: int = 2, width: int = 3) -> LoadedModel:
    """A stand-in image model of the image's own size: no resize blurs the pixels."""
    return LoadedModel(nn.Identity(), (torch.zeros(1, channels, height, width),), {})


def test_a_missing_file_is_an_error_not_text(tmp_path) -> None:
    review = tmp_path / "review.txt"
    review.write_text("a great film")
    items = load_inputs(["a great film.", "review", "version 1.5", str(review)], text_model())
    assert [i.text for i in items] == ["a great film.", "review", "version 1.5", "a great film"]
    assert items[-1].name == "review"
    for missing in ("no_such_review.txt", "no_such_image.PNG", "no_such_batch.pt"):
        with pytest.raises(LRPCError, match=f"no such input file '.*{missing}'"):
            load_inputs([str(tmp_path / missing)], text_model())
    with pytest.raises(LRPCError, match="no such input file"):  # a float model says the same
        load_inputs([str(tmp_path / "no_such_review.txt")], image_model(1))


def test_a_text_file_that_is_not_utf8_is_an_error(tmp_path) -> None:
    """It ended in a UnicodeDecodeError traceback."""
    (tmp_path / "latin1.txt").write_bytes("un très bon film".encode("latin-1"))
    with pytest.raises(LRPCError, match=r"cannot read text file '.*latin1.txt': .*codec can't decode"):
        load_inputs([str(tmp_path / "latin1.txt")], text_model())


@pytest.mark.parametrize("mode, suffix", [("I;16", ".png"), ("I", ".tif")])  # "I": 32-bit, 16-bit data
def test_16_bit_grey_images_are_scaled_not_clipped(tmp_path, mode, suffix) -> None:
    values = [0, 255, 1000, 30000, 60000, 65535]
    img = Image.new(mode, (3, 2))
    img.putdata(values)
    path = tmp_path / f"ramp{suffix}"
    img.save(path)
    assert Image.open(path).mode == mode
    expected = torch.tensor(values, dtype=torch.float64).view(1, 2, 3) / 65535
    (grey,) = load_inputs([str(path)], image_model(1))
    assert torch.allclose(grey.tensor.double(), expected, atol=1e-6)
    (rgb,) = load_inputs([str(path)], image_model(3))  # grey repeated over the channels
    assert torch.allclose(rgb.tensor.double(), expected.expand(3, 2, 3), atol=1e-6)
    # the picture kept for overlays is 8-bit and scaled the same way
    assert rgb.image.mode == "RGB" and rgb.image.getpixel((0, 1))[0] == round(30000 / 65535 * 255)


def test_8_bit_images_unchanged(tmp_path) -> None:
    img = Image.new("L", (3, 2))
    img.putdata([0, 1, 64, 128, 254, 255])
    img.save(tmp_path / "grey.png")
    (item,) = load_inputs([str(tmp_path / "grey.png")], image_model(1))
    assert torch.equal(item.tensor, torch.tensor([[[0, 1, 64], [128, 254, 255]]], dtype=torch.float32) / 255)


def test_python_dash_m_lrpc(monkeypatch, capsys) -> None:
    monkeypatch.setattr(sys, "argv", ["lrpc", "--help"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_module("lrpc", run_name="__main__")
    assert exit_.value.code == 0 and "explain" in capsys.readouterr().out
