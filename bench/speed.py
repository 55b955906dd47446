"""Speed, first-call time and peak memory of lrpc against eager gradient x input, Zennit, LXT and Captum,
on the same models, batches and seeded random weights, in one run; plus lrpc's per-call overhead on a
tiny model. Prints a Markdown table; ``--write`` puts it into BENCHMARKS.md.

    python bench/speed.py                       # full run (CPU: about 25 minutes on 2 cores)
    python bench/speed.py --quick               # small batch, fewer reps, a subset: for development
    python bench/speed.py --models resnet50,bert --reps 5
    python bench/speed.py --device cuda --write

Every method runs in its own process (``bench/speed_worker.py``): LXT patches model classes process-wide,
and each process gives its own peak memory. All processes of one model stay alive and their timed calls
are interleaved (round robin, the order rotating every round), so that load from other work on the machine
falls on every method alike. Reported per method: the median of ``--reps`` timed calls after ``--warmup``
untimed ones; the first call (lrpc: trace + plan + codegen + compile + run, with an empty Inductor cache;
others: set-up + first call); memory, two readings (``bench/speed_worker.py`` says how): the peak of a call
above the memory held right before it, and what the method holds between calls above the memory before its
first call (its program and caches; on CPU also the libraries and compiled code loaded by the first call);
the ratio to eager gradient x input (one forward + one
backward, the floor) and to the fastest peer implementing the same rules; and the largest difference of
the relevance to the reference implementation (max |a - b| / max |b|).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
import select
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import torch

from lrpc.backends import choose

HERE = Path(__file__).resolve().parent
WORKER = HERE / "speed_worker.py"
BENCHMARKS = HERE.parent / "BENCHMARKS.md"

MODELS = ("vgg16", "resnet50", "vit_b_16", "bert", "gpt2", "llama")
LABELS = {
    "vgg16": "VGG16",
    "resnet50": "ResNet-50",
    "vit_b_16": "ViT-B/16",
    "bert": "BERT-base",
    "gpt2": "GPT-2 small",
    "llama": "Llama-style ~100M",
    "mlp": "MLP 32-64-64-10",
}
FAMILY = {"vgg16": "cnn", "resnet50": "cnn", "vit_b_16": "vit", "bert": "hf", "gpt2": "hf", "llama": "hf"}

# Input sizes: batch and image side / sequence length. The CPU defaults are sized for a 2-core machine
# (the full run in about 25 minutes); CUDA's are a realistic serving batch.
SIZES = {
    "cpu": {
        "cnn": {"batch": 1, "image": 224},
        "vit": {"batch": 1, "image": 224},
        "hf": {"batch": 1, "seq": 128},
    },
    "cuda": {
        "cnn": {"batch": 32, "image": 224},
        "vit": {"batch": 32, "image": 224},
        "hf": {"batch": 8, "seq": 512},
    },
    "quick": {
        "cnn": {"batch": 1, "image": 64},
        "vit": {"batch": 1, "image": 224},
        "hf": {"batch": 1, "seq": 32},
    },
}
QUICK_MODELS = ("resnet50", "gpt2")

# lrpc presets per model (``--presets`` overrides; ``--presets all`` runs every preset that applies). Each
# compiled preset costs a cold Inductor compile (1-2 minutes per model on 2 cores), so the default runs the
# presets the targets name, each on the models where a peer implements the same rules: epsilon (Captum,
# and gradient x input on ReLU nets), EpsilonGammaBox and EpsilonPlusFlat (Zennit), AttnLRP and CP-LRP (LXT).
PRESETS = {
    "vgg16": ("epsilon", "epsilon-gamma-box"),
    "resnet50": ("epsilon", "epsilon-plus-flat"),
    "vit_b_16": ("cp-lrp",),  # LXT 2.1 ships only CP-LRP for torchvision's ViT
    "bert": ("attnlrp",),
    "gpt2": ("attnlrp",),
    "llama": ("attnlrp",),
}
QUICK_PRESETS = {"vgg16": ("epsilon",), "resnet50": ("epsilon-plus-flat",), "vit_b_16": ("cp-lrp",)}
ALL_PRESETS = {
    "cnn": ("epsilon", "lrp0", "epsilon-plus-flat", "epsilon-gamma-box", "epsilon-alpha2-beta1"),
    "vit": ("epsilon", "attnlrp", "cp-lrp"),
    "hf": ("epsilon", "attnlrp", "cp-lrp"),
}
PEERS = {
    "cnn": (
        ("Zennit EpsilonPlusFlat", {"method": "zennit", "composite": "EpsilonPlusFlat"}, "epsilon-plus-flat"),
        ("Zennit EpsilonGammaBox", {"method": "zennit", "composite": "EpsilonGammaBox"}, "epsilon-gamma-box"),
        (
            "Zennit EpsilonAlpha2Beta1",
            {"method": "zennit", "composite": "EpsilonAlpha2Beta1"},
            "epsilon-alpha2-beta1",
        ),
        ("Captum LRP", {"method": "captum"}, "epsilon"),
    ),
    "vit": (
        ("LXT CP-LRP", {"method": "lxt", "rules": "cp-lrp"}, "cp-lrp"),
        ("Captum LRP", {"method": "captum"}, "epsilon"),
    ),
    "hf": (
        ("LXT AttnLRP", {"method": "lxt", "rules": "attnlrp"}, "attnlrp"),
        ("LXT CP-LRP", {"method": "lxt", "rules": "cp-lrp"}, "cp-lrp"),
        ("Captum LRP", {"method": "captum"}, "epsilon"),
    ),
}
# Targets (issue 5), checked on the rows of the backend `backend="auto"` picks (AUTO_BACKEND).
SPEED_TARGET = {"epsilon": 1.0, "attnlrp": 1.0, "epsilon-plus-flat": 1.5, "epsilon-gamma-box": 1.5}
PEER_TARGET = {"Zennit": 1 / 3, "LXT": 1 / 1.5}
FIRST_CALL_TARGET = {"resnet50": 60.0, "bert": 60.0}
# Language models that also get a row explaining through ``output=lambda out: out.logits[:, -1]``: the
# next-token relevance without the full logits (README, Targets). Not a target row: its output differs.
DECODERS = ("gpt2", "llama")
# float32 implementations of the same rules agree to ~1e-4 (the tests compare them in float64 to 1e-7).
DISAGREE = 1e-2


@dataclass
class Row:
    model: str
    label: str
    spec: dict
    rules: str | None  # which rules it implements (None: gradient x input)
    kind: str  # gxi, lrpc, peer
    backend: str = ""
    times: list[float] = field(default_factory=list)
    first_s: float | None = None
    peak_mb: float | None = None
    held_mb: float | None = None
    error: str | None = None
    rel_path: str | None = None
    diff: float | None = None
    diff_ref: str = ""
    lrpc_timings: dict = field(default_factory=dict)

    @property
    def median(self) -> float | None:
        if not self.times:
            return None
        ts = sorted(self.times)
        n = len(ts)
        return ts[n // 2] if n % 2 else (ts[n // 2 - 1] + ts[n // 2]) / 2


class Worker:
    """One method's process. Replies are JSON lines; a dead or silent process becomes an error."""

    def __init__(self, spec: dict, log: Path, env: dict):
        self.log = log
        self.stderr = open(log, "w")  # noqa: SIM115 - open for the process's lifetime, closed in close()
        self.proc = subprocess.Popen(
            [sys.executable, str(WORKER), json.dumps(spec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            text=True,
            env=env,
            cwd=HERE.parent,
        )

    def read(self, timeout: float) -> dict:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            self.kill()
            return {"error": f"no answer in {timeout:.0f} s (killed)"}
        line = self.proc.stdout.readline()
        if not line:
            rc = self.proc.wait()
            return {
                "error": f"process ended (exit code {rc}{', killed: out of memory?' if rc in (-9, 137) else ''}): {self.tail()}"
            }
        return json.loads(line)

    def send(self, **msg: Any) -> bool:
        try:
            self.proc.stdin.write(json.dumps(msg) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            return False
        return True

    def ask(self, timeout: float, **msg: Any) -> dict:
        if not self.send(**msg):
            return {"error": f"process ended: {self.tail()}"}
        return self.read(timeout)

    def tail(self) -> str:
        self.stderr.flush()
        lines = [ln for ln in self.log.read_text(errors="replace").splitlines() if ln.strip()]
        return lines[-1][:200] if lines else ""

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def close(self) -> None:
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.kill()
        self.stderr.close()


def rows_for(
    model: str, presets: list[str] | None, backends: list[str], peers: bool, quick: bool
) -> list[Row]:
    family = FAMILY[model]
    rows = [Row(model, "gradient x input (eager autograd)", {"method": "gxi"}, None, "gxi")]
    default = QUICK_PRESETS.get(model, PRESETS[model]) if quick else PRESETS[model]
    chosen = [p for p in (presets or default) if p in ALL_PRESETS[family]]
    for rules in chosen:
        for backend in backends:
            label = f"lrpc {rules}" + (" (ε=1e-9)" if rules == "epsilon" and family == "cnn" else "")
            rows.append(
                Row(
                    model,
                    label,
                    {"method": "lrpc", "rules": rules, "backend": backend},
                    rules,
                    "lrpc",
                    backend,
                )
            )
        if model in DECODERS and AUTO_BACKEND in backends:
            # explains the same logit with the same relevance, returns the last position's logits only
            rows.append(
                Row(
                    model,
                    f"lrpc {rules}, next token only (output=logits[:, -1])",
                    {"method": "lrpc", "rules": rules, "backend": AUTO_BACKEND, "next_token": True},
                    rules,
                    "lrpc",
                    AUTO_BACKEND,
                )
            )
    if peers:
        for label, spec, rules in PEERS[family]:
            # Captum's LRP is epsilon-LRP; on the transformers it is listed to say why it does not run
            if rules in chosen or (label.startswith("Captum") and family != "cnn"):
                rows.append(Row(model, label, dict(spec), rules, "peer"))
    return rows


def worker_env(args: argparse.Namespace) -> dict:
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    return env


def run_model(model: str, rows: list[Row], size: dict, args: argparse.Namespace, tmp: Path) -> None:
    """Start every row's process, first call + warm-up one after the other (``--parallel-first``: all at
    once), then the timed calls interleaved round robin, then peak memory and relevance."""
    workers: dict[int, Worker] = {}

    def start(i: int, row: Row) -> Worker:
        spec = {"model": model, "size": size, "device": args.device, "threads": args.threads, **row.spec}
        env = worker_env(args)
        if not args.warm_cache:  # a cold compile: an empty Inductor / Triton cache per process
            cache = tmp / f"cache-{model}-{i}"
            env["TORCHINDUCTOR_CACHE_DIR"] = str(cache / "inductor")
            env["TRITON_CACHE_DIR"] = str(cache / "triton")
        if args.parallel_first:  # share the cores between the processes compiling at once
            env["TORCHINDUCTOR_COMPILE_THREADS"] = str(max(1, (os.cpu_count() or 1) // len(rows)))
        return Worker(spec, tmp / f"{model}-{i}.log", env)

    def first_reply(i: int, row: Row, worker: Worker, msg: dict) -> None:
        if "error" in msg:
            row.error = msg["error"]
            worker.kill()
            worker.close()
            print(
                f"  {row.label} [{row.backend or '-'}]: does not run: {row.error}",
                file=sys.stderr,
                flush=True,
            )
            return
        row.first_s = msg["first_s"]
        row.lrpc_timings = msg.get("timings", {})
        workers[i] = worker
        print(
            f"  {row.label} [{row.backend or '-'}]: first call {row.first_s:.1f} s, warm-up "
            f"{', '.join(f'{t:.2f}' for t in msg['warmup_s'])} s",
            file=sys.stderr,
            flush=True,
        )

    if args.parallel_first:
        started = {i: start(i, row) for i, row in enumerate(rows)}
        ready = {i: w.read(args.timeout) for i, w in started.items()}
        for i, w in started.items():
            if "error" not in ready[i]:
                w.send(cmd="first", warmup=args.warmup)
        for i, w in started.items():
            msg = ready[i] if "error" in ready[i] else w.read(args.timeout)
            first_reply(i, rows[i], w, msg)
    else:
        for i, row in enumerate(rows):
            worker = start(i, row)
            msg = worker.read(args.timeout)
            if "error" not in msg:
                msg = worker.ask(args.timeout, cmd="first", warmup=args.warmup)
            first_reply(i, row, worker, msg)
    order = list(workers)
    for rep in range(args.reps):
        k = rep % max(len(order), 1)
        for i in order[k:] + order[:k]:
            if rows[i].error:
                continue
            time.sleep(0.05)  # let the previous process's threads go idle
            msg = workers[i].ask(args.timeout, cmd="rep")
            if "error" in msg:
                rows[i].error = msg["error"]
                workers[i].kill()
            else:
                rows[i].times.append(msg["s"])
    for i, worker in workers.items():
        row = rows[i]
        if not row.error:
            path = tmp / f"rel-{model}-{i}.pt"
            msg = worker.ask(args.timeout, cmd="finish", save=str(path))
            if "error" in msg:
                row.error = msg["error"]
            else:
                row.peak_mb, row.held_mb = msg["peak_mb"], msg["held_mb"]
                row.rel_path = str(path)
        worker.close()
        if row.median is not None:
            print(
                f"  {row.label} [{row.backend or '-'}]: median {row.median:.3f} s of {len(row.times)}, "
                f"peak {row.peak_mb or 0:.0f} MB, held {row.held_mb or 0:.0f} MB",
                file=sys.stderr,
                flush=True,
            )


def rel_diff(a_path: str, b_path: str) -> float | None:
    a, b = torch.load(a_path), torch.load(b_path)
    if a.shape != b.shape or b.abs().max() == 0:
        return None
    return float((a - b).abs().max() / b.abs().max())


def compare(rows: list[Row]) -> None:
    """lrpc rows against the peer implementing the same rules; on the ReLU CNNs epsilon against gradient x
    input, which LRP-0 equals exactly and LRP-epsilon up to epsilon. Peer rows against lrpc's row with the
    backend ``auto`` picks (or another backend's)."""
    ok = [r for r in rows if r.rel_path]
    gxi = next((r for r in ok if r.kind == "gxi"), None)
    for row in ok:
        if row.kind == "lrpc":
            if row.rules in ("epsilon", "lrp0") and FAMILY[row.model] == "cnn":
                refs = [gxi] if gxi else []  # exact for LRP-0; epsilon = 1e-9 adds ~1e-5
            else:
                refs = [r for r in ok if r.kind == "peer" and r.rules == row.rules]
        elif row.kind == "peer":
            refs = sorted(
                (r for r in ok if r.kind == "lrpc" and r.rules == row.rules),
                key=lambda r: r.backend != AUTO_BACKEND,
            )
        else:
            refs = []
        if refs:
            row.diff, row.diff_ref = rel_diff(row.rel_path, refs[0].rel_path), short(refs[0])


def agrees(row: Row) -> bool:
    """A peer whose relevance disagrees with lrpc's is no speed reference (fast but wrong)."""
    return row.diff is None or row.diff <= DISAGREE


def short(row: Row) -> str:
    if row.kind == "gxi":
        return "grad x input"
    if row.kind == "lrpc":
        return f"lrpc {row.backend}"
    return row.label.split()[0]


def fmt_s(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s * 1e3:.0f} ms" if s < 1 else f"{s:.2f} s"


def table(rows: list[Row], size: dict) -> list[str]:
    gxi = next((r for r in rows if r.kind == "gxi" and r.median), None)
    shape = f"batch {size['batch']}, " + (
        f"{size['image']}x{size['image']}" if "image" in size else f"{size['seq']} tokens"
    )
    out = []
    for row in rows:
        name = f"{LABELS[row.model]} ({shape})" if row is rows[0] else ""
        method = f"{row.label} [{row.backend}]" if row.backend else row.label
        if row.error:
            out.append(f"| {name} | {method} | does not run: {row.error.replace('|', '/')} | | | | | | | |")
            continue
        med = row.median
        vs_gxi = (
            f"{med / gxi.median:.2f}x" if gxi and med and row is not gxi else ("1.00x" if row is gxi else "-")
        )
        vs_peer = "-"
        if row.kind == "lrpc" and med:
            peers = [r for r in rows if r.kind == "peer" and r.rules == row.rules and r.median and agrees(r)]
            if peers:
                best = min(peers, key=lambda r: r.median)
                vs_peer = f"{med / best.median:.2f}x {best.label.split()[0]}"
        spread = f"{(max(row.times) - min(row.times)) / med:.0%}" if med and len(row.times) > 1 else "-"
        peak = f"{row.peak_mb:.0f}" if row.peak_mb is not None else "-"
        if row.peak_mb is not None and gxi and gxi.peak_mb and row is not gxi:
            peak += f" ({row.peak_mb / gxi.peak_mb:.2f}x)"
        held = f"{row.held_mb:.0f}" if row.held_mb is not None else "-"
        diff = f"{row.diff:.1e} vs {row.diff_ref}" if row.diff is not None else "-"
        if row.diff is not None and row.diff > DISAGREE:
            diff += " **disagrees**"
        first = f"{row.first_s:.1f} s" if row.first_s is not None else "-"
        if row.kind == "lrpc" and row.lrpc_timings:
            t = row.lrpc_timings
            compile_s = t.get("first_call", 0.0)
            first += (
                f" ({t.get('trace', 0):.0f}+{t.get('codegen', 0) + t.get('plan', 0):.0f}+{compile_s:.0f})"
            )
        out.append(
            f"| {name} | {method} | {fmt_s(med)} | {spread} | {vs_gxi} | {vs_peer} | {first} | {peak} | {held} | {diff} |"
        )
    return out


HEADER = [
    "| model (input) | method [backend] | median | spread | vs grad x input | vs best peer | first call | peak MB in a call (vs grad x input) | MB held between calls | max rel. diff vs |",
    "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
]


AUTO_BACKEND = choose("auto")  # the backend the targets are checked on


def targets(rows: list[Row]) -> list[str]:
    """The issue's targets for lrpc's rows with auto's backend: met or missed, with the measured numbers."""
    lines = []
    by_model: dict[str, list[Row]] = {}
    for r in rows:
        by_model.setdefault(r.model, []).append(r)
    for model, rs in by_model.items():
        gxi = next((r for r in rs if r.kind == "gxi" and r.median), None)
        for row in rs:
            if row.kind != "lrpc" or row.backend != AUTO_BACKEND or row.spec.get("next_token"):
                continue
            name = f"{LABELS[model]}, lrpc {row.rules} [{row.backend}]"
            if row.error or row.median is None:
                lines.append(f"- {name}: MISSED: does not run")
                continue
            if gxi and row.rules in SPEED_TARGET:
                ratio, goal = row.median / gxi.median, SPEED_TARGET[row.rules]
                lines.append(
                    f"- {name}: time {ratio:.2f}x gradient x input (target <= {goal:.1f}x): {'met' if ratio <= goal else 'MISSED'}"
                )
            for peer in (
                r for r in rs if r.kind == "peer" and r.rules == row.rules and r.median and agrees(r)
            ):
                lib = peer.label.split()[0]
                if lib in PEER_TARGET:
                    speedup = peer.median / row.median
                    goal = 1 / PEER_TARGET[lib]
                    lines.append(
                        f"- {name}: {speedup:.2f}x faster than {peer.label} (target >= {goal:.1f}x): {'met' if speedup >= goal else 'MISSED'}"
                    )
            if gxi and gxi.peak_mb and row.peak_mb is not None:
                ok = row.peak_mb <= gxi.peak_mb
                lines.append(
                    f"- {name}: peak memory {row.peak_mb:.0f} MB vs gradient x input {gxi.peak_mb:.0f} MB: {'met' if ok else 'MISSED'}"
                )
            if model in FIRST_CALL_TARGET and row.first_s is not None:
                ok = row.first_s <= FIRST_CALL_TARGET[model]
                lines.append(
                    f"- {name}: first call {row.first_s:.0f} s (target <= {FIRST_CALL_TARGET[model]:.0f} s): {'met' if ok else 'MISSED'}"
                )
    return lines


def machine(device: str) -> str:
    parts = [f"{platform.system()} {platform.release()}, {platform.machine()}"]
    try:
        lscpu = subprocess.run(["lscpu"], check=False, capture_output=True, text=True, timeout=10).stdout
        model = re.search(r"Model name:\s*(.+)", lscpu)
        cpus = re.search(r"^CPU\(s\):\s*(\d+)", lscpu, re.MULTILINE)
        parts.append(
            f"{model.group(1).strip() if model else platform.processor()}, {cpus.group(1) if cpus else os.cpu_count()} CPUs"
        )
    except (OSError, subprocess.SubprocessError):
        parts.append(f"{platform.processor()}, {os.cpu_count()} CPUs")
    parts.append(f"load average {os.getloadavg()[0]:.1f}")
    if device == "cuda":
        try:
            smi = (
                subprocess.run(
                    ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                    check=False,
                    capture_output=True,
                    text=True,
                    timeout=20,
                )
                .stdout.strip()
                .splitlines()
            )
            parts.append(f"GPU {smi[0]}" if smi else "GPU (nvidia-smi: no answer)")
        except (OSError, subprocess.SubprocessError):
            parts.append(f"GPU {torch.cuda.get_device_name()}")
    return "; ".join(parts)


def versions() -> str:
    import importlib.metadata as md

    out = [f"torch {torch.__version__}", f"Python {platform.python_version()}"]
    for pkg in ("lrpc", "torchvision", "transformers", "zennit", "lxt", "captum"):
        try:
            out.append(f"{pkg} {md.version(pkg)}" + (checkout() if pkg == "lrpc" else ""))
        except md.PackageNotFoundError:
            found = importlib.util.find_spec(pkg) is not None  # a package folder on PYTHONPATH has no metadata
            out.append(f"{pkg} {'(no package metadata)' if found else 'not installed'}")
    return ", ".join(out)


def checkout() -> str:
    """`` (git <commit>)`` of the lrpc source the workers import (``+changes`` when its tracked files differ
    from the commit, BENCHMARKS.md aside); where they import an installed copy rather than this checkout's
    source (``pip install .``, not ``-e``), says so: the version alone does not say which code was timed."""
    import lrpc

    root = HERE.parent
    package = Path(lrpc.__file__).resolve().parent
    if package != root / "lrpc":
        return f" (an installed copy at {package}, not this checkout's source)"
    try:
        git = ["git", "-C", str(root)]
        head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        changes = subprocess.run(
            [*git, "status", "--porcelain", "--untracked-files=no", "--", ".", ":!BENCHMARKS.md"],
            capture_output=True, text=True, check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return ""
    return f" (git {head.stdout.strip()}{' +changes' if changes.stdout.strip() else ''})"


def overhead_table(args: argparse.Namespace, tmp: Path) -> list[str]:
    spec = {
        "model": "mlp",
        "method": "overhead",
        "size": {"batch": 1},
        "device": args.device,
        "threads": args.threads,
    }
    env = worker_env(args)
    env["TORCHINDUCTOR_CACHE_DIR"] = str(tmp / "cache-mlp" / "inductor")
    worker = Worker(spec, tmp / "mlp.log", env)
    msg = worker.read(args.timeout)
    if "error" not in msg:
        msg = worker.ask(args.timeout, cmd="overhead", calls=400 if args.quick else 2000)
    worker.kill()
    worker.close()
    if "error" in msg:
        return [f"Per-call overhead: does not run: {msg['error']}"]
    m = msg
    return [
        f"Per-call cost on a tiny model ({LABELS['mlp']}, batch 1, {args.device}; median over blocks of 50 calls, cached program):",
        "",
        "| call | µs per call | minus the model's own forward |",
        "| --- | ---: | ---: |",
        f"| the model itself (`model(x)`, no grad) | {m['model']:.0f} | - |",
        f"| gradient x input (eager autograd) | {m['gxi']:.0f} | {m['gxi'] - m['model']:.0f} |",
        f"| lrpc epsilon [eager] | {m['lrpc-eager']:.0f} | {m['lrpc-eager'] - m['model']:.0f} |",
        f"| lrpc epsilon [inductor] | {m['lrpc-inductor']:.0f} | {m['lrpc-inductor'] - m['model']:.0f} |",
    ]


def write_benchmarks(device: str, text: str) -> None:
    """Replace this device's speed section of BENCHMARKS.md (other sections are left as they are)."""
    start, end = f"<!-- speed:{device}:start -->", f"<!-- speed:{device}:end -->"
    intro = (
        f"## Speed ({device.upper()})\n\n"
        "`python bench/speed.py` (written here by `--write`): what is measured is in the script's docstring and "
        "the README's Speed section. Times are medians over interleaved calls; ratios below 1 mean faster than "
        "the reference. The last column compares the relevance with the reference implementation of the "
        "same rules (max |a − b| / max |b|, float32), so that a fast but wrong result shows.\n\n"
    )
    block = f"{start}\n{intro}{text.strip()}\n{end}"
    current = BENCHMARKS.read_text() if BENCHMARKS.exists() else "# Benchmarks\n"
    if start in current and end in current:
        current = current[: current.index(start)] + block + current[current.index(end) + len(end) :]
    else:
        current = current.rstrip() + "\n\n" + block + "\n"
    BENCHMARKS.write_text(current)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"small inputs, 2 reps, models {','.join(QUICK_MODELS)}, one preset each, Inductor's cache kept",
    )
    parser.add_argument("--models", help=f"comma-separated, from {','.join(MODELS)} (default: all)")
    parser.add_argument(
        "--presets", help="comma-separated lrpc presets, or 'all' (default: per model, see PRESETS)"
    )
    parser.add_argument(
        "--backends", help="lrpc backends (default: inductor,eager on CPU; triton,inductor on CUDA)"
    )
    parser.add_argument("--reps", type=int, help="timed calls per method (default 5; --quick 2)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls after the first (default 1)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--batch", type=int, help="override the batch size of every model")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads per process (default 1; 0: torch's default, one per core). On a machine shared with "
        "other work, OpenMP with more threads than free cores is 3-8x slower and erratic",
    )
    parser.add_argument("--no-peers", action="store_true", help="lrpc and gradient x input only")
    parser.add_argument("--no-overhead", action="store_true", help="skip the tiny-model per-call overhead")
    parser.add_argument(
        "--warm-cache", action="store_true", help="keep Inductor's on-disk cache (first calls look faster)"
    )
    parser.add_argument(
        "--parallel-first",
        action="store_true",
        help="start every method of a model and run their first calls at once (a machine with many cores: "
        "the compiles overlap; first-call times are then measured under that load)",
    )
    parser.add_argument("--timeout", type=float, default=1200, help="seconds one step of one method may take")
    parser.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    models = args.models.split(",") if args.models else list(QUICK_MODELS if args.quick else MODELS)
    for m in models:
        if m not in FAMILY:
            parser.error(f"unknown model {m!r}; choose from {', '.join(MODELS)}")
    args.reps = args.reps or (2 if args.quick else 5)
    if args.quick:  # development: reuse Inductor's cache across runs (first-call times are then warm)
        args.warm_cache = True
    presets = None
    if args.presets:
        presets = (
            sorted({p for ps in ALL_PRESETS.values() for p in ps})
            if args.presets == "all"
            else args.presets.split(",")
        )
    backends = (args.backends or ("triton,inductor" if args.device == "cuda" else "inductor,eager")).split(
        ","
    )
    sizes = SIZES["quick" if args.quick else args.device]
    copy = checkout()
    if "installed copy" in copy:  # a developer's edits would not be what is timed
        print(f"note: lrpc is{copy.rstrip(')').replace(' (', ' ')}; `pip install -e .` times the source here")

    command = "python bench/speed.py " + " ".join(a for a in sys.argv[1:] if a != "--write")
    started = time.time()
    load_before = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="lrpc-speed-"))
    lines = [
        f"Command: `{command.strip()}`; {date.today().isoformat()}",
        f"Machine: {machine(args.device)}; torch threads per process: {args.threads or torch.get_num_threads()}",
        f"Versions: {versions()}",
        "",
    ]
    print("\n".join(lines), file=sys.stderr, flush=True)
    all_rows: list[Row] = []
    body = list(HEADER)
    extra: list[str] = []

    def report(done: int) -> str:
        minutes = (time.time() - started) / 60
        partial = (
            [f"**Partial run: {done} of {len(models)} models measured when this was written.**", ""]
            if done < len(models)
            else []
        )
        return "\n".join(
            [
                *lines,
                *partial,
                *body,
                "",
                (
                    f"{args.reps} timed calls per method after {args.warmup} warm-up call(s); spread = (max - min) "
                    "/ median. First call: lrpc's split into trace + plan/codegen + compile-and-run, in seconds, "
                    f"in parentheses{' (first calls of one model ran at once: --parallel-first)' if args.parallel_first else ''}. "
                    f"Run took {minutes:.1f} min; load average {load_before[0]:.1f} before, "
                    f"{os.getloadavg()[0]:.1f} after."
                ),
                "",
                *extra,
                "",
                "Targets (lrpc with the backend `auto` picks):",
                "",
                *(targets(all_rows) or ["- no lrpc rows with auto's backend in this run"]),
            ]
        )

    try:
        for done, model in enumerate(models, 1):
            size = dict(sizes[FAMILY[model]])
            if args.batch:
                size["batch"] = args.batch
            rows = rows_for(model, presets, backends, not args.no_peers, args.quick)
            print(f"{LABELS[model]}: {len(rows)} methods, {size}", file=sys.stderr, flush=True)
            run_model(model, rows, size, args, tmp)
            compare(rows)
            all_rows += rows
            body += table(rows, size)
            print("\n".join(HEADER + table(rows, size)), file=sys.stderr, flush=True)
            if args.write and done < len(models):  # a run cut short still leaves what it measured
                write_benchmarks(args.device, report(done))
        if not args.no_overhead:
            extra += overhead_table(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    text = report(len(models))
    print("\n" + text)
    if args.write:
        write_benchmarks(args.device, text)
        print(f"\nwrote {BENCHMARKS}", file=sys.stderr)


if __name__ == "__main__":
    main()
