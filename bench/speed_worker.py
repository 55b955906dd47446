"""One method on one model, in its own process (``bench/speed.py`` starts one per table row).

The process builds the model (seeded: every process gets the same random weights), the input batch and
the targets, then answers commands, one JSON object per line on stdin, one JSON reply per line on the
original stdout (everything the libraries print goes to stderr):

    {"cmd": "first", "warmup": N}  time the first call (lrpc: trace + plan + codegen + compile + run;
                                   others: set-up + first call), then N untimed warm-up calls
    {"cmd": "rep"}                 time one call
    {"cmd": "finish"}              peak memory of the timed calls, save the last relevance, exit

Separate processes keep LXT's process-wide monkey patches away from the other methods and give each
method its own memory readings, two of them:

- held: what the method keeps between calls, the memory after the warm-up calls minus the memory before
  the first call (its program and caches; on CPU also the libraries and compiled code the first call
  loaded, e.g. Inductor's);
- peak: what one call needs on top of that, counted from the allocator. On CUDA
  ``torch.cuda.max_memory_allocated`` over the timed calls, above the memory allocated before them. On CPU
  the largest running sum of the allocations and frees torch.profiler records during one more call after
  the timed ones (:func:`allocated_peak_mb`): the same number on every run, where the process's peak RSS
  moved by tens of MB between runs (glibc keeps freed memory and serves later tensors from its heap).
  Memory that libraries allocate outside torch's allocator (oneDNN's scratch buffers) is not counted,
  for any method.

    python bench/speed_worker.py '{"model": "resnet50", "method": "lrpc", "rules": "epsilon", ...}'
"""

from __future__ import annotations

import gc
import json
import os
import re
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from typing import Any

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The box of Zennit's / lrpc's z^B rule: the range of ImageNet-normalized pixels ([0, 1] per channel).
BOX_LOW = min((0.0 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD))
BOX_HIGH = max((1.0 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD))

CNNS = ("vgg16", "resnet50")
CAPTUM_EPS = 1e-9  # Captum's EpsilonRule default; lrpc's epsilon rows on the CNNs use it too
HF = ("bert", "gpt2", "llama")


# --- models and inputs ---------------------------------------------------------------------------------
def llama_config(**extra: Any):
    """A Llama-style decoder of about 100M parameters (grouped-query attention, RMSNorm, SwiGLU, RoPE)."""
    import transformers

    return transformers.LlamaConfig(
        vocab_size=32000,
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        use_cache=False,
        **extra,
    )


def hf_class_and_config(name: str):
    import transformers

    if name == "bert":
        return transformers.BertForSequenceClassification, transformers.BertConfig(
            num_labels=2, use_cache=False
        )
    if name == "gpt2":
        return transformers.GPT2LMHeadModel, transformers.GPT2Config(use_cache=False)
    if name == "llama":
        return transformers.LlamaForCausalLM, llama_config()
    raise ValueError(name)


def build_model(name: str) -> torch.nn.Module:
    """Random weights, seeded: the same in every process."""
    torch.manual_seed(0)
    if name in CNNS or name == "vit_b_16":
        import torchvision

        model = getattr(torchvision.models, name)(weights=None)
        if name == "vit_b_16":  # torchvision starts the classifier at zero: every logit and relevance 0
            torch.nn.init.normal_(model.heads.head.weight, std=0.02)
        return model.eval()
    if name == "mlp":
        return torch.nn.Sequential(
            torch.nn.Linear(32, 64),
            torch.nn.ReLU(),
            torch.nn.Linear(64, 64),
            torch.nn.ReLU(),
            torch.nn.Linear(64, 10),
        ).eval()
    cls, config = hf_class_and_config(name)
    return cls(config).eval()


def num_classes(name: str, model: torch.nn.Module) -> int:
    if name in HF:
        return model.config.num_labels if name == "bert" else model.config.vocab_size
    if name == "mlp":
        return 10
    return 1000


