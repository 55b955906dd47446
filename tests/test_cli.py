"""``lrpc coverage MODEL``: every model spec form, the exit status, and errors without a traceback."""

from __future__ import annotations

import re

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
    code, _out, _ = run(capsys, "coverage", f"{__name__}:make_model", "--input", "2", "4")
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
    code, _out, err = run(capsys, "coverage", spec)
    assert code == 2 and err.startswith("lrpc: error:") and "Traceback" not in err


# --- lrpc explain ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digit_files(tmp_path_factory):
    from lrpc import viz
    from lrpc.models import digits_examples

    folder = tmp_path_factory.mktemp("digits")
    x, y = digits_examples()
    for i in range(2):
        viz.to_image(x[i], scale=4, invert=True).save(folder / f"digit{int(y[i])}.png")  # dark ink, as drawn
    torch.save(x[2:5].clone(), folder / "batch.pt")
    (folder / "broken.png").write_bytes(b"not an image")
    torch.save(torch.zeros(2, 3, 8, 8), folder / "wrong.pt")
    return folder, x


def test_explain_images_and_tensors(capsys, tmp_path, digit_files) -> None:
    import lrpc
    from lrpc.models import digits_cnn

    folder, x = digit_files
    out = tmp_path / "out"
    code, stdout, _ = run(
        capsys, "explain", "digits", str(folder / "digit0.png"), str(folder / "digit1.png"), str(folder / "batch.pt"),
        "--backend", "eager", "--out", str(out), "--batch-size", "2",
    )
    assert code == 0, stdout
    assert "5 inputs" in stdout and "1 trace" in stdout
    assert len(list(out.glob("*.png"))) == 5 and (out / "index.html").exists()
    saved = torch.load(out / "relevance.pt")
    assert saved["names"][2:] == ["batch[0]", "batch[1]", "batch[2]"]
    # the .pt samples: the same relevance the API gives for the same tensors
    api = lrpc.compile(digits_cnn(), backend="eager")(x[2:5])
    for i in range(3):
        torch.testing.assert_close(saved["relevance"][2 + i], api.relevance[i])
        assert saved["target"][2 + i] == int(api.target[i])
    # the image files: read, inverted back to light ink on dark as the model was trained, and classified
    assert saved["target"][:2] == [0, 1]


def test_explain_target_option(capsys, tmp_path, digit_files) -> None:
    folder, _ = digit_files
    code, _, _ = run(capsys, "explain", "digits", str(folder / "batch.pt"), "--target", "7", "--backend", "eager", "--out", str(tmp_path))
    assert code == 0 and torch.load(tmp_path / "relevance.pt")["target"] == [7, 7, 7]


@pytest.mark.parametrize(
    "inputs,message",
    [
        (["broken.png"], "cannot read image"),
        (["missing.png"], "no such input file"),
        (["wrong.pt"], r"has shape \(2, 3, 8, 8\); the model takes \(1, 8, 8\)"),
        (["some text"], "not an image file"),
    ],
)
def test_explain_bad_inputs_are_clear_errors(capsys, tmp_path, digit_files, inputs, message) -> None:

    folder, _ = digit_files
    code, _out, err = run(capsys, "explain", "digits", *[str(folder / i) if "." in i else i for i in inputs], "--out", str(tmp_path))
    assert code == 2 and re.search(message, err) and "Traceback" not in err, err


def tiny_bert_folder(tmp_path, head: str):
    """A saved one-layer BERT with ``head`` (a transformers class name) and its word-level tokenizer, in
    ``tmp_path / "model"``; returns the model and the tokenizer."""
    transformers = pytest.importorskip("transformers")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", "on", "mat", "a", "dog"]
    (tmp_path / "vocab.txt").write_text("\n".join(words))
    tokenizer = transformers.BertTokenizer(str(tmp_path / "vocab.txt"))
    config = transformers.BertConfig(
        vocab_size=len(words), hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        num_labels=2, initializer_range=0.2,
    )
    torch.manual_seed(0)
    model = getattr(transformers, head)(config).eval()
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    return model, tokenizer


def test_explain_text_with_a_local_hugging_face_folder(capsys, tmp_path) -> None:
    model, tokenizer = tiny_bert_folder(tmp_path, "BertForSequenceClassification")
    out = tmp_path / "out"
    code, _stdout, err = run(
        capsys, "explain", f"hf:{tmp_path / 'model'}", "the cat sat on the mat", "a dog", "--rules", "attnlrp",
        "--backend", "eager", "--out", str(out),
    )
    assert code == 0, err
    assert re.search(r"target LABEL_[01] ", _stdout)  # the config's two labels name the two logits
    saved = torch.load(out / "relevance.pt")
    assert [r.shape[0] for r in saved["relevance"]] == [8, 4]  # [CLS] ... [SEP], padding dropped
    page = (out / "tokens.html").read_text()
    assert "mat" in page and "dog" in page
    # pretrained weights were loaded: the explained score is the saved model's logit
    enc = tokenizer(["a dog"], return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc).logits[0]
    assert saved["score"][1] == pytest.approx(float(logits.max()), rel=1e-5)


