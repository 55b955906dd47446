"""What the command line explains: models named by a spec string, and inputs named by file or text.

Model specs: ``zoo:NAME`` (or a bare zoo name), ``torchvision:NAME`` (``weights=None``), ``hf:PATH`` (a
local Hugging Face folder: pretrained weights and tokenizer when it has them, else random weights from its
config) or ``hf:TYPE`` (a model type such as ``bert``: its default config, random weights), ``digits`` (the
trained digits CNN that ships with lrpc), a saved module (``model.pt`` from ``torch.save(model)``, or an
exported ``.pt2``), or ``package.module:factory`` returning a model or ``(model, args, kwargs)``.

Inputs: image files (resized to the model's input size), ``.pt`` tensors (one sample or a batch), text
files and literal text (tokenized with the model's tokenizer).

>>> loaded = load_model("zoo:mlp")
>>> loaded.example.shape
torch.Size([4, 16])
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.export.graph_signature import InputKind

from .errors import LRPCError

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
FILE_SUFFIXES = IMAGE_SUFFIXES | {".pt", ".pth", ".txt"}  # inputs with these suffixes are files, never text
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # torchvision's input normalization
SPECS = "zoo:NAME | torchvision:NAME | hf:PATH-OR-MODEL-TYPE | digits | FILE.pt | package.module:factory"


@dataclass
class LoadedModel:
    """A model in eval mode and an example call; ``tokenizer`` for text models, ``normalize`` (mean, std
    per channel) for image models that expect normalized pixels, ``invert`` for models trained on light
    ink on a dark background (the digits)."""

    model: nn.Module
    args: tuple
    kwargs: dict
    tokenizer: Any = None
    normalize: tuple[Sequence[float], Sequence[float]] | None = None
    invert: bool = False
    labels: list[str] = field(default_factory=list)
    fixed_batch: int | None = None  # an exported program traced for one batch size takes only that one

    @property
    def example(self) -> Tensor:
        """The first tensor of the example call: what one input item must look like."""
        for value in (*self.args, *self.kwargs.values()):
            if isinstance(value, Tensor):
                return value
        raise LRPCError(f"{type(self.model).__name__}: the example call has no tensor")


def load_model(spec: str, input_shape: Sequence[int] | None = None) -> LoadedModel:
    """The model a spec names (see the module docstring); ``input_shape`` shapes the example input of
    models that come without one."""
    from . import zoo

    kind, _, rest = spec.partition(":")
    if not rest and kind in zoo.names():
        kind, rest = "zoo", kind
    if kind == "zoo":
        try:
            model, args, kwargs = zoo.build(rest)
        except KeyError as e:
            raise LRPCError(str(e.args[0])) from None
        return LoadedModel(model, args, kwargs)
    if spec == "digits":
        from .models import digits_cnn

        return LoadedModel(digits_cnn(), (torch.zeros(1, 1, 8, 8),), {}, invert=True, labels=[str(d) for d in range(10)])
    if kind == "torchvision":
        return _torchvision(rest, input_shape)
    if kind == "hf":
        return _hugging_face(rest, input_shape)
    path = Path(spec)
    if path.suffix in (".pt", ".pth", ".pt2"):
        return _saved(path, input_shape)
    module, _, factory = spec.rpartition(":")
    if not module:
        raise LRPCError(f"unknown model '{spec}': use {SPECS}")
    if os.getcwd() not in sys.path and "" not in sys.path:
        # `python -m lrpc` imports from the current folder, the installed `lrpc` script does not: the same
        # spec (a mymodels.py next to the data) works with both
        sys.path.insert(0, os.getcwd())
    try:
        made = getattr(importlib.import_module(module), factory)()
    except (ImportError, AttributeError) as e:
        raise LRPCError(f"cannot load '{spec}': {e}") from None
    if isinstance(made, nn.Module):
        return LoadedModel(made.eval(), (_example(spec, input_shape, made),), {})
    if not (isinstance(made, tuple) and len(made) == 3 and isinstance(made[0], nn.Module)):
        raise LRPCError(
            f"'{spec}' returned {type(made).__name__}, not an nn.Module or (model, args, kwargs)"
        )
    model, args, kwargs = made
    return LoadedModel(model, args, kwargs)


def _example(spec: str, input_shape: Sequence[int] | None, model: nn.Module, batch: int | None = None) -> Tensor:
    """A random input of ``input_shape`` in the model's floating dtype; ``batch`` replaces its first size
    (a program exported for one batch size takes only that)."""
    if input_shape is None:
        raise LRPCError(f"'{spec}' comes without an example input: give --input SHAPE (e.g. --input 1 3 224 224)")
    shape = (batch, *input_shape[1:]) if batch is not None and input_shape else tuple(input_shape)
    return torch.randn(*shape, dtype=_floating_dtype(model) or torch.get_default_dtype())


def _floating_dtype(model: nn.Module) -> torch.dtype | None:
    """The dtype of the model's first floating-point parameter or buffer (a float64 model takes float64)."""
    tensors = (*model.parameters(), *model.buffers())
    return next((t.dtype for t in tensors if t.is_floating_point()), None)


