"""``python -m pytest`` puts the checkout first on ``sys.path``, so the tests import ``lrpc`` from the
source tree, where the kernels are the top-level folder ``kernels/`` (pyproject installs it as
``lrpc.kernels``). Map it the same way here, so that an installed and a source-tree run test the same code.
The mapping is lazy: ``lrpc.kernels`` is imported only when a test imports it."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

# Without a GPU, Triton can only run interpreted, and it settles the mode of its own library functions
# when first imported (torchvision or Inductor may import it before test_kernels does): decide it here,
# first. On a GPU machine the variable stays unset, so Inductor's and lrpc's kernels run compiled.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import lrpc

if importlib.util.find_spec("lrpc.kernels") is None:  # an editable install maps it already
    lrpc.__path__.append(str(Path(__file__).resolve().parents[1]))  # lrpc.kernels -> <checkout>/kernels
