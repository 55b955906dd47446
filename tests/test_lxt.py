"""The transformer presets against LXT (``lxt`` 2.1, AttnLRP and CP-LRP in its efficient mode) on tiny
random-weight Hugging Face Llama, GPT-2 and BERT configs and a torchvision ViT: the same weights, the same
input, the same seed (1 at the target logit; LXT reads relevance as x * x.grad, lrpc's seed "logit").

LXT 2.1 imports only with transformers 4.x (it ships copies of 4.x model code), so the test extras pin
``transformers<4.52``. LXT patches model classes process-wide, so it runs in a subprocess
(``lxt_reference.py``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lrpc

pytest.importorskip("lxt")
transformers = pytest.importorskip("transformers")

D = torch.float64
REFERENCE = Path(__file__).with_name("lxt_reference.py")

CONFIGS = {
    "llama": dict(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.1,
    ),
    "gpt2": dict(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64, initializer_range=0.1),
    "bert": dict(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, initializer_range=0.1, num_labels=3,
    ),
    "vit": dict(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=64, num_classes=5),
}


def dtype(kind: str) -> torch.dtype:
    """float64, except GPT-2: traced under transformers 4.x it fills a float32 causal mask with float64's
    minimum, which overflows (a transformers bug the model's untraced forward never reaches)."""
    return torch.float32 if kind == "gpt2" else D


def build(kind: str, **overrides) -> torch.nn.Module:
    """``overrides``: config entries that differ from :data:`CONFIGS` (Hugging Face models)."""
    torch.manual_seed(0)
    if kind == "vit":
        from torchvision.models.vision_transformer import VisionTransformer

        model = VisionTransformer(**CONFIGS[kind])
        torch.nn.init.normal_(model.heads.head.weight, std=0.1)  # torchvision starts the head at zero
    else:
        cls, cfg = {
            "llama": (transformers.LlamaForCausalLM, transformers.LlamaConfig),
            "gpt2": (transformers.GPT2LMHeadModel, transformers.GPT2Config),
            "bert": (transformers.BertForSequenceClassification, transformers.BertConfig),
        }[kind]
        model = cls(cfg(**CONFIGS[kind], **overrides))
    return model.to(dtype(kind)).eval()


def lxt_relevance(
    kind: str, mode: str, model: torch.nn.Module, inputs: torch.Tensor, target: torch.Tensor, tmp_path, **overrides
) -> torch.Tensor:
    spec, out = tmp_path / "spec.pt", tmp_path / "out.pt"
    torch.save(
        {
            "kind": kind, "mode": mode, "config": {**CONFIGS[kind], **overrides}, "state_dict": model.state_dict(),
            "inputs": inputs, "target": target, "dtype": dtype(kind),
        },
        spec,
    )
    subprocess.run([sys.executable, str(REFERENCE), str(spec), str(out)], check=True, capture_output=True)
    return torch.load(out)


@pytest.mark.parametrize(
    "kind,mode",
    [("llama", "attnlrp"), ("llama", "cp-lrp"), ("gpt2", "attnlrp"), ("gpt2", "cp-lrp"), ("bert", "attnlrp"), ("vit", "cp-lrp")],
)
def test_transformer_preset_equals_lxt(kind: str, mode: str, tmp_path) -> None:
    model = build(kind)
    g = torch.Generator().manual_seed(1)
    if kind == "vit":
        inputs = torch.randn(2, 3, 32, 32, generator=g, dtype=dtype(kind))
        call = {"x": inputs}
    else:
        inputs = torch.randint(3, 100, (2, 9), generator=g)
        call = {"input_ids": inputs, "attention_mask": torch.ones_like(inputs)}
    attributor = lrpc.compile(model, rules=mode, backend="eager")
    res = attributor(**call)
    expected = lxt_relevance(kind, mode, model, inputs, res.target, tmp_path)
    assert expected.abs().max() > 0
    err = float((res.relevance.detach() - expected).abs().max() / expected.abs().max())
    assert err < 1e-4, err
    assert attributor.report().coverage == 1.0


@pytest.mark.parametrize("act", ["gelu_new", "quick_gelu"])
def test_cp_lrp_holds_a_gate_written_with_primitive_ops_constant(act: str, tmp_path) -> None:
    """Llama's gated MLP ``act(gate(x)) * up(x)`` with an activation written with primitive ops
    (``0.5·x·(1 + tanh(...))``, ``x·sigmoid(1.702x)``): CP-LRP holds the activated gate constant as it does
    a native GELU's. It split the product instead: 0.56 off LXT, and 0.56 off itself with
    ``gelu_pytorch_tanh``, the same function."""
    model = build("llama", hidden_act=act)
    inputs = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(1))
    res = lrpc.compile(model, rules="cp-lrp", backend="eager")(input_ids=inputs, attention_mask=torch.ones_like(inputs))
    expected = lxt_relevance("llama", "cp-lrp", model, inputs, res.target, tmp_path, hidden_act=act)
    assert expected.abs().max() > 0
    assert float((res.relevance.detach() - expected).abs().max() / expected.abs().max()) < 1e-4
    if act == "gelu_new":
        native = build("llama", hidden_act="gelu_pytorch_tanh")
        same = lrpc.compile(native, rules="cp-lrp", backend="eager")(input_ids=inputs, attention_mask=torch.ones_like(inputs))
        torch.testing.assert_close(res.relevance, same.relevance)


def test_attnlrp_and_cp_lrp_differ() -> None:
    """The two presets are not the same rules under another name: CP-LRP sends nothing through softmax."""
    model = build("llama")
    ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(2))
    a = lrpc.compile(model, rules="attnlrp", backend="eager")(input_ids=ids).relevance
    b = lrpc.compile(model, rules="cp-lrp", backend="eager")(input_ids=ids).relevance
    assert float((a - b).abs().max() / a.abs().max()) > 1e-2
    plan = lrpc.compile(model, rules="cp-lrp", backend="eager").plan(input_ids=ids)
    assert not any(s.family == "softmax" for s in plan.steps)
