"""Pictures of relevance in the LRP conventions: a diverging colormap centred on zero with symmetric
limits, red for positive relevance (evidence for the explained output), blue for negative (evidence
against), white for none.

- :func:`heatmap`: an image's relevance as a PIL image (channels summed, tiny images upscaled, optional
  overlay on the input).
- :class:`TokenRelevance`, :func:`tokens_html`, :func:`tokens_terminal`: token relevance as coloured
  HTML (renders in notebooks) or ANSI 24-bit colour text.
- :func:`layer_plot`: positive, negative and net relevance per layer as a matplotlib figure.
- :func:`to_image`, :func:`grid`, :func:`colorize`: the building blocks.

Only Pillow is needed (no numpy, no matplotlib); :func:`layer_plot` needs matplotlib.

>>> import torch, lrpc
>>> from lrpc.models import digits_cnn, digits_examples
>>> x, labels = digits_examples()
>>> res = lrpc.compile(digits_cnn(), rules="epsilon-plus-flat", backend="eager")(x[:2])
>>> heatmap(res.relevance[0]).size            # 8x8 upscaled 16x, nearest neighbour
(128, 128)
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

ArrayLike = Any  # a Tensor, a numpy array or nested lists: anything torch.as_tensor takes

# Piecewise-linear colormaps as (position in [0, 1], (r, g, b) in [0, 1]) anchors, from matplotlib's
# definitions, so that the pictures need no matplotlib.
COLORMAPS: dict[str, list[tuple[float, tuple[float, float, float]]]] = {
    "bwr": [(0.0, (0.0, 0.0, 1.0)), (0.5, (1.0, 1.0, 1.0)), (1.0, (1.0, 0.0, 0.0))],
    "seismic": [
        (0.0, (0.0, 0.0, 0.3)),
        (0.25, (0.0, 0.0, 1.0)),
        (0.5, (1.0, 1.0, 1.0)),
        (0.75, (1.0, 0.0, 0.0)),
        (1.0, (0.5, 0.0, 0.0)),
    ],
}

MIN_SIZE = 128  # tiny images are upscaled (nearest) until their longer side reaches this
#: The colour of NaN relevance: grey, on no diverging colormap's scale (a NaN is a fault to see, not a value)
NAN_COLOR = (128, 128, 128)


def colorize(values: ArrayLike, cmap: str = "bwr") -> Tensor:
    """Map values in [-1, 1] (clipped) to RGB ``uint8``, shape ``values.shape + (3,)``; 0 maps to the
    colormap's centre, NaN to :data:`NAN_COLOR`. ``cmap``: ``"bwr"``, ``"seismic"`` or, with matplotlib
    installed, any of its names.

    >>> colorize(torch.tensor([-1.0, 0.0, 1.0, float("nan")])).tolist()
    [[0, 0, 255], [255, 255, 255], [255, 0, 0], [128, 128, 128]]
    """
    values = torch.as_tensor(values, dtype=torch.float64)
    nan = values.isnan()
    t = (values.nan_to_num(0.0).clamp(-1, 1) + 1) / 2
    if cmap in COLORMAPS:
        anchors = COLORMAPS[cmap]
        pos = torch.tensor([p for p, _ in anchors], dtype=torch.float64)
        rgb = torch.tensor([c for _, c in anchors], dtype=torch.float64)
        seg = (torch.bucketize(t, pos, right=True) - 1).clamp(0, len(anchors) - 2)
        frac = ((t - pos[seg]) / (pos[seg + 1] - pos[seg])).unsqueeze(-1)
        out = rgb[seg] * (1 - frac) + rgb[seg + 1] * frac
    else:
        try:
            import matplotlib
        except ImportError:
            raise ValueError(
                f"unknown colormap {cmap!r}: built in are {sorted(COLORMAPS)}; others need `pip install matplotlib`"
            ) from None
        if cmap not in matplotlib.colormaps:
            raise ValueError(
                f"unknown colormap {cmap!r}: neither built in {sorted(COLORMAPS)} nor matplotlib's"
            )
        out = torch.as_tensor(matplotlib.colormaps[cmap](t.numpy())[..., :3])
    rgb = (out * 255).round().to(torch.uint8)
    rgb[nan] = torch.tensor(NAN_COLOR, dtype=torch.uint8)
    return rgb


def _pil(rgb: Tensor) -> Image.Image:
    """An ``(H, W, 3)`` uint8 tensor as a PIL image (via bytes: torch does not require numpy)."""
    h, w, _ = rgb.shape
    return Image.frombytes("RGB", (w, h), bytes(rgb.contiguous().flatten().tolist()))


def _plane(x: ArrayLike, what: str, reduce: str | Callable[[Tensor], Tensor] = "sum") -> Tensor:
    """One sample's ``(H, W)`` plane from ``(H, W)``, ``(C, H, W)`` or ``(1, C, H, W)``."""
    t = torch.as_tensor(x).detach().cpu().to(torch.float64)
    if t.dim() == 4:
        if t.shape[0] != 1:
            raise ValueError(f"{what}: one sample at a time, got a batch of {t.shape[0]}; pass {what}[i]")
        t = t[0]
    if t.dim() == 3:
        if callable(reduce):
            return reduce(t)
        if reduce not in ("sum", "mean"):
            raise ValueError(f"channel_reduce must be 'sum', 'mean' or a callable, got {reduce!r}")
        return t.sum(0) if reduce == "sum" else t.mean(0)
    if t.dim() != 2:
        raise ValueError(f"{what}: expected (H, W), (C, H, W) or (1, C, H, W), got shape {tuple(t.shape)}")
    return t


