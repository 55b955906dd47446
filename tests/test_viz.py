"""``lrpc.viz``: the LRP picture conventions (zero is the colormap's centre, symmetric limits, red for
positive and blue for negative relevance), upscaling, overlay, token HTML / terminal text, layer plots."""

from __future__ import annotations

import sys

import pytest
import torch
from PIL import Image

from lrpc import viz

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def pixels(img: Image.Image) -> torch.Tensor:
    return torch.frombuffer(bytearray(img.convert("RGB").tobytes()), dtype=torch.uint8).view(
        img.height, img.width, 3
    )


# --- colours and limits ----------------------------------------------------------------------------
def test_colorize_endpoints_and_centre() -> None:
    assert viz.colorize(torch.tensor([-1.0, 0.0, 1.0])).tolist() == [list(BLUE), list(WHITE), list(RED)]
    assert viz.colorize(torch.tensor([-5.0, 5.0])).tolist() == [list(BLUE), list(RED)]  # clipped
    seismic = viz.colorize(torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0]), "seismic").tolist()
    assert seismic == [[0, 0, 76], [0, 0, 255], [255, 255, 255], [255, 0, 0], [128, 0, 0]]
    with pytest.raises(ValueError, match="colormap"):
        viz.colorize(torch.zeros(2), "no-such-map")


def test_zero_relevance_is_white() -> None:
    img = viz.heatmap(torch.zeros(1, 8, 8))
    assert (pixels(img) == 255).all()


def test_sign_maps_to_red_and_blue_with_symmetric_limits() -> None:
    r = torch.zeros(8, 8)
    r[0, 0], r[0, 1], r[0, 2] = 2.0, -1.0, -2.0
    img = viz.heatmap(r, scale=1)
    assert img.getpixel((0, 0)) == RED
    assert img.getpixel((2, 0)) == BLUE
    # symmetric: -1 is half way to blue whatever the positive side holds (not a min-max stretch)
    assert img.getpixel((1, 0)) == (128, 128, 255)
    assert img.getpixel((5, 5)) == WHITE
    # positive-only relevance: zero stays white, not the bottom of a min-max range
    pos = viz.heatmap(r.clamp(min=0), scale=1)
    assert pos.getpixel((0, 0)) == RED and pos.getpixel((1, 0)) == WHITE


def test_limit_and_percentile_saturate() -> None:
    r = torch.linspace(-1, 1, 64).view(8, 8)
    assert viz.heatmap(r, scale=1, limit=0.5).getpixel((6, 7)) == RED  # 0.9 > 0.5: saturated
    assert viz.symmetric_limit(r, 50.0) == pytest.approx(float(r.abs().median()), rel=0.05)
    lower = viz.heatmap(r, scale=1, percentile=50.0)
    assert lower.getpixel((7, 7)) == RED and viz.heatmap(r, scale=1).getpixel((6, 7)) != RED


def test_nan_is_grey_and_does_not_set_the_scale() -> None:
    """A NaN (or an infinity) took the colour limit with it: every pixel and token came out white."""
    grey = viz.NAN_COLOR
    r = torch.zeros(8, 8)
    r[0, 0], r[0, 1], r[0, 2], r[0, 3] = 2.0, -1.0, float("nan"), float("inf")
    assert viz.symmetric_limit(r) == 2.0
    img = viz.heatmap(r, scale=1)
    assert [img.getpixel((i, 0)) for i in range(5)] == [RED, (128, 128, 255), grey, RED, WHITE]
    over = viz.heatmap(r, scale=1, image=torch.zeros(1, 8, 8), alpha=1.0)
    assert over.getpixel((2, 0)) == grey and over.getpixel((4, 0)) == (0, 0, 0)
    spans = viz.tokens_html(["a", "b", "c"], torch.tensor([float("nan"), 1.0, -0.5])).split("<span")[1:]
    assert "background:#808080" in spans[0] and "background:#ff0000" in spans[1] and "background:#8080ff" in spans[2]
    # nothing finite to scale by: NaN still grey, an infinity still saturated
    nothing = torch.tensor([[float("nan"), 0.0, float("-inf")]])
    assert [viz.heatmap(nothing, scale=1).getpixel((i, 0)) for i in range(3)] == [grey, WHITE, BLUE]
    assert "background:#808080" in viz.tokens_html(["a"], torch.tensor([float("nan")]))


def test_channels_are_summed_or_averaged() -> None:
    r = torch.zeros(3, 4, 4)
    r[:, 0, 0] = torch.tensor([1.0, -1.0, 1.0])  # sum +1
    r[0, 1, 1] = -1.0  # sum -1
    img = viz.heatmap(r, scale=1)
    assert img.getpixel((0, 0)) == RED and img.getpixel((1, 1)) == BLUE
    custom = viz.heatmap(r, scale=1, channel_reduce=lambda t: t[1])
    assert custom.getpixel((0, 0)) == BLUE
    with pytest.raises(ValueError, match="channel_reduce"):
        viz.heatmap(r, channel_reduce="max")


def test_shapes_and_nearest_upscaling() -> None:
    r = torch.randn(1, 1, 8, 8)
    img = viz.heatmap(r)
    assert img.size == (128, 128) and img.mode == "RGB"
    px = pixels(img)
    block = px[16:32, 48:64].reshape(-1, 3)  # one source pixel -> one uniform 16x16 block
    assert (block == block[0]).all()
    assert pixels(viz.heatmap(r, scale=1)).tolist() == px[::16, ::16].tolist()
    assert viz.heatmap(torch.randn(3, 6, 4), scale=3).size == (12, 18)
    assert viz.heatmap(torch.randn(200, 100)).size == (100, 200)  # large enough: not scaled
    with pytest.raises(ValueError, match="one sample"):
        viz.heatmap(torch.randn(2, 1, 8, 8))
    with pytest.raises(ValueError, match="expected"):
        viz.heatmap(torch.randn(8))


