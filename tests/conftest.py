"""``python -m pytest`` puts the checkout first on ``sys.path``, so the tests import ``lrpc`` from the
source tree, where the kernels are the top-level folder ``kernels/`` (pyproject installs it as
``lrpc.kernels``). Map it the same way here, so that an installed and a source-tree run test the same code.
The mapping is lazy: ``lrpc.kernels`` is imported only when a test imports it (test_kernels sets
``TRITON_INTERPRET`` first)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import lrpc

if importlib.util.find_spec("lrpc.kernels") is None:  # an editable install maps it already
    lrpc.__path__.append(str(Path(__file__).resolve().parents[1]))  # lrpc.kernels -> <checkout>/kernels