def _scale_for(h: int, w: int, scale: int | None) -> int:
    return scale if scale is not None else max(1, math.ceil(MIN_SIZE / max(h, w)))


def symmetric_limit(relevance: ArrayLike, percentile: float = 100.0) -> float:
    """The colour limit: the ``percentile`` of ``|relevance|`` (100: its maximum), over its finite values
    (a NaN or infinity would leave no scale for the rest). Values beyond it saturate; the colormap spans
    ``[-limit, limit]`` so that zero is its centre.

    >>> symmetric_limit(torch.tensor([-4.0, 1.0, 2.0, float("nan")]))
    4.0
    """
    a = torch.as_tensor(relevance).detach().abs().flatten().to(torch.float64)
    a = a[a.isfinite()]
    if a.numel() == 0:
        return 0.0
    if percentile >= 100:
        return float(a.max())
    return float(torch.quantile(a, percentile / 100))


def _scaled(r: Tensor, limit: float) -> Tensor:
    """``r / limit``, for :func:`colorize`; with no scale (no finite non-zero value) zeros, with NaN and
    infinities kept as NaN and ±1."""
    if limit > 0:
        return r / limit
    return torch.where(r.isnan(), r, r.sign() * r.isinf())


def to_image(x: ArrayLike | Image.Image, *, scale: int | None = 1, invert: bool = False) -> Image.Image:
    """An input image as an RGB PIL image: a tensor ``(H, W)``, ``(C, H, W)`` (C = 1 or 3) or
    ``(1, C, H, W)`` is scaled to [0, 255] by its own min and max; ``invert`` swaps dark and light (the
    digits data set has ink 1 on background 0: inverted shows dark ink on white). ``scale=None``
    upscales tiny images like :func:`heatmap`.

    >>> to_image(torch.rand(1, 8, 8), scale=None).size
    (128, 128)
    """
    if isinstance(x, Image.Image):
        img = x.convert("RGB")
    else:
        t = torch.as_tensor(x).detach().cpu().to(torch.float64)
        if t.dim() == 4 and t.shape[0] == 1:
            t = t[0]
        if t.dim() == 2:
            t = t.unsqueeze(0)
        if t.dim() != 3 or t.shape[0] not in (1, 3):
            raise ValueError(
                f"image: expected (H, W), (C, H, W) with C = 1 or 3, got shape {tuple(torch.as_tensor(x).shape)}"
            )
        low, high = t.min(), t.max()
        t = (t - low) / (high - low) if high > low else torch.zeros_like(t)
        t = t.expand(3, -1, -1).permute(1, 2, 0)
        img = _pil((t * 255).round().to(torch.uint8))
    if invert:
        img = Image.eval(img, lambda v: 255 - v)
    s = _scale_for(img.height, img.width, scale)
    return img.resize((img.width * s, img.height * s), Image.Resampling.NEAREST) if s != 1 else img


