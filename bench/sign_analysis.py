"""What planning's sign analysis saves: z⁺ / γ presets on ResNet-50 and VGG16 (torchvision, weights=None,
batch 1, 224x224), eager backend, one thread, with the analysis and with every x⁻ term computed, next to
gradient x input; medians of 5 interleaved calls after a warm-up, and the relevance difference (exactly 0:
the skipped terms are zero).

    python bench/sign_analysis.py
"""

import statistics
import time

import torch
import torchvision

import lrpc
from lrpc import planning

torch.set_num_threads(1)
torch.manual_seed(0)
x = torch.randn(1, 3, 224, 224)
def gxi(model):
    xx = x.clone().requires_grad_(True); out = model(xx); out.max(1).values.sum().backward(); return xx.grad * xx
rows = []
for name, rules in [("resnet50", "epsilon-plus-flat"), ("vgg16", lrpc.presets.epsilon_gamma_box(-3.0, 3.0))]:
    model = torchvision.models.get_model(name, weights=None).eval()
    with_sign = lrpc.compile(model, rules=rules, backend="eager")
    original = planning.nonnegative
    planning.nonnegative = lambda node, memo=None: False
    without = lrpc.compile(model, rules=rules, backend="eager")
    without(x)
    planning.nonnegative = original
    with_sign(x)
    diff = (with_sign(x).relevance - without(x).relevance).abs().max() / without(x).relevance.abs().max()
    fns = {"grad x input": lambda: gxi(model), "lrpc (sign analysis)": lambda: with_sign(x), "lrpc (all terms)": lambda: without(x)}
    times = {k: [] for k in fns}
    for _ in range(5):
        for k, f in fns.items():
            t = time.perf_counter(); f(); times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    convs = [p.program(x).code().count("aten.convolution") for p in (with_sign, without)]
    print(f"{name} {getattr(rules, 'name', rules)}: " + ", ".join(f"{k} {v*1e3:.0f} ms ({v/med['grad x input']:.2f}x)" for k, v in med.items())
          + f"; convolutions in the program {convs[0]} vs {convs[1]}; max rel diff {float(diff):.1e}", flush=True)
