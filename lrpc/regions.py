"""Regional compilation: a program cut where the model repeats itself, each distinct region compiled once.

A transformer applies one block class N times, so its relevance program holds N copies of the same forward
code and N of the same relevance code, and a compiler given the whole program lowers and generates code for
every copy: Inductor's first call grows with depth. :func:`split` cuts the program at the boundaries of the
model's repeated blocks (the children of a ``ModuleList`` or ``Sequential``); :func:`compile_shared`
compiles each region whose code and argument layouts were seen before only once, and a :class:`Chain` runs
the regions one after the other. Measured on 2 CPU cores (``bench/first_call.py``, BENCHMARKS.md), first
call whole -> cut: BERT-base 55 -> 42 s, GPT-2 small 60 -> 45 s, ViT-B/16 46 -> 38 s, a 24-layer
Llama-style decoder 155 -> 65 s; a later call took from 6% less to 3% more (kernels no longer fuse across
a cut; within the machine's noise).

Memory stays as the whole program's: the chain hands each region its arguments in a list that the
compiled code empties (:func:`boxed`), so a value is freed after its last use inside the region rather than
when the region returns, and Inductor's programs that are cut recompute rebuilt forward values per reader
(``lrpc.backends.recomputes``) rather than pass them from region to region.

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

from torch import fx
from torch.fx.passes.split_module import split_module

from .codegen import RULE_META
from .tracing import module_stack, static_shape

#: Split only models that repeat a block at least this often: the 12 layers of BERT-base, GPT-2 small and
#: ViT-B/16 (their first calls 25-40% shorter), not a 6-layer MiniLM, whose compile is short anyway. A large
#: number keeps every program whole.
MIN_REPEATS = 12
#: ... and only where the distinct regions hold at most this share of the program's nodes. Measured on the
#: programs as generated, before ``lrpc.memory.rematerialize`` (where lrpc decides): 0.29-0.31 for the
#: 12-layer transformers, GPT-2 small and the Llama-style model explained at their last token included;
#: 0.67 for ResNet-50 (16 bottlenecks in four shapes) and 1.25 for VGG16's Sequential of convolutions, which
#: stay whole (cutting ResNet-50 made its compile slower).
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
    read) and its arguments' dtypes, shapes, strides and devices. ``None`` (never shared) where an argument
    is not a tensor of static sizes, whose layout the compiled code could not be matched on, or where the
    region reads a module attribute (a tensor constant or a higher-order op's body: code the key does not
    describe)."""
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
            if (shape := static_shape(val)) is None:
                return None
            layout = (val.dtype, shape, val.stride(), val.device)
        target = node.target if isinstance(node.target, Hashable) else ("id", id(node.target))
        key.append((node.op, target if node.op != "placeholder" else None, repr(args), layout))
    return tuple(key)


def worth_splitting(gm: fx.GraphModule) -> bool:
    """Whether ``gm``'s model repeats a block :data:`MIN_REPEATS` times and its distinct regions hold at
    most :data:`MAX_DISTINCT_SHARE` of the program's nodes, each region passed tensors of static sizes."""
    blocks = {block for node in gm.graph.nodes if (block := block_of(node)) is not None}
    if max(Counter(type_name for _, type_name in blocks).values(), default=0) < MIN_REPEATS:
        return False
    cut = split_static(gm)
    if cut is None:
        return False
    sizes: dict[Hashable, int] = {}
    for call in cut.graph.find_nodes(op="call_module"):
        region = getattr(cut, call.target)
        key = structure(region)
        sizes[key if key is not None else ("unshared", call.target)] = len(region.graph.nodes)
    return sum(sizes.values()) <= MAX_DISTINCT_SHARE * len(gm.graph.nodes)


def split_static(gm: fx.GraphModule) -> fx.GraphModule | None:
    """:func:`split`'s program, or ``None`` if a region would be passed anything but a tensor of static sizes."""
    cut = split(gm)
    for call in cut.graph.find_nodes(op="call_module"):
        region = getattr(cut, call.target)
        if any(static_shape(p.meta.get("val")) is None for p in region.graph.find_nodes(op="placeholder")):
            return None
    return cut


def boxed(region: fx.GraphModule) -> fx.GraphModule:
    """``region`` taking its arguments as one list, which its compiled code empties: the convention of
    compiled autograd's graphs (the placeholder marked ``steal_arg``), under which Inductor's code frees each
    argument after its last use. A graph pass: ``region`` is not changed."""
    graph = fx.Graph()
    arguments = graph.placeholder("arguments")
    arguments.meta["steal_arg"] = True
    env: dict[fx.Node, fx.Node] = {}
    index = 0
    for node in region.graph.nodes:
        if node.op == "placeholder":
            env[node] = graph.call_function(operator.getitem, (arguments, index))
            env[node].meta = dict(node.meta)
            index += 1
        else:
            env[node] = graph.node_copy(node, env.__getitem__)
    return fx.GraphModule(region, graph)