def heatmap(
    relevance: ArrayLike,
    *,
    image: ArrayLike | Image.Image | None = None,
    channel_reduce: str | Callable[[Tensor], Tensor] = "sum",
    cmap: str = "bwr",
    percentile: float = 100.0,
    limit: float | None = None,
    alpha: float = 0.8,
    scale: int | None = None,
) -> Image.Image:
    """One sample's relevance as a picture.

    Args:
        relevance: ``(H, W)``, ``(C, H, W)`` or ``(1, C, H, W)`` (a tensor or array).
        image: the input, to overlay the heatmap on (a tensor as in :func:`to_image`, or a PIL image;
            resized to the relevance's size). Each pixel is blended with its colour at opacity
            ``alpha * |R| / limit``: where there is no relevance the input shows unchanged.
        channel_reduce: ``"sum"`` (LRP: a pixel's relevance is the sum over its channels), ``"mean"``
            or a callable ``(C, H, W) -> (H, W)``.
        cmap: a diverging colormap, centred on zero (see :func:`colorize`).
        percentile, limit: the symmetric colour limit is ``limit``, or the ``percentile`` of ``|R|``
            (default 100: the maximum, so nothing saturates). All-zero relevance is all centre colour;
            NaN is :data:`NAN_COLOR` (over an image, at opacity ``alpha``).
        alpha: the overlay's largest opacity.
        scale: integer upscaling, nearest neighbour; default: the smallest that makes the longer side at
            least 128 pixels (8x8 digits: 16x), 1 for larger images.

    >>> r = torch.zeros(8, 8); r[0, 0], r[0, 1] = 1.0, -0.5
    >>> img = heatmap(r, scale=1)
    >>> img.getpixel((0, 0)), img.getpixel((1, 0)), img.getpixel((2, 0))
    ((255, 0, 0), (128, 128, 255), (255, 255, 255))
    >>> heatmap(r, image=torch.rand(1, 8, 8)).size
    (128, 128)
    """
    r = _plane(relevance, "relevance", channel_reduce)
    v = _scaled(r, float(limit) if limit is not None else symmetric_limit(r, percentile))
    rgb = colorize(v, cmap).to(torch.float64)
    if image is not None:
        base = to_image(image, scale=1).resize((r.shape[1], r.shape[0]), Image.Resampling.BILINEAR)
        pixels = (
            torch.frombuffer(bytearray(base.tobytes()), dtype=torch.uint8).view(*r.shape, 3).to(torch.float64)
        )
        opacity = (alpha * v.abs().nan_to_num(1.0).clamp(max=1)).unsqueeze(-1)
        rgb = pixels * (1 - opacity) + rgb * opacity
    img = _pil(rgb.round().to(torch.uint8))
    s = _scale_for(img.height, img.width, scale)
    return img.resize((img.width * s, img.height * s), Image.Resampling.NEAREST) if s != 1 else img


