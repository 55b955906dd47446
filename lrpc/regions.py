"""Regional compilation: a program cut where the model repeats itself, each distinct region compiled once.

A transformer applies one block class N times, so its relevance program holds N copies of the same forward
code and N of the same relevance code, and a compiler given the whole program lowers and generates code for
every copy: Inductor's first call grows with depth. :func:`split` cuts the program at the boundaries of the
model's repeated blocks (the children of a ``ModuleList`` or ``Sequential``); :func:`compile_shared`
compiles each region whose code and argument layouts were seen before only once, and the regions run one
after the other. Measured on 2 CPU cores (``bench/first_call.py``, BENCHMARKS.md), first call whole ->
cut: BERT-base 61 -> 45 s, GPT-2 small 69 -> 46 s, a 24-layer Llama-style decoder 155 -> 65 s; a later
call took from 1.4% less to 3.5% more (cross-region fusion and buffer reuse are lost; BERT-base 434 -> 449
ms) and peak memory rose by about a layer's kept values, which is why :func:`split_if_worth` asks for depth.

Regions follow the program's order: in the forward pass a new one starts where the block computing the
nodes changes, in the relevance pass where the block whose rule made them changes (forward values the
relevance pass rebuilds carry no rule: they stay in the region being built when they are made). The last
block's forward, the model's head and that block's relevance pass make one region.

Only programs whose regions pass one another tensors of static sizes are cut: a Python number (an
``.item()``) would become a constant of the compiled region, and a size that depends on the data (``nonzero``,
a mixture of experts' routing) has no layout to share code on.
"""

from __future__ import annotations

import operator
from collections import Counter
from collections.abc import Callable, Hashable
from typing import Any

import torch
from torch import fx
from torch.fx.passes.split_module import split_module

from .codegen import RULE_META
from .tracing import module_stack

#: Split only models that repeat a block at least this often. Not the 12 layers of BERT-base, GPT-2 small or
#: ViT-B/16: there a region's arguments stay alive until it returns, and ViT-B/16's peak rose from 104 to
#: 115 MB (gradient x input: 114), for a first call 35 s instead of 48 s. A large number keeps every program
#: whole.
MIN_REPEATS = 16
#: ... and only where the distinct regions hold at most this share of the program's nodes.
MAX_DISTINCT_SHARE = 0.5


def _type_name(t: Any) -> str:
    return t if isinstance(t, str) else f"{t.__module__}.{t.__qualname__}"


def block_of(node: fx.Node) -> tuple[str, str] | None:
    """The outermost repeated block ``(path, type)`` in ``node``'s module stack: a child of a ``ModuleList``
    (named by its index) or of a ``Sequential``; ``None`` outside every block."""
    stack = [(path, _type_name(t)) for path, t in module_stack(node)]
    types = dict(stack)
    for path, type_name in stack:
        parent, _, name = path.rpartition(".")
        if name.isdigit() or types.get(parent, "").endswith(".Sequential"):
            return path, type_name
    return None


def _is_relevance(node: fx.Node) -> bool:
    return bool((node.meta.get("custom") or {}).get(RULE_META))


def assign_regions(graph: fx.Graph) -> dict[fx.Node, int]:
    """Each computing node's region: a new one wherever the block changes, in program order."""
    region: dict[fx.Node, int] = {}
    current: tuple[str, str] | None | object = object()
    index, relevance_pass = -1, False
    for node in graph.nodes:
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        relevance_pass = relevance_pass or _is_relevance(node)
        block = block_of(node) if not relevance_pass or _is_relevance(node) else None
        if index < 0 or (block is not None and block != current):
            index, current = index + 1, block
        region[node] = index
    return region


