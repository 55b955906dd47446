"""The compiled backends on a CUDA device: static programs compiled by Inductor directly (lrpc's own
dtype / device / stride checks instead of Dynamo's guards), the dynamic program of a second batch size,
and merged input gradients (lrpc.input_gradients), each against the eager program on the same device;
perturbation curves with the relevance on another device than the input.
Skipped without a GPU; ``bench/gpu.sh`` runs them on a lent one."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lrpc

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(autouse=True)
def full_float32(monkeypatch: pytest.MonkeyPatch) -> None:
    """Compare the backends, not TF32's rounding: cuDNN convolutions default to TF32 on Ampere and later,
    and the box rule's cancelling terms turned that into a 3% difference on one pixel (an H200)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 8 * 8, 5),
    ).eval()  # fmt: skip


def assert_matches(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert expected.abs().max() > 0 and actual.device == expected.device
    torch.testing.assert_close(actual, expected, rtol=1e-3, atol=1e-4 * expected.abs().max().item())


@pytest.mark.parametrize("backend", ["inductor", "triton"])
@pytest.mark.parametrize("rules", ["epsilon", "box"])
def test_compiled_backends_match_eager_on_cuda(backend: str, rules: str) -> None:
    preset = lrpc.presets.epsilon_gamma_box(low=-3.0, high=3.0) if rules == "box" else rules
    model = cnn().cuda()
    eager = lrpc.compile(model, rules=preset, backend="eager")
    compiled = lrpc.compile(model, rules=preset, backend=backend)
    for batch in (4, 7, 2):  # the first program static, then one dynamic program
        x = torch.randn(batch, 3, 8, 8, device="cuda")
        assert_matches(compiled(x, target=1).relevance, eager(x, target=1).relevance)
    x = torch.randn(4, 8, 8, 3, device="cuda").permute(0, 3, 1, 2)  # channels-last: not the compiled strides
    assert_matches(compiled(x, target=1).relevance, eager(x, target=1).relevance)
    assert compiled.stats["traces"] == 2 and compiled.report().backend == backend


class Tokens(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.emb, self.head = nn.Embedding(40, 8), nn.Linear(8, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(ids).mean(1))


def test_static_program_follows_the_model_to_another_dtype_on_cuda() -> None:
    """Token ids keep their shape and dtype when the model is cast, but the model's dtype is part of the
    signature: the cast model gets a program of its own instead of running code compiled for float32."""
    model = Tokens().cuda().eval()
    ids = torch.randint(0, 40, (3, 6), device="cuda")
    a = lrpc.compile(model, rules="lrp0", backend="inductor")
    assert a(ids).relevance.dtype == torch.float32
    model.double()
    res = a(ids)
    assert res.relevance.dtype == torch.float64 and a.stats["traces"] == 2
    assert_matches(res.relevance, lrpc.compile(model, rules="lrp0", backend="eager")(ids).relevance)


def test_perturbation_curves_take_relevance_from_another_device() -> None:
    """Relevance moved to the CPU (to keep it) for a model and input on the GPU: the ranking ran on the
    relevance's device and failed on mixing devices."""
    model = cnn().cuda()
    x = torch.randn(2, 3, 8, 8, device="cuda")
    relevance = lrpc.compile(model, rules="epsilon", backend="eager")(x, target=1).relevance
    on_gpu = lrpc.evaluate.perturbation_curves(model, x, relevance, target=1, steps=8)
    on_cpu = lrpc.evaluate.perturbation_curves(model, x, relevance.cpu(), target=1, steps=8)
    torch.testing.assert_close(on_cpu.morf, on_gpu.morf)
    torch.testing.assert_close(on_cpu.lerf, on_gpu.lerf)
