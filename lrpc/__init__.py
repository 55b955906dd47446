"""lrpc: an LRP compiler for PyTorch.

``lrpc.compile(model)`` traces the model once into an aten graph, plans a rule for every operation,
generates one relevance program (forward + relevance pass) and compiles it; calling the result explains
a batch.

>>> import torch, lrpc
>>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
>>> res = lrpc.compile(model, backend="eager")(torch.randn(2, 4))
>>> res.relevance.shape, res.output.shape
(torch.Size([2, 4]), torch.Size([2, 3]))
"""

from . import evaluate, presets, rules, viz
from .attributor import Attribution, Attributor, Program, compile
from .backends import register_backend
from .errors import LRPCError, RuleError, TraceError, UnsupportedOperatorError
from .ops import register_op, register_rule
from .presets import Preset, composite

__version__ = "0.1.0"

__all__ = [
    "compile",
    "Attributor",
    "Attribution",
    "Program",
    "register_rule",
    "register_op",
    "register_backend",
    "rules",
    "presets",
    "evaluate",
    "viz",
    "Preset",
    "composite",
    "LRPCError",
    "TraceError",
    "RuleError",
    "UnsupportedOperatorError",
]