def test_overlay_blends_by_relevance_magnitude() -> None:
    image = torch.zeros(1, 4, 4)
    image[0, 0, 0] = 1.0  # white pixel, others black after min-max scaling
    r = torch.zeros(4, 4)
    r[1, 1] = 1.0
    r[2, 2] = -0.5
    img = viz.heatmap(r, image=image, alpha=0.5, scale=1)
    assert img.getpixel((0, 0)) == WHITE  # no relevance: the input unchanged
    assert img.getpixel((3, 3)) == (0, 0, 0)
    assert img.getpixel((1, 1)) == (128, 0, 0)  # black blended with red at opacity 0.5 * 1
    blue_quarter = img.getpixel((2, 2))  # opacity 0.5 * 0.5 of the colour for -0.5
    assert blue_quarter[0] == blue_quarter[1] and blue_quarter[2] > blue_quarter[0] > 0
    pil = viz.heatmap(r, image=Image.new("RGB", (40, 40), (10, 20, 30)), scale=2)  # resized to the relevance
    assert pil.size == (8, 8) and pil.getpixel((0, 0)) == (10, 20, 30)


def test_to_image_and_grid() -> None:
    x = torch.zeros(1, 8, 8)
    x[0, 0, 0] = 1.0
    img = viz.to_image(x, scale=None, invert=True)
    assert img.size == (128, 128) and img.getpixel((0, 0)) == (0, 0, 0) and img.getpixel((100, 100)) == WHITE
    rgb = viz.to_image(torch.rand(3, 5, 7))
    assert rgb.size == (7, 5)
    g = viz.grid([rgb] * 5, columns=2, pad=1)
    assert g.size == (2 * 7 + 3, 3 * 5 + 4)
    captioned = viz.grid([rgb] * 2, columns=2, pad=1, captions=["a", "b"])
    assert captioned.height > 5 + 2
    with pytest.raises(ValueError, match="captions"):
        viz.grid([rgb] * 2, columns=2, captions=["a"])


# --- tokens ----------------------------------------------------------------------------------------
def test_tokens_html_escapes_and_has_one_span_per_token() -> None:
    tokens = ["<script>", "a&b", '"q"', "plain"]
    out = viz.tokens_html(tokens, torch.tensor([1.0, -1.0, 0.0, 0.5]))
    assert out.count("<span") == len(tokens) == out.count("</span>")
    assert "<script>" not in out and "&lt;script&gt;" in out and "a&amp;b" in out and "&quot;q&quot;" in out
    spans = out.split("<span")[1:]
    assert (
        "background:#ff0000" in spans[0]
        and "background:#0000ff" in spans[1]
        and "background:#ffffff" in spans[2]
    )


def test_tokens_are_normalised_per_sequence() -> None:
    tr = viz.TokenRelevance(
        [["a", "b"], ["c", "d", "e"]],
        [torch.tensor([100.0, 0.0]), torch.tensor([0.0, -0.01, 0.005])],
        labels=["first <1>", "second"],
    )
    html = tr.html()
    assert html.count("<span") == 5 and "first &lt;1&gt;" in html
    term = str(tr)
    assert term == tr.terminal()
    assert "\x1b[48;2;255;0;0m" in term and "\x1b[48;2;0;0;255m" in term  # both sequences reach full colour
    assert term.count("\x1b[0m") == 5
    assert tr._repr_html_() == html
    assert tr.text().splitlines()[1] == "a(+100) b(+0)"


def test_tokens_batch_tensor_terminal_and_errors(tmp_path) -> None:
    out = viz.tokens_terminal([["x", "y"], ["z", "w"]], torch.tensor([[1.0, -1.0], [0.0, 2.0]]))
    assert len(out.splitlines()) == 2
    assert "\x1b[38;2;255;255;255m" in out  # white text on a strong colour
    with pytest.raises(ValueError, match="do not match"):
        viz.tokens_html(["a", "b"], torch.ones(3))
    with pytest.raises(ValueError, match="labels"):
        viz.TokenRelevance(["a"], [1.0], labels=["x", "y"])
    page = viz.TokenRelevance(["<b>"], [1.0]).save(tmp_path / "t.html", title="T & U")
    text = page.read_text()
    assert text.startswith("<!doctype html>") and "T &amp; U" in text and "&lt;b&gt;" in text


# --- layers ----------------------------------------------------------------------------------------
def test_layer_totals() -> None:
    totals = viz.layer_totals({"a": torch.tensor([[1.0, -2.0], [3.0, 0.0]]), "b": torch.zeros(())})
    assert totals == {"a": (2.0, -1.0, 1.0), "b": (0.0, 0.0, 0.0)}


def test_layer_plot() -> None:
    pytest.importorskip("matplotlib")
    fig = viz.layer_plot({"input": torch.randn(2, 8), "fc": torch.randn(2, 4)}, title="t")
    from matplotlib.figure import Figure

    assert isinstance(fig, Figure)
    (ax,) = fig.axes
    assert len(ax.patches) == 4 and [t.get_text() for t in ax.get_xticklabels()] == ["input", "fc"]


def test_layer_plot_without_matplotlib(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails as if not installed
    with pytest.raises(ImportError, match="pip install matplotlib"):
        viz.layer_plot({"a": torch.ones(1, 2)})
