"""The model zoo: small random-weight models of many architectures, built offline from configs in
seconds, for the tests, the coverage report and the benchmarks.

>>> from lrpc import zoo
>>> model, args, kwargs = zoo.build("mlp")
>>> "resnet50" in zoo.names()
True
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

Built = tuple[nn.Module, tuple, dict]


@dataclass(frozen=True)
class ZooModel:
    """One zoo entry: ``build()`` returns the model (eval mode, seeded weights) and an example call."""

    name: str
    family: str  # vision, text, audio, ssm, seq2seq, other
    build: Callable[[], Built]
    paper: bool = False  # one of the 15 architectures of the DynamicLRP paper
    needs: str = ""  # the package it needs beyond torch ("torchvision", "transformers")
    attention: bool = False  # has softmax attention: the transformer presets (attnlrp, cp-lrp) apply


_REGISTRY: dict[str, ZooModel] = {}
_MODULES = ("lrpc.zoo.plain", "lrpc.zoo.vision", "lrpc.zoo.hf")  # hf: Hugging Face from_config
_loaded = False


def register(
    name: str, family: str, *, paper: bool = False, needs: str = "", attention: bool = False
) -> Callable[[Callable[[], Built]], Callable[[], Built]]:
    """Decorator: add a builder to the zoo under ``name``."""

    def wrap(fn: Callable[[], Built]) -> Callable[[], Built]:
        if name in _REGISTRY:
            raise ValueError(f"zoo: '{name}' is registered twice")
        _REGISTRY[name] = ZooModel(name, family, fn, paper, needs, attention)
        return fn

    return wrap


def _load() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for module in _MODULES:
            importlib.import_module(module)


def entries() -> list[ZooModel]:
    _load()
    return list(_REGISTRY.values())


def names() -> list[str]:
    return [e.name for e in entries()]


def get(name: str) -> ZooModel:
    _load()
    if name not in _REGISTRY:
        raise KeyError(f"no zoo model '{name}'; known: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def build(name: str) -> Built:
    """``(model, args, kwargs)`` for a zoo entry."""
    return get(name).build()


__all__ = ["Built", "ZooModel", "build", "entries", "get", "names", "register"]