def _torchvision(name: str, input_shape: Sequence[int] | None) -> LoadedModel:
    import torchvision

    try:
        model = torchvision.models.get_model(name, weights=None)
    except ValueError as e:
        raise LRPCError(f"torchvision has no model '{name}': {e}") from None
    x = torch.randn(*(input_shape or (1, 3, 224, 224)))
    return LoadedModel(model.eval(), (x,), {}, normalize=IMAGENET)


def _hugging_face(name: str, input_shape: Sequence[int] | None) -> LoadedModel:
    import transformers

    local = Path(name).exists()
    try:
        if local:
            config = transformers.AutoConfig.from_pretrained(name, local_files_only=True)
        else:  # a model type ("bert", "gpt2", "llama"): its default config, no download
            config = transformers.AutoConfig.for_model(name)
    except (OSError, ValueError) as e:
        raise LRPCError(f"'{name}' is neither a local Hugging Face config (file or folder) nor a model type: {e}") from None
    architecture = (config.architectures or [None])[0]
    auto = getattr(transformers, architecture, None) if architecture else None
    auto = auto or transformers.AutoModel
    folder = Path(name)
    weights = local and folder.is_dir() and (any(folder.glob("*.safetensors")) or any(folder.glob("*.bin")))
    if weights:
        model = auto.from_pretrained(name, local_files_only=True)
    else:
        model = auto._from_config(config) if hasattr(auto, "_from_config") else auto.from_config(config)
    tokenizer = None
    if local and Path(name).is_dir():
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(name, local_files_only=True)
        except (OSError, ValueError, TypeError):
            tokenizer = None  # a config without tokenizer files: token-id tensors still work
    ids = torch.randint(0, getattr(config, "vocab_size", 100), tuple(input_shape or (1, 16)))
    labels = [config.id2label[i] for i in sorted(config.id2label)] if getattr(config, "id2label", None) else []
    return LoadedModel(model.eval(), (), {"input_ids": ids}, tokenizer=tokenizer, labels=labels)


def _saved(path: Path, input_shape: Sequence[int] | None) -> LoadedModel:
    if not path.is_file():
        raise LRPCError(f"no model file '{path}'")
    fixed_batch = None
    try:
        if path.suffix == ".pt2":
            program = torch.export.load(path)
            model = program.module()
            fixed_batch = _static_batch(program)
        else:
            model = torch.load(path, weights_only=False, map_location="cpu")
    except Exception as e:  # noqa: BLE001 - any unpickling error: say which file
        raise LRPCError(f"cannot load a model from '{path}': {type(e).__name__}: {e}") from None
    if isinstance(model, dict):
        raise LRPCError(f"'{path}' holds a state dict, not a model: save the module (torch.save(model, path))")
    if not isinstance(model, nn.Module):
        raise LRPCError(f"'{path}' holds a {type(model).__name__}, not an nn.Module")
    if path.suffix != ".pt2":  # an exported program's module is already in eval semantics (and refuses .eval())
        model = model.eval()
    return LoadedModel(model, (_example(str(path), input_shape, model, fixed_batch),), {}, fixed_batch=fixed_batch)


def _static_batch(program: torch.export.ExportedProgram) -> int | None:
    """The batch size an exported program's first input was traced with, if it is not dynamic."""
    users = {spec.arg.name for spec in program.graph_signature.input_specs if spec.kind is InputKind.USER_INPUT}
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name in users:
            val = node.meta.get("val")
            if isinstance(val, Tensor) and val.dim() and isinstance(val.shape[0], int):
                return int(val.shape[0])
            return None
    return None


# -- inputs ----------------------------------------------------------------------------------------------


@dataclass
class Item:
    """One input to explain: ``name`` (file stem or the text), and a tensor sample or a text."""

    name: str
    tensor: Tensor | None = None
    text: str | None = None
    image: Any = None  # the PIL image as read, for overlays