def build_inputs(
    name: str, size: dict, model: torch.nn.Module
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The input batch (keyword arguments of the model) and one target class per sample, seeded."""
    g = torch.Generator().manual_seed(1)
    batch = size["batch"]
    if name in HF:
        vocab = model.config.vocab_size
        ids = torch.randint(100, vocab, (batch, size["seq"]), generator=g)
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    elif name == "mlp":
        inputs = {"x": torch.randn(batch, 32, generator=g)}
    else:
        pixels = torch.rand(batch, 3, size["image"], size["image"], generator=g)
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        inputs = {"x": (pixels - mean) / std}
    target = torch.randint(0, num_classes(name, model), (batch,), generator=g)
    return inputs, target


# --- methods: each returns (set-up, call); the relevance a call returns is what gets compared ------------
# The relevance every row returns puts the target logit in at the output (lrpc's default seed="logit";
# gradient x input, Captum and LXT do the same). Zennit puts in 1.0 (a one-hot gradient); LRP is linear in
# the output relevance, so its result is multiplied by the logit, outside the timed call. Token relevance
# is summed over the hidden dimension: (B, T).
Call = Callable[[], torch.Tensor]


def _score(name: str, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    scores = logits[:, -1] if logits.dim() == 3 else logits  # language models: the last position
    return scores.gather(-1, target[:, None]).sum()


def gradient_x_input(name: str, model, inputs, target) -> Call:
    """The floor: one forward and one backward of the unmodified model, eager."""
    if name in HF:
        return _embedding_gradient_x_input(name, model, inputs, target)

    def call() -> torch.Tensor:
        x = inputs["x"].detach().requires_grad_()
        (g,) = torch.autograd.grad(_score(name, model(x), target), x)
        return x * g

    return call


def _last_logits(out: Any) -> torch.Tensor:
    return out.logits[:, -1]


def lrpc_method(name: str, model, inputs, target, rules: str, backend: str, next_token: bool = False) -> Call:
    """lrpc with ``rules``; ``next_token``: a language model explained through its last position's logits
    (``output=``), whose seed and relevance are those of the full logits'."""
    import lrpc

    preset: Any = rules
    if rules == "epsilon-gamma-box":
        preset = lrpc.presets.epsilon_gamma_box(BOX_LOW, BOX_HIGH)
    elif rules == "epsilon" and name in CNNS:
        preset = lrpc.presets.epsilon(CAPTUM_EPS)  # Captum's epsilon, so that the two can be compared
    attributor = lrpc.compile(model, rules=preset, backend=backend, output=_last_logits if next_token else None)
    lrpc_method.attributor = attributor  # for the report's timings

    def call() -> torch.Tensor:
        return attributor(**inputs, target=target).relevance

    return call


def zennit_method(name: str, model, inputs, target, composite: str) -> Call:
    """Zennit as its README uses it: a composite with the model's canonizers, hooks registered once (the
    context stays open across calls), relevance = the input gradient of the one-hot output."""
    from zennit import composites
    from zennit.torchvision import ResNetCanonizer, VGGCanonizer

    canonizers = [ResNetCanonizer() if name == "resnet50" else VGGCanonizer()]
    if composite == "EpsilonGammaBox":
        comp = composites.EpsilonGammaBox(low=BOX_LOW, high=BOX_HIGH, canonizers=canonizers)
    else:
        comp = getattr(composites, composite)(canonizers=canonizers)
    with torch.no_grad():
        logit = model(inputs["x"]).gather(-1, target[:, None]).view(-1, 1, 1, 1)
    zennit_method.scale = logit  # to the logit-seed convention, outside the timed call
    context = comp.context(model)
    hooked = context.__enter__()  # left open for the process's lifetime
    zennit_method.context = context

    def call() -> torch.Tensor:
        x = inputs["x"].detach().requires_grad_()
        (g,) = torch.autograd.grad(_score(name, hooked(x), target), x)
        return g

    return call


def lxt_model(name: str, mode: str, device: torch.device) -> torch.nn.Module:
    """LXT 2.1's efficient AttnLRP / CP-LRP: patch the model classes (process-wide), build the patched
    model and load the same seeded weights the other processes build."""
    state = build_model(name).state_dict()
    from lxt.efficient import monkey_patch

    if name == "vit_b_16":
        from lxt.efficient.models import vit_torch
        from torchvision.models import vision_transformer

        if mode != "cp-lrp":
            raise RuntimeError("LXT 2.1 ships only CP-LRP for torchvision's ViT")
        monkey_patch(vision_transformer, vit_torch.cp_LRP)
        model = vision_transformer.vit_b_16(weights=None)
    else:
        from lxt.efficient.models import bert, gpt2, llama

        patches, module, cls_name = {
            "llama": (llama, llama.modeling_llama, "LlamaForCausalLM"),
            "gpt2": (gpt2, gpt2.modeling_gpt2, "GPT2LMHeadModel"),
            "bert": (bert, bert.modeling_bert, "BertForSequenceClassification"),
        }[name]
        monkey_patch(module, patches.attnLRP if mode == "attnlrp" else patches.cp_LRP)
        model = getattr(module, cls_name)(hf_class_and_config(name)[1])  # the class as patched
    model.load_state_dict(state)
    return model.to(device).eval()


def lxt_method(name: str, model, inputs, target) -> Call:
    if name == "vit_b_16":

        def call() -> torch.Tensor:
            x = inputs["x"].detach().requires_grad_()
            (g,) = torch.autograd.grad(_score(name, model(x), target), x)
            return x * g

        return call
    # LXT's patched model: its modified backward makes gradient x input of the embeddings the relevance
    return _embedding_gradient_x_input(name, model, inputs, target)


def _embedding_gradient_x_input(name: str, model, inputs, target) -> Call:
    """Gradient x input at the token embeddings, summed over the hidden dimension (one value per token)."""
    embed, mask = model.get_input_embeddings(), inputs["attention_mask"]

    def call() -> torch.Tensor:
        e = embed(inputs["input_ids"]).detach().requires_grad_()
        logits = model(inputs_embeds=e, attention_mask=mask).logits
        (g,) = torch.autograd.grad(_score(name, logits, target), e)
        return (e * g).sum(-1)

    return call


class _EmbedsToLogits(torch.nn.Module):
    """Captum calls ``forward(inputs)``: token embeddings in, the explained logits out."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        logits = self.model(inputs_embeds=embeds).logits
        return logits[:, -1] if logits.dim() == 3 else logits


def captum_method(name: str, model, inputs, target) -> Call:
    """Captum's LRP (its default: the epsilon rule, epsilon 1e-9, on every supported layer type; it raises
    on a layer type it has no rule for)."""
    from captum.attr import LRP

    if name in HF:
        wrapped = _EmbedsToLogits(model)
        lrp = LRP(wrapped)
        embed = model.get_input_embeddings()

        def call() -> torch.Tensor:
            e = embed(inputs["input_ids"]).detach()
            return lrp.attribute(e, target=target).sum(-1)

        return call
    lrp = LRP(model)

    def call() -> torch.Tensor:
        return lrp.attribute(inputs["x"], target=target)

    return call


# --- measuring -------------------------------------------------------------------------------------------
def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1)) / 1024


def _glibc() -> Any:
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim  # noqa: B018 - glibc only
    except (OSError, AttributeError):
        return None
    return libc


def _release_freed_memory() -> None:
    """Give freed heap memory back to the kernel, so that the RSS reads what is held."""
    gc.collect()
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def allocated_peak_mb(call: Callable[[], object]) -> float:
    """The most bytes allocated at once during one ``call()`` on the CPU, above what was allocated before it:
    the largest running sum of the allocations and frees torch.profiler records."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities, profile_memory=True) as prof:
        call()
    events = [
        e
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    ]
    current = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        current += e.nbytes()
        peak = max(peak, current)
    return peak / 2**20


