"""``lrpc coverage MODEL``: every model spec form, the exit status, and errors without a traceback."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lrpc.cli import main


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_zoo_model(capsys) -> None:
    code, out, _ = run(capsys, "coverage", "zoo:cnn1d")
    assert code == 0
    assert "coverage    100.00%" in out and "aten.convolution.default" in out
    assert "conservation" in out


def test_bare_zoo_name_and_rules(capsys) -> None:
    code, out, _ = run(capsys, "coverage", "multihead-attention", "--rules", "attnlrp")
    assert code == 0 and "attnlrp" in out


def test_torchvision_model_with_input_shape(capsys) -> None:
    pytest.importorskip("torchvision")
    code, out, _ = run(capsys, "coverage", "torchvision:resnet18", "--input", "1", "3", "32", "32")
    assert code == 0 and "100.00%" in out


def test_hf_local_config_folder(capsys, tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    )
    config.save_pretrained(tmp_path)
    code, out, _ = run(capsys, "coverage", f"hf:{tmp_path}", "--input", "1", "6")
    assert code == 0 and "100.00%" in out and "aten.embedding.default" in out


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))


def make_model_and_call() -> tuple:
    return make_model().eval(), (torch.randn(2, 4),), {}


def test_factory_returning_model_and_call(capsys) -> None:
    code, out, _ = run(capsys, "coverage", f"{__name__}:make_model_and_call")
    assert code == 0 and "aten.tanh.default" in out


def test_factory_returning_a_bare_model_needs_an_input_shape(capsys) -> None:
    code, _, err = run(capsys, "coverage", f"{__name__}:make_model")
    assert code == 2 and "--input" in err
    code, out, _ = run(capsys, "coverage", f"{__name__}:make_model", "--input", "2", "4")
    assert code == 0


class Untraceable(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent control flow: torch.export cannot trace it
            return x * 2
        return x


def make_untraceable() -> tuple:
    return Untraceable(), (torch.randn(2, 3),), {}


def test_untraceable_model_is_a_clear_error(capsys) -> None:
    code, out, err = run(capsys, "coverage", f"{__name__}:make_untraceable")
    assert code == 2 and not out
    assert "could not trace" in err and "Traceback" not in err


def test_fallback_gives_exit_status_one(capsys) -> None:
    code, out, _ = run(capsys, "coverage", f"{__name__}:make_fallback")
    assert code == 1 and "fallback" in out.lower()


@torch.library.custom_op("lrpctest_cli::double_it", mutates_args=(), device_types="cpu")
def double_it(x: torch.Tensor) -> torch.Tensor:
    return x * 2  # an op lrpc has no rule for


@double_it.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


double_it.register_autograd(lambda ctx, grad: grad * 2)


class WithCustomOp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(double_it(x))


def make_fallback() -> tuple:
    return WithCustomOp().eval(), (torch.randn(2, 8),), {}


@pytest.mark.parametrize("spec", ["zoo:no-such-model", "torchvision:no_such_net", "nosuchpackage.mod:f", "hf:no-such-type"])
def test_unknown_models_are_clear_errors(capsys, spec: str) -> None:
    if spec.startswith("torchvision"):
        pytest.importorskip("torchvision")
    if spec.startswith("hf"):
        pytest.importorskip("transformers")
    code, out, err = run(capsys, "coverage", spec)
    assert code == 2 and err.startswith("lrpc: error:") and "Traceback" not in err