def grid(
    images: Sequence[Image.Image],
    columns: int,
    *,
    pad: int = 4,
    captions: Sequence[str] | None = None,
    background: str = "white",
) -> Image.Image:
    """Images tiled row by row, ``columns`` per row, ``pad`` pixels apart, with an optional caption
    under each (cells are as large as the largest image).

    >>> grid([heatmap(torch.randn(8, 8))] * 3, columns=2, captions=["a", "b", "c"]).size[0]
    268
    """
    if not images:
        raise ValueError("grid: no images")
    if captions is not None and len(captions) != len(images):
        raise ValueError(f"grid: {len(captions)} captions for {len(images)} images")
    font = ImageFont.load_default()
    text_h = 0
    if captions:
        text_h = (
            max(ImageDraw.Draw(images[0]).textbbox((0, 0), c or " ", font=font)[3] for c in captions) + pad
        )
    cell_w = max(im.width for im in images)
    cell_h = max(im.height for im in images) + text_h
    rows = math.ceil(len(images) / columns)
    out = Image.new(
        "RGB", (columns * cell_w + (columns + 1) * pad, rows * cell_h + (rows + 1) * pad), background
    )
    draw = ImageDraw.Draw(out)
    for i, im in enumerate(images):
        x = pad + (i % columns) * (cell_w + pad)
        y = pad + (i // columns) * (cell_h + pad)
        out.paste(im.convert("RGB"), (x, y))
        if captions:
            draw.text((x, y + cell_h - text_h + pad // 2), captions[i], fill="black", font=font)
    return out


# -- tokens ----------------------------------------------------------------------------------------------


def _text_color(rgb: Sequence[int]) -> tuple[int, int, int]:
    """Black on light backgrounds, white on dark ones (perceived luminance)."""
    return (0, 0, 0) if 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2] > 140 else (255, 255, 255)


class TokenRelevance:
    """Tokens with signed relevance, one or more sequences, each normalised by its own largest
    ``|R|`` (red positive, blue negative). Renders as HTML in notebooks (``_repr_html_``); ``str()``
    is the ANSI-coloured terminal form; :meth:`html` and :meth:`save` give an HTML fragment and page.

    ``tokens``: a list of strings (one sequence) or a list of lists; ``relevance``: ``(T,)``,
    ``(B, T)`` or a list of 1-D tensors, matching the tokens one to one. ``labels``: an optional title per
    sequence.

    >>> tr = TokenRelevance(["the", "<cat>"], torch.tensor([-0.5, 1.0]))
    >>> tr.html().count("<span"), "&lt;cat&gt;" in tr.html()
    (2, True)
    """

    def __init__(
        self,
        tokens: Sequence[str] | Sequence[Sequence[str]],
        relevance: ArrayLike | Sequence[ArrayLike],
        *,
        labels: Sequence[str] | None = None,
        cmap: str = "bwr",
    ):
        nested = len(tokens) > 0 and not isinstance(tokens[0], str)
        seqs = [list(t) for t in tokens] if nested else [list(tokens)]  # type: ignore[arg-type]
        if isinstance(relevance, (list, tuple)) and nested:
            rows = [torch.as_tensor(r).detach().cpu().to(torch.float64).flatten() for r in relevance]
        else:
            t = torch.as_tensor(relevance).detach().cpu().to(torch.float64)
            rows = list(t.reshape(len(seqs), -1)) if t.dim() >= 1 and t.numel() else []
        if len(rows) != len(seqs) or any(len(r) != len(s) for r, s in zip(rows, seqs)):
            raise ValueError(
                f"tokens and relevance do not match: {[len(s) for s in seqs]} tokens, relevance "
                f"{[len(r) for r in rows] if rows else list(torch.as_tensor(relevance).shape)}"
            )
        if labels is not None and len(labels) != len(seqs):
            raise ValueError(f"{len(labels)} labels for {len(seqs)} sequences")
        self.tokens, self.relevance, self.labels, self.cmap = seqs, rows, labels, cmap

    def _colored(self) -> list[list[tuple[str, float, tuple[int, int, int], tuple[int, int, int]]]]:
        """Per sequence: (token, relevance, background, text colour)."""
        out = []
        for toks, r in zip(self.tokens, self.relevance):
            colors = colorize(_scaled(r, symmetric_limit(r)), self.cmap).tolist()
            out.append([(tok, float(v), tuple(c), _text_color(c)) for tok, v, c in zip(toks, r, colors)])
        return out

    def html(self) -> str:
        """An HTML fragment: one ``<span>`` per token, its relevance in the tooltip; text is escaped."""
        parts = ['<div class="lrpc-tokens" style="font-family:monospace;line-height:2">']
        for i, seq in enumerate(self._colored()):
            parts.append("<div>")
            if self.labels is not None:
                parts.append(f"<b>{html.escape(self.labels[i])}</b><br>")
            parts.append(
                " ".join(
                    f'<span style="background:#{bg[0]:02x}{bg[1]:02x}{bg[2]:02x};color:#{fg[0]:02x}{fg[1]:02x}{fg[2]:02x};'
                    f'padding:1px 3px;border-radius:3px" title="{v:+.4g}">{html.escape(tok)}</span>'
                    for tok, v, bg, fg in seq
                )
            )
            parts.append("</div>")
        parts.append("</div>")
        return "\n".join(parts)

    def _repr_html_(self) -> str:
        return self.html()

    def terminal(self) -> str:
        """ANSI 24-bit colour text: each token on its relevance colour, one line per sequence."""
        lines = []
        for i, seq in enumerate(self._colored()):
            if self.labels is not None:
                lines.append(self.labels[i])
            lines.append(
                " ".join(
                    f"\x1b[48;2;{bg[0]};{bg[1]};{bg[2]}m\x1b[38;2;{fg[0]};{fg[1]};{fg[2]}m{tok}\x1b[0m"
                    for tok, _, bg, fg in seq
                )
            )
        return "\n".join(lines)

    def text(self) -> str:
        """Plain text without colours (logs, pipes): ``token(+0.0123)``, one line per sequence.

        >>> TokenRelevance(["a", "b"], [0.5, -0.25]).text()
        'a(+0.5) b(-0.25)'
        """
        lines = []
        for i, seq in enumerate(self._colored()):
            if self.labels is not None:
                lines.append(self.labels[i])
            lines.append(" ".join(f"{tok}({v:+.3g})" for tok, v, _, _ in seq))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.terminal()

    def save(self, path: str | Path, title: str = "lrpc token relevance") -> Path:
        """Write a standalone HTML page; returns its path."""
        path = Path(path)
        path.write_text(html_page(title, self.html()))
        return path


def tokens_html(tokens: Sequence[str] | Sequence[Sequence[str]], relevance: ArrayLike, **options: Any) -> str:
    """Token relevance as an HTML fragment (see :class:`TokenRelevance`, which notebooks render).

    >>> tokens_html(["a", "b"], [1.0, -1.0]).count("<span")
    2
    """
    return TokenRelevance(tokens, relevance, **options).html()


def tokens_terminal(
    tokens: Sequence[str] | Sequence[Sequence[str]], relevance: ArrayLike, **options: Any
) -> str:
    """Token relevance as ANSI 24-bit colour text for a terminal (see :class:`TokenRelevance`).

    >>> "\\x1b[48;2;255;0;0m" in tokens_terminal(["good"], [2.0])
    True
    """
    return TokenRelevance(tokens, relevance, **options).terminal()


def html_page(title: str, body: str) -> str:
    """A minimal standalone HTML page around ``body`` (already HTML); ``title`` is escaped."""
    t = html.escape(title)
    return (
        f'<!doctype html>\n<html><head><meta charset="utf-8"><title>{t}</title>'
        "<style>body{font-family:sans-serif;margin:2em;max-width:80em} img{image-rendering:pixelated}"
        " td,th{padding:2px 8px;text-align:left} pre{background:#f4f4f4;padding:1em;overflow:auto}</style>"
        f"</head><body><h1>{t}</h1>\n{body}\n</body></html>\n"
    )


# -- layers ----------------------------------------------------------------------------------------------

LayerTotals = dict[str, tuple[float, float, float]]


def layer_totals(layers: Mapping[str, ArrayLike]) -> LayerTotals:
    """Per layer: (positive, negative, net) relevance per sample (summed over all but the first
    dimension, averaged over it).

    >>> layer_totals({"fc": torch.tensor([[1.0, -0.5], [3.0, 0.0]])})
    {'fc': (2.0, -0.25, 1.75)}
    """
    out: LayerTotals = {}
    for name, r in layers.items():
        t = torch.as_tensor(r).detach().cpu().to(torch.float64)
        n = t.shape[0] if t.dim() >= 1 and t.shape[0] > 0 else 1
        pos, neg = float(t.clamp(min=0).sum()) / n, float(t.clamp(max=0).sum()) / n
        out[name] = (pos, neg, pos + neg)
    return out


def layer_plot(layers: Mapping[str, ArrayLike], *, title: str | None = None) -> Any:
    """A matplotlib ``Figure``: positive (red) and negative (blue) relevance per layer as bars and their
    sum (black), per sample (see :func:`layer_totals`). With LRP-0 / epsilon the sums stay close to the
    output's value from layer to layer (conservation). Pass ``{"input": res.relevance, **res.layers}``
    to include the input; save with ``fig.savefig(path)``. Needs matplotlib.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("lrpc.viz.layer_plot needs matplotlib: pip install matplotlib") from None
    totals = layer_totals(layers)
    names = list(totals)
    pos, neg, net = zip(*totals.values()) if totals else ((), (), ())
    fig = Figure(figsize=(max(4.0, 0.7 * len(names) + 2), 3.5), layout="constrained")
    ax = fig.add_subplot()
    xs = range(len(names))
    ax.bar(xs, pos, color="#d62728", label="positive")
    ax.bar(xs, neg, color="#1f77b4", label="negative")
    ax.plot(xs, net, "ko-", label="sum")
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set_xticks(list(xs), names, rotation=30, ha="right")
    ax.set_ylabel("relevance per sample")
    ax.legend(fontsize="small")
    if title:
        ax.set_title(title)
    return fig