class Meter:
    """The held and peak memory readings of the module docstring, in MB."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.baseline = 0.0
        self.before_calls = 0.0

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def _now(self) -> float:
        return torch.cuda.memory_allocated(self.device) / 2**20 if self.cuda else _status_mb("VmRSS")

    def start(self) -> None:
        """Before the first call."""
        gc.collect()
        if not self.cuda:
            _release_freed_memory()
        self.baseline = self._now()

    def reset_peak(self) -> None:
        """After the warm-up calls, before the timed ones."""
        gc.collect()
        if self.cuda:
            self.before_calls = self._now()
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self, call: Callable[[], Any]) -> tuple[float, float]:
        """(peak, held): the peak of the timed calls (CUDA) or of one more call (CPU) above the memory held
        right before it, and that memory above the reading before the first call."""
        if self.cuda:
            return torch.cuda.max_memory_allocated(self.device) / 2**20 - self.before_calls, (
                self.before_calls - self.baseline
            )
        _release_freed_memory()
        before = self._now()
        return allocated_peak_mb(call), before - self.baseline


def overhead(model, inputs, target, calls: int) -> dict[str, float]:
    """Per-call cost on a tiny model, in microseconds (median over blocks of 50 calls): the model itself
    (no grad), eager gradient x input, and a cached lrpc call with each backend."""
    import lrpc

    x = inputs["x"]

    def model_call() -> None:
        with torch.no_grad():
            model(x)

    def gxi_call() -> None:
        xx = x.detach().requires_grad_()
        torch.autograd.grad(model(xx).gather(-1, target[:, None]).sum(), xx)

    fns = {"model": model_call, "gxi": gxi_call}
    for backend in ("eager", "inductor"):
        attributor = lrpc.compile(model, rules="epsilon", backend=backend)
        attributor(x, target=target)  # compile
        fns[f"lrpc-{backend}"] = lambda a=attributor: a(x, target=target)
    block = 50
    times: dict[str, list[float]] = {key: [] for key in fns}
    for fn in fns.values():  # warm-up
        for _ in range(block):
            fn()
    for _ in range(max(calls // block, 3)):  # blocks interleaved: load changes hit every method alike
        for key, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(block):
                fn()
            times[key].append((time.perf_counter() - t0) / block * 1e6)
    return {key: sorted(ts)[len(ts) // 2] for key, ts in times.items()}


def make_method(spec: dict, model, inputs, target) -> Call:
    name, method = spec["model"], spec["method"]
    if method == "gxi":
        return gradient_x_input(name, model, inputs, target)
    if method == "lrpc":
        return lrpc_method(name, model, inputs, target, spec["rules"], spec["backend"], spec.get("next_token", False))
    if method == "zennit":
        return zennit_method(name, model, inputs, target, spec["composite"])
    if method == "lxt":
        return lxt_method(name, model, inputs, target)
    if method == "captum":
        return captum_method(name, model, inputs, target)
    raise ValueError(method)


def error_text(e: BaseException) -> str:
    lines = [line for line in str(e).strip().splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:300]


def main() -> None:
    spec = json.loads(sys.argv[1])
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # library prints go to stderr: stdout carries the protocol only
    sys.stdout = sys.stderr
    warnings.simplefilter("ignore")

    def reply(**msg: Any) -> None:
        proto.write(json.dumps(msg) + "\n")
        proto.flush()

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    device = torch.device(spec.get("device", "cpu"))
    if device.type == "cuda":
        # full float32 everywhere: cuDNN's default TF32 convolutions made the ε = 1e-9 relevance of two exact
        # implementations differ by 1e-1 on an H200, which would hide a real disagreement
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    meter = Meter(device)
    try:
        start = time.perf_counter()
        name = spec["model"]
        if spec["method"] == "lxt":
            model = lxt_model(name, spec["rules"], device)
        else:
            model = build_model(name).to(device)
        inputs, target = build_inputs(name, spec["size"], model)
        inputs = {k: v.to(device) for k, v in inputs.items()}
        target = target.to(device)
        params = sum(p.numel() for p in model.parameters())
        # import what the first call would import, so that the baseline RSS holds the libraries' code
        if spec["method"] == "lrpc":
            import importlib

            importlib.import_module("lrpc")
            importlib.import_module("torch._inductor.compile_fx")
        reply(ready=True, build_s=time.perf_counter() - start, params=params)
    except Exception as e:  # noqa: BLE001 - the row says what failed
        traceback.print_exc()
        reply(error=error_text(e))
        return

    call: Call | None = None
    result: torch.Tensor | None = None
    for line in sys.stdin:
        msg = json.loads(line)
        try:
            if msg["cmd"] == "first":
                meter.start()
                t0 = time.perf_counter()
                call = make_method(spec, model, inputs, target)
                result = call()
                meter.sync()
                first = time.perf_counter() - t0
                warm = []
                for _ in range(msg.get("warmup", 1)):
                    t0 = time.perf_counter()
                    result = call()
                    meter.sync()
                    warm.append(time.perf_counter() - t0)
                extra: dict[str, Any] = {}
                if spec["method"] == "lrpc":
                    report = lrpc_method.attributor.report()
                    extra = {"timings": report.timings, "coverage": report.coverage}
                result = None
                meter.reset_peak()
                reply(first_s=first, warmup_s=warm, **extra)
            elif msg["cmd"] == "rep":
                assert call is not None
                t0 = time.perf_counter()
                result = call()
                meter.sync()
                reply(s=time.perf_counter() - t0)
            elif msg["cmd"] == "overhead":
                reply(**overhead(model, inputs, target, msg.get("calls", 2000)))
            elif msg["cmd"] == "finish":
                assert call is not None
                peak, held = meter.peak(call)
                if result is not None and msg.get("save"):
                    rel = result.detach()
                    if spec["method"] == "zennit":
                        rel = rel * zennit_method.scale
                    torch.save(rel.double().cpu(), msg["save"])
                reply(peak_mb=peak, held_mb=held)
                return
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            reply(error=error_text(e))
            return


if __name__ == "__main__":
    main()