def test_texts_are_explained_as_if_alone(capsys, tmp_path) -> None:
    """A masked language model's output is per position, explained at the last one. Texts batched with right
    padding were explained at a padding token when a longer text shared their batch (another target and
    relevance); token ids from a ``.pt`` next to a text crashed in the tokenizer."""
    _, tokenizer = tiny_bert_folder(tmp_path, "BertForMaskedLM")
    torch.save(tokenizer("a dog", return_tensors="pt")["input_ids"][0], tmp_path / "ids.pt")
    saved = []
    for texts in (["a dog"], ["a dog", "the cat sat on the mat", str(tmp_path / "ids.pt")]):
        out = tmp_path / f"out{len(saved)}"
        code, _stdout, err = run(
            capsys, "explain", f"hf:{tmp_path / 'model'}", *texts, "--backend", "eager", "--out", str(out)
        )
        assert code == 0, err
        saved.append(torch.load(out / "relevance.pt"))
    alone, batched = saved
    assert [r.shape[0] for r in batched["relevance"]] == [4, 8, 4]
    assert alone["relevance"][0].abs().sum() > 0
    for i in (0, 2):  # "a dog" next to a longer text, and as token ids
        assert batched["target"][i] == alone["target"][0]
        torch.testing.assert_close(batched["relevance"][i], alone["relevance"][0])


def test_labels_name_targets_only_when_they_count_the_outputs(capsys, tmp_path) -> None:
    """A config's ``id2label`` (two labels by default) named a language model's vocabulary positions: token 1
    was reported as ``LABEL_1``."""
    tiny_bert_folder(tmp_path, "BertForMaskedLM")
    code, stdout, err = run(
        capsys, "explain", f"hf:{tmp_path / 'model'}", "a dog", "--target", "1", "--backend", "eager",
        "--out", str(tmp_path / "out"),
    )
    assert code == 0, err
    assert "target 1 (" in stdout and "LABEL" not in stdout


def test_explain_token_ids_with_a_zoo_model_whose_example_has_a_mask(capsys, tmp_path) -> None:
    """zoo:bert's example call is a padded batch of two with its attention mask: one sequence of ids was
    paired with that (2, 8) mask and failed, blaming the input. Its mask is made for the ids given."""
    import lrpc
    from lrpc import zoo

    ids = torch.randint(5, 50, (8,))
    torch.save(ids, tmp_path / "ids.pt")
    code, _, err = run(capsys, "explain", "zoo:bert", str(tmp_path / "ids.pt"), "--backend", "eager", "--out", str(tmp_path / "out"))
    assert code == 0, err
    saved = torch.load(tmp_path / "out" / "relevance.pt")
    model, _, _ = zoo.build("bert")
    expected = lrpc.compile(model, backend="eager")(input_ids=ids[None], attention_mask=torch.ones(1, 8, dtype=torch.long))
    torch.testing.assert_close(saved["relevance"][0], expected.relevance[0])


def test_explain_a_float64_module(capsys, tmp_path) -> None:
    """The inputs were cast to the float32 of the shape-built example, and the float64 model failed."""
    import lrpc

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).double().eval()
    torch.save(model, tmp_path / "model.pt")
    x = torch.randn(2, 4, dtype=torch.float64)
    relevance = explain_and_cover(capsys, tmp_path, tmp_path / "model.pt", x)
    assert relevance.dtype == torch.float64
    torch.testing.assert_close(relevance, lrpc.compile(model, backend="eager")(x).relevance)


def explain_and_cover(capsys, tmp_path, model_file, x: torch.Tensor) -> torch.Tensor:
    """``lrpc explain`` of the batch ``x`` of 4-feature inputs (the relevance it saves), and ``lrpc coverage``
    of the model, each expected to succeed."""
    torch.save(x, tmp_path / "inputs.pt")
    code, _, err = run(
        capsys, "explain", str(model_file), str(tmp_path / "inputs.pt"), "--input", "1", "4",
        "--backend", "eager", "--out", str(tmp_path / "out"),
    )
    assert code == 0, err
    code, _, err = run(capsys, "coverage", str(model_file), "--input", "1", "4")
    assert code == 0, err
    return torch.stack(torch.load(tmp_path / "out" / "relevance.pt")["relevance"])