def compile_shared(cut: fx.GraphModule, compile_region: Callable[[fx.GraphModule], Callable[[list], Any]]) -> Chain:
    """``cut`` (from :func:`split`) as a :class:`Chain` of compiled regions: ``compile_region`` is given each
    region :func:`boxed`, once per distinct :func:`structure` (equal regions run the same compiled code),
    and returns a function of the argument list that returns the region's outputs."""
    shared: dict[Hashable, Callable[[list], Any]] = {}
    functions: dict[str, Callable[[list], Any]] = {}
    for call in cut.graph.find_nodes(op="call_module"):
        region = getattr(cut, call.target)
        key = structure(region)
        compiled = shared.get(key) if key is not None else None
        if compiled is None:
            compiled = compile_region(boxed(region))
            if key is not None:
                shared[key] = compiled
        functions[str(call.target)] = compiled
    return Chain(cut, functions)


class Chain:
    """A cut program run region after region, each region called with a new list of its arguments.

    A caller's own reference keeps an argument alive until the call returns: FX's code for ``cut`` would hold
    each region's arguments, a layer's kept forward values among them, for the whole region (ViT-B/16: 1 MB
    of the 11 a cut added to its 104 MB peak; the rest were rebuilt values passed between regions, which
    programs that are cut now recompute, ``lrpc.backends._in_regions``). The chain drops its reference to a
    value when it builds the argument list of the last region reading it, and the region's compiled code
    empties the list (:func:`boxed`), so a value dies after its last use inside the region, as in the whole
    program. ``graph_module`` is the cut program, to print."""

    def __init__(self, cut: fx.GraphModule, functions: dict[str, Callable[[list], Any]]) -> None:
        self.graph_module = cut
        nodes = list(cut.graph.nodes)
        slot = {node: i for i, node in enumerate(nodes)}
        last_read: dict[fx.Node, int] = {}
        for i, node in enumerate(nodes):
            for read in node.all_input_nodes:
                last_read[read] = i
        dropped: dict[int, list[int]] = {}
        for node, i in last_read.items():
            dropped.setdefault(i, []).append(slot[node])
        self._arity = sum(node.op == "placeholder" for node in nodes)
        #: (slot, value) of the module attributes the regions read (tensor constants)
        self._constants = [(slot[n], operator.attrgetter(str(n.target))(cut)) for n in nodes if n.op == "get_attr"]
        self._size = len(nodes)
        #: (what to run, its arguments' slots or (slot, index), the slots to drop before it runs, result's slot)
        self._steps: list[tuple[Callable[[list], Any] | None, Any, list[int], int]] = []
        output: Any = None
        for i, node in enumerate(nodes):
            drop = dropped.get(i, [])
            if node.op == "call_module":
                arguments = [slot[a] for a in node.args]  # type: ignore[index]
                self._steps.append((functions[str(node.target)], arguments, drop, i))
            elif node.op == "call_function" and node.target is operator.getitem:
                source, index = node.args
                self._steps.append((None, (slot[source], index), drop, i))  # type: ignore[index]
            elif node.op == "output":
                output = fx.node.map_arg(node.args[0], lambda n: _Slot(slot[n]))
            elif node.op not in ("placeholder", "get_attr"):
                raise NotImplementedError(f"lrpc.regions.Chain: unexpected {node.op} node {node.format_node()}")
        self._output = output

    def __call__(self, *args: Any) -> Any:
        if len(args) != self._arity:
            raise TypeError(f"the cut program takes {self._arity} arguments, got {len(args)}")
        values: list[Any] = [*args, *([None] * (self._size - len(args)))]
        del args
        for i, constant in self._constants:
            values[i] = constant
        for run, reads, drop, result in self._steps:
            if run is None:
                source, index = reads
                values[result] = values[source][index]
                for i in drop:
                    values[i] = None
                continue
            arguments = [values[i] for i in reads]
            for i in drop:
                values[i] = None
            values[result] = run(arguments)
            del arguments
        return _gathered(self._output, values)


class _Slot(int):
    """A value's place in :class:`Chain`'s list, told apart from a number the program returns."""


def _gathered(structure: Any, values: list[Any]) -> Any:
    """``structure`` (slots, in tuples, lists and dicts) with each slot's value, in the containers the cut
    program returns (FX's immutable lists as lists)."""
    if isinstance(structure, list):
        return [_gathered(s, values) for s in structure]
    if isinstance(structure, tuple):
        items = (_gathered(s, values) for s in structure)
        return type(structure)(*items) if hasattr(structure, "_fields") else tuple(items)
    if isinstance(structure, dict):
        return {k: _gathered(s, values) for k, s in structure.items()}
    return values[structure] if isinstance(structure, _Slot) else structure