def load_inputs(items: Sequence[str], loaded: LoadedModel) -> list[Item]:
    """Read every input: images and ``.pt`` tensors for float models, texts for token models."""
    example = loaded.example
    text_model = not example.is_floating_point()
    out: list[Item] = []
    for raw in items:
        path = Path(raw)
        suffix = path.suffix.lower()
        # a name with a suffix lrpc reads is a file, never text: a misspelled review.txt is an error, not
        # the words "review.txt" explained
        if suffix in FILE_SUFFIXES and not path.is_file():
            raise LRPCError(f"no such input file '{raw}'")
        if suffix in (".pt", ".pth"):
            out.extend(_tensor_items(path, example))
        elif suffix in IMAGE_SUFFIXES:
            if text_model:
                raise LRPCError(f"'{raw}' is an image, but {type(loaded.model).__name__} takes token ids")
            out.append(_image_item(path, example, loaded))
        elif text_model:
            text = _read_text(path) if suffix == ".txt" else raw
            out.append(Item(name=path.stem if suffix == ".txt" else raw[:40], text=text))
        else:
            raise LRPCError(
                f"'{raw}' is not an image file ({', '.join(sorted(IMAGE_SUFFIXES))}) or a .pt tensor, "
                f"and {type(loaded.model).__name__} takes a float tensor {tuple(example.shape[1:])} per sample"
            )
    if any(i.text is not None for i in out) and loaded.tokenizer is None:
        raise LRPCError(
            f"text inputs need a tokenizer, and {type(loaded.model).__name__} came without one: use a local "
            "Hugging Face folder with tokenizer files (hf:PATH) or pass token ids as a .pt tensor"
        )
    return out


def _tensor_items(path: Path, example: Tensor) -> list[Item]:
    try:
        t = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:  # noqa: BLE001
        raise LRPCError(f"cannot read a tensor from '{path}': {type(e).__name__}: {e}") from None
    if not isinstance(t, Tensor):
        raise LRPCError(f"'{path}' holds a {type(t).__name__}, not a tensor")
    sample = tuple(example.shape[1:])
    if tuple(t.shape) == sample or (not example.is_floating_point() and t.dim() == 1):
        return [Item(name=path.stem, tensor=t)]
    if t.dim() == example.dim() and (tuple(t.shape[1:]) == sample or not example.is_floating_point()):
        return [Item(name=f"{path.stem}[{i}]", tensor=row) for i, row in enumerate(t)]
    raise LRPCError(f"'{path}' has shape {tuple(t.shape)}; the model takes {sample} per sample (or a batch of them)")


def _image_item(path: Path, example: Tensor, loaded: LoadedModel) -> Item:
    from PIL import Image, UnidentifiedImageError

    if example.dim() != 4 or example.shape[1] not in (1, 3):
        raise LRPCError(f"image inputs need a model that takes (B, 1 or 3, H, W); this one takes {tuple(example.shape)}")
    channels, height, width = example.shape[1:]
    mode = "L" if channels == 1 else "RGB"
    try:
        with Image.open(path) as img:
            if img.mode == "I" or img.mode.startswith("I;16"):
                x, img = _wide_grey(img, width, height)
                x, img = x.repeat(channels, 1, 1).to(example.dtype), img.convert(mode)
            else:
                img = img.convert(mode).resize((width, height), Image.Resampling.BILINEAR)
                x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(height, width, channels)
                x = x.permute(2, 0, 1).to(example.dtype) / 255
    except (UnidentifiedImageError, OSError) as e:
        raise LRPCError(f"cannot read image '{path}': {e}") from None
    if loaded.invert:
        x = 1 - x
    if loaded.normalize is not None:
        mean, std = (torch.tensor(v, dtype=x.dtype).view(-1, 1, 1) for v in loaded.normalize)
        x = (x - mean) / std
    return Item(name=path.stem, tensor=x, image=img)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise LRPCError(f"cannot read text file '{path}': {e}") from None


def _wide_grey(img: Any, width: int, height: int) -> tuple[Tensor, Any]:
    """A 16- or 32-bit integer grey image as ``(1, H, W)`` in [0, 1] and its 8-bit picture, resized.

    Pillow's conversion to ``"L"`` clips every value above 255, which saturates such images, so they are
    scaled by their full range instead: 65535 for ``I;16``, and for 32-bit ``I`` (which is also how Pillow
    opens 16-bit PGM files) 65535 when every value fits in 16 bits, else 2**31 - 1, negatives clipped to 0.
    """
    from PIL import Image

    grey = img.convert("F")  # float32: exact up to 2**24
    low, high = grey.getextrema()
    full = 65535 if img.mode != "I" or (low >= 0 and high <= 65535) else 2**31 - 1
    grey = grey.resize((width, height), Image.Resampling.BILINEAR)
    x = torch.frombuffer(bytearray(grey.tobytes()), dtype=torch.float32).view(1, height, width)
    x = (x.double() / full).clamp(0, 1)
    picture = Image.frombytes("L", (width, height), (x * 255).round().to(torch.uint8).numpy().tobytes())
    return x, picture
