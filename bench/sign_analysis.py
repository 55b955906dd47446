"""What planning's two static analyses save on the z⁺ / γ presets: ResNet-50 with epsilon-plus-flat and
VGG16 with epsilon-gamma-box (torchvision, weights=None, batch 1, 224x224), eager backend, one thread.

* sign analysis (``planning.nonnegative``): layers reading ReLU outputs skip their x⁻ terms;
* dead relevance (``planning._relevance_dead``): layers feeding a ReLU skip γ's terms for outputs < 0.

Each lrpc variant next to gradient x input: medians of 5 interleaved calls after a warm-up, the number of
convolutions in the program, and the relevance difference to the variant computing every term (exactly 0:
the skipped terms are zero).

    python bench/sign_analysis.py
"""

import statistics
import time
from collections.abc import Callable

import torch
import torchvision

import lrpc
from lrpc import planning

torch.set_num_threads(1)
torch.manual_seed(0)
x = torch.randn(1, 3, 224, 224)
ANALYSES = {
    "nonnegative": lambda node, memo=None: False,
    "_relevance_dead": lambda node, ctx, negative: False,
}


def compiled(model: torch.nn.Module, rules: object, off: tuple[str, ...]) -> lrpc.Attributor:
    """The model's attributor with the named analyses switched off while it plans."""
    saved = {name: getattr(planning, name) for name in off}
    try:
        for name in off:
            setattr(planning, name, ANALYSES[name])
        attributor = lrpc.compile(model, rules=rules, backend="eager")
        attributor(x)  # plans and generates now
    finally:
        for name, fn in saved.items():
            setattr(planning, name, fn)
    return attributor


def gradient_x_input(model: torch.nn.Module) -> Callable[[], torch.Tensor]:
    """The input gradient only (as bench/speed.py): ``backward()`` would compute every weight's too."""

    def call() -> torch.Tensor:
        xx = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(model(xx).max(1).values.sum(), xx)
        return g * xx

    return call


for name, rules in [("resnet50", "epsilon-plus-flat"), ("vgg16", lrpc.presets.epsilon_gamma_box(-3.0, 3.0))]:
    model = torchvision.models.get_model(name, weights=None).eval()
    variants = {
        "both analyses": compiled(model, rules, ()),
        "sign analysis only": compiled(model, rules, ("_relevance_dead",)),
        "every term": compiled(model, rules, tuple(ANALYSES)),
    }
    reference = variants["every term"](x).relevance
    calls = {"grad x input": gradient_x_input(model)}
    calls.update({k: (lambda a=a: a(x)) for k, a in variants.items()})
    times: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(5):
        for k, call in calls.items():
            start = time.perf_counter()
            call()
            times[k].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{name} {getattr(rules, 'name', rules)}: grad x input {med['grad x input'] * 1e3:.0f} ms")
    for k, a in variants.items():
        diff = (a(x).relevance - reference).abs().max() / reference.abs().max()
        convs = a.program(x).code().count("aten.convolution")
        print(
            f"  lrpc, {k}: {med[k] * 1e3:.0f} ms ({med[k] / med['grad x input']:.2f}x), "
            f"{convs} convolutions, max rel. diff {float(diff):.1e}",
            flush=True,
        )