def split(gm: fx.GraphModule) -> fx.GraphModule:
    """``gm`` as a top-level graph calling one submodule per region (``submod_<k>``), each returning a tuple.
    A graph pass: ``gm`` is not changed, and the result computes the same outputs."""
    assignment = assign_regions(gm.graph)
    cut = split_module(gm, None, lambda node: assignment[node], keep_original_order=True)
    for call in list(cut.graph.find_nodes(op="call_module")):
        region = getattr(cut, call.target)
        out = region.graph.find_nodes(op="output")[0]
        if isinstance(out.args[0], (tuple, list)):
            continue
        out.args = ((out.args[0],),)  # one return convention: compiled code returns sequences
        region.recompile()
        with cut.graph.inserting_after(call):
            first = cut.graph.call_function(operator.getitem, (call, 0))
        call.replace_all_uses_with(first, delete_user_cb=lambda user, first=first: user is not first)
    cut.recompile()
    return cut


def structure(region: fx.GraphModule) -> Hashable | None:
    """What a region's compiled code depends on: its nodes (targets, constant arguments, which values they
    read) and its arguments' dtypes, shapes, strides and devices. ``None`` where it reads module attributes
    (their values are baked in: never shared)."""
    index: dict[fx.Node, int] = {}
    key: list[Hashable] = []
    for i, node in enumerate(region.graph.nodes):
        index[node] = i
        if node.op == "get_attr":
            return None
        args = fx.node.map_arg((node.args, node.kwargs), lambda n: ("%", index[n]))
        layout: Hashable = None
        if node.op == "placeholder":
            val = node.meta.get("val")
            layout = (
                (val.dtype, tuple(val.shape), val.stride(), val.device) if isinstance(val, torch.Tensor) else repr(val)
            )
        target = node.target if isinstance(node.target, Hashable) else ("id", id(node.target))
        key.append((node.op, target if node.op != "placeholder" else None, repr(args), layout))
    return tuple(key)


def split_if_worth(gm: fx.GraphModule) -> fx.GraphModule | None:
    """:func:`split`'s program if the model repeats a block :data:`MIN_REPEATS` times and the distinct
    regions hold at most :data:`MAX_DISTINCT_SHARE` of the program's nodes, else ``None``."""
    blocks = {block for node in gm.graph.nodes if (block := block_of(node)) is not None}
    if max(Counter(type_name for _, type_name in blocks).values(), default=0) < MIN_REPEATS:
        return None
    cut = split(gm)
    sizes: dict[Hashable, int] = {}
    for call in cut.graph.find_nodes(op="call_module"):
        region = getattr(cut, call.target)
        if not all(_static_tensor(p.meta.get("val")) for p in region.graph.find_nodes(op="placeholder")):
            return None
        key = structure(region)
        sizes[key if key is not None else ("unshared", call.target)] = len(region.graph.nodes)
    return cut if sum(sizes.values()) <= MAX_DISTINCT_SHARE * len(gm.graph.nodes) else None


def _static_tensor(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and all(isinstance(d, int) for d in value.shape)


def compile_shared(cut: fx.GraphModule, compile_region: Callable[[fx.GraphModule], Callable[..., Any]]) -> fx.GraphModule:
    """``cut`` (from :func:`split`) with each region call replaced by ``compile_region(region)``'s function,
    one per distinct :func:`structure`: equal regions run the same compiled code. Changes ``cut``."""
    shared: dict[Hashable, Callable[..., Any]] = {}
    for n, call in enumerate(list(cut.graph.find_nodes(op="call_module"))):
        name = str(call.target)
        region = getattr(cut, name)
        key = structure(region)
        compiled = shared.get(key) if key is not None else None
        if compiled is None:
            compiled = _named(compile_region(region), f"region_{n}")
            if key is not None:
                shared[key] = compiled
        call.op, call.target = "call_function", compiled
        cut.delete_submodule(name)
    cut.graph.lint()
    cut.recompile()
    return cut


def _named(run: Callable[..., Any], name: str) -> Callable[..., Any]:
    """``run`` as a plain function with a name, which FX's generated code refers to it by."""

    def region(*args: Any) -> Any:
        return run(*args)

    region.__name__ = region.__qualname__ = name
    return region