def test_a_factory_module_in_the_current_folder(capsys, tmp_path, monkeypatch) -> None:
    """The installed ``lrpc`` script does not put the current folder on ``sys.path`` (``python -m`` does):
    ``mymodels:build`` next to the user's data failed with "No module named 'mymodels'"."""
    (tmp_path / "mymodels_for_lrpc_test.py").write_text(
        "import torch\n\ndef build():\n    return torch.nn.Sequential(torch.nn.Linear(4, 3))\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.path", [p for p in __import__("sys").path if p not in ("", str(tmp_path))])
    code, _, err = run(capsys, "coverage", "mymodels_for_lrpc_test:build", "--input", "1", "4")
    assert code == 0, err


@pytest.mark.parametrize("suffix", [".pt", ".pt2"])
def test_explain_saved_module(capsys, tmp_path, suffix) -> None:
    import lrpc

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).eval()
    x = torch.randn(3, 1, 8, 8)
    if suffix == ".pt":
        torch.save(model, tmp_path / "model.pt")
    else:
        batch = torch.export.Dim("batch", min=2)
        torch.export.save(torch.export.export(model, (x,), dynamic_shapes=({0: batch},)), tmp_path / "model.pt2")
    torch.save(x, tmp_path / "inputs.pt")
    code, _, err = run(
        capsys, "explain", str(tmp_path / f"model{suffix}"), str(tmp_path / "inputs.pt"), "--input", "1", "1", "8", "8",
        "--backend", "eager", "--out", str(tmp_path / "out"),
    )
    assert code == 0, err
    saved = torch.load(tmp_path / "out" / "relevance.pt")
    expected = lrpc.compile(model, backend="eager")(x).relevance
    torch.testing.assert_close(torch.stack(saved["relevance"]), expected)


def test_explain_state_dict_file_is_a_clear_error(capsys, tmp_path) -> None:
    torch.save(nn.Linear(2, 2).state_dict(), tmp_path / "weights.pt")
    code, _, err = run(capsys, "explain", str(tmp_path / "weights.pt"), "x.pt", "--input", "1", "2")
    assert code == 2 and "state dict, not a model" in err


def test_explain_a_program_exported_for_one_batch_size(capsys, tmp_path) -> None:
    """A ``.pt2`` exported at batch 1 takes only batch 1 (export's guard): lrpc uses it, and says so, instead
    of failing with ``Guard failed: input.size()[0] == 1``."""
    import lrpc

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).eval()
    torch.export.save(torch.export.export(model, (torch.randn(1, 1, 8, 8),)), tmp_path / "model.pt2")
    x = torch.randn(3, 1, 8, 8)
    torch.save(x, tmp_path / "inputs.pt")
    code, _, err = run(
        capsys, "explain", str(tmp_path / "model.pt2"), str(tmp_path / "inputs.pt"), "--input", "1", "1", "8", "8",
        "--backend", "eager", "--out", str(tmp_path / "out"),
    )
    assert code == 0 and "exported for batch size 1: using it" in err, err
    saved = torch.load(tmp_path / "out" / "relevance.pt")
    torch.testing.assert_close(torch.stack(saved["relevance"]), lrpc.compile(model, backend="eager")(x).relevance)


def test_a_program_exported_for_a_larger_batch_than_the_inputs(capsys, tmp_path) -> None:
    """Two inputs for a ``.pt2`` exported at batch 4: only later batches were padded, the first failed with
    ``Guard failed: input.size()[0] == 4``."""
    import lrpc

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    torch.export.save(torch.export.export(model, (torch.randn(4, 4),)), tmp_path / "model.pt2")
    x = torch.randn(2, 4)
    saved = explain_and_cover(capsys, tmp_path, tmp_path / "model.pt2", x)  # coverage: an example at batch 4
    torch.testing.assert_close(saved, lrpc.compile(model, backend="eager")(x).relevance)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["explain", "digits", "x.pt", "--batch-size", "0"], "--batch-size: must be a positive integer, got 0"),
        (["coverage", "torchvision:resnet18", "--input", "1", "3", "8", "-8"], "--input: must be a positive integer"),
        (["explain", "os:getcwd", "x.pt", "--input", "1", "3"], "returned str, not an nn.Module or"),
        (["explain", "digits", "{digit}", "--out", "{file}"], "cannot write to --out .*: File exists"),
        (["demo", "--threads", "-1"], "--threads: must be 0 or a positive integer, got -1"),
    ],
)
def test_bad_arguments_are_one_line_errors(capsys, tmp_path, digit_files, argv, message) -> None:
    """These ended in tracebacks (a zero step for range(), a negative dim, a factory's str unpacked, mkdir on
    a file), or a wrong message (a negative batch size: "report() is available after the first call")."""

    folder, _ = digit_files
    (tmp_path / "afile").write_text("x")
    filled = [a.format(digit=folder / "batch.pt", file=tmp_path / "afile") for a in argv]
    try:
        code = main(filled)
    except SystemExit as e:  # argparse's own errors: usage and one line, exit status 2
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and re.search(message, err) and "Traceback" not in err, err
