"""Codegen: turn a :class:`~lrpc.planning.Plan` into the relevance program.

:func:`relevance_function` builds a plain Python function that runs the forward graph, seeds the output
and applies every planned rule in order; run on real tensors it is the reference ("interpret"). Traced with
``make_fx`` on the traced graph's fake inputs (:func:`generate`), it becomes one flat aten
``fx.GraphModule``: forward plus relevance pass, dynamic dimensions kept symbolic, every relevance node
annotated with the rule and forward node it comes from.
"""

from __future__ import annotations

import contextlib
import logging
import operator
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx.traceback as fx_traceback
import torch.utils._pytree as pytree
from torch import Tensor, fx
from torch.fx.experimental.proxy_tensor import make_fx

from .canonize import ACTIVATION_META, is_float
from .errors import LRPCError, RuleError
from .input_gradients import merge_input_gradients
from .memory import impure, rematerialize, written_in_place
from .ops import SIDE_EFFECT_OPS, lookup
from .planning import Plan, Step, bind
from .rules import Operation
from .targets import TargetSpec, at_class, class_index, class_seed, seed_relevance
from .tracing import belongs_to

RULE_META = "lrpc_rule"  # node.meta["custom"][RULE_META] on relevance nodes: "<Rule> at <forward node>"


@dataclass(frozen=True)
class Signature:
    """How the program is called and what it returns, in order."""

    n_state: int
    input_names: tuple[str, ...]  # user inputs (all tensors), in placeholder order
    takes_index: bool
    relevance_names: tuple[str, ...]  # explained inputs with a relevance output
    layer_names: tuple[str, ...]


def relevance_function(plan: Plan, target: TargetSpec) -> tuple[Callable[..., tuple], Signature]:
    """The program as a Python function of ``(*state, *inputs[, index])`` returning
    ``(output, index_or_None, seed_total, *input_relevances, *layer_relevances)``."""
    graph = plan.graph
    nodes = list(graph.nodes)
    by_name = {n.name: n for n in nodes}
    placeholders = [n for n in nodes if n.op == "placeholder"]
    input_nodes = {name: by_name[node] for name, node in plan.inputs.items()}
    n_state = len(placeholders) - len(input_nodes)
    steps = {s.node: s for s in plan.steps}
    layer_paths: dict[str, list[str]] = {}  # node -> paths: a module's output can be its parent's too
    for path, name in plan.layers.items():
        layer_paths.setdefault(name, []).append(path)
    explained = by_name[plan.output]

    def program(*args: Tensor) -> tuple:
        env: dict[fx.Node, Any] = dict(zip(placeholders, args))
        index = args[len(placeholders)] if target.mode == "index" else None
        for node in nodes:
            if node.op != "call_function" or node.target in SIDE_EFFECT_OPS:
                continue
            call_args, call_kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: env[n])
            with fx_traceback.set_current_meta(node):
                env[node] = node.target(*call_args, **call_kwargs)
        output = env[explained]
        used_index = class_index(output, target, index)
        cut, step = None, steps.get(explained.name)
        if step is not None and explained.name not in layer_paths:  # a layer's relevance there is the whole seed
            with fx_traceback.set_current_meta(explained), _annotate(step):
                cut = _one_class(explained, env, step, used_index)
        seed = seed_relevance(output, target, used_index) if cut is None else class_seed(output, target, used_index)
        seed_total = seed.sum()  # now, so that the seed (as large as the output) dies at the first rule

        relevance: dict[fx.Node, Any] = {explained: seed}
        layers: dict[str, Tensor] = {}
        for node in reversed(nodes):
            r = relevance.pop(node, None) if node.op != "placeholder" else relevance.get(node)
            if r is None:
                continue
            for path in layer_paths.get(node.name, ()):
                layers[path] = r
            if node.op != "call_function":
                continue
            if node.target is operator.getitem:
                _accumulate_slot(relevance, node.args[0], node.args[1], r)
                continue
            step = steps[node.name]
            with fx_traceback.set_current_meta(node), _annotate(step):
                op, tensor_inputs = cut if node is explained and cut is not None else _operation(node, env, step)
                try:
                    results = step.rule(op, r)
                except RuleError as e:  # the rule does not fit this op: say which op it met
                    raise RuleError(f"{e} (at node '{step.node}', {step.op}, module '{step.module}')") from e
                except LRPCError:
                    raise
                except Exception as e:  # name the node: the rule's own error does not say where it was
                    raise LRPCError(
                        f"{step.rule.name} failed at node '{step.node}' ({step.op}, module "
                        f"'{step.module}'): {type(e).__name__}: {e}"
                    ) from e
            for (_, inp), res in zip(tensor_inputs, results):
                if res is not None and inp.name in step.receivers:
                    _accumulate(relevance, inp, res)
        outs: list[Any] = [output, used_index, seed_total]
        for name in plan.explained:
            outs.append(relevance.get(input_nodes[name]))
        for path, name in plan.layers.items():  # a layer no relevance reached (a gate cp-lrp holds) has 0
            outs.append(layers[path] if path in layers else torch.zeros_like(env[by_name[name]]))
        return tuple(outs)

    signature = Signature(
        n_state=n_state,
        input_names=tuple(input_nodes),
        takes_index=target.mode == "index",
        relevance_names=tuple(plan.explained),
        layer_names=tuple(plan.layers),
    )
    return program, signature


def _accumulate(relevance: dict[fx.Node, Any], node: fx.Node, value: Tensor) -> None:
    """Relevance reaching a value from several consumers is summed."""
    prev = relevance.get(node)
    relevance[node] = value if prev is None else prev + value


def _accumulate_slot(relevance: dict[fx.Node, Any], parent: fx.Node, slot: int, value: Tensor) -> None:
    outputs = parent.meta["val"]
    slots = list(relevance.get(parent) or [None] * len(outputs))
    slots[slot] = value if slots[slot] is None else slots[slot] + value
    relevance[parent] = slots


def _activation(node: fx.Node, env: dict[fx.Node, Any], step: Step) -> tuple[Operation, list[tuple[str, fx.Node]]]:
    """A grouped elementwise activation as one op: a function of its one source tensor."""
    source, region = node.meta[ACTIVATION_META]

    def fn(x: Tensor) -> Tensor:
        local: dict[fx.Node, Any] = {source: x}
        for n in region:
            args, kwargs = fx.node.map_arg((n.args, n.kwargs), lambda a: local[a] if a in local else env[a])
            local[n] = n.target(*args, **kwargs)
        return local[node]

    op = Operation(
        fn=fn, inputs=(env[source],), output=env[node], relevant=(source.name in step.receivers,), roles=("input",)
    )
    return op, [("input", source)]


def _operation(node: fx.Node, env: dict[fx.Node, Any], step: Step) -> tuple[Operation, list[tuple[str, fx.Node]]]:
    """Bind a node and its forward values into the :class:`Operation` its rule sees."""
    if ACTIVATION_META in node.meta:
        return _activation(node, env, step)
    names, tensor_inputs = bind(node)
    leaves, spec = pytree.tree_flatten((node.args, node.kwargs))
    slots = [i for i, leaf in enumerate(leaves) if isinstance(leaf, fx.Node) and isinstance(leaf.meta.get("val"), Tensor)]
    values = [env[leaf] if isinstance(leaf, fx.Node) else leaf for leaf in leaves]
    op_spec = lookup(node.target)
    target = op_spec.impl if op_spec is not None and op_spec.impl is not None else node.target

    def fn(*tensors: Tensor) -> Any:
        filled = list(values)
        for slot, t in zip(slots, tensors):
            filled[slot] = t
        args, kwargs = pytree.tree_unflatten(filled, spec)
        return target(*args, **kwargs)

    bound = {k: fx.node.map_arg(v, lambda n: env[n]) for k, v in names.items()}
    output = env[node]
    linear_map = None
    if op_spec is not None and op_spec.linearize is not None and step.family == "norm":
        linear_map = op_spec.linearize(bound, output)
    def role(name: str, t: fx.Node) -> str:
        if t.name in step.receivers:
            return "input"
        if name in step.frozen:
            return "frozen"
        if op_spec is not None and name in op_spec.bias:
            return "bias"
        if op_spec is not None and name in op_spec.factors:
            return "weight"
        return "other"

    op = Operation(
        fn=fn,
        inputs=tuple(env[t] for _, t in tensor_inputs),
        output=output,
        relevant=tuple(t.name in step.receivers for _, t in tensor_inputs),
        dim=op_spec.dim(bound) if op_spec is not None and op_spec.dim is not None else None,
        linear_map=linear_map,
        roles=tuple(role(name, t) for name, t in tensor_inputs),
        signs=tuple(-1 if op_spec is not None and name in op_spec.negated else 1 for name, _ in tensor_inputs),
        nonnegative=tuple(t.name in step.nonnegative for _, t in tensor_inputs),
        negative_outputs_dead=step.negative_outputs_dead,
        product=op_spec.product if op_spec is not None else None,
        positions=_positions(node, env, step, tensor_inputs) if step.rule.holds_positions else None,
    )
    return op, tensor_inputs


def _positions(
    node: fx.Node, env: dict[fx.Node, Any], step: Step, tensor_inputs: list[tuple[str, fx.Node]]
) -> Callable[[Tensor], Tensor] | None:
    """For a rule that holds values per position of its layer's input (ZBox bounds): the ops the layer's own
    module applies to the value it receives before the layer (a convolution with ``padding_mode='reflect'``
    pads it), replayed on a tensor shaped like one sample of that value. ``None`` if there are none."""
    inputs = [t for _, t in tensor_inputs if t.name in step.receivers]
    if len(inputs) != 1 or not step.module:
        return None
    chain: list[fx.Node] = []
    sources: set[fx.Node] = set()
    pending = [inputs[0]]
    while pending:
        n = pending.pop()
        if n in chain or n in sources:
            continue
        if n.op == "call_function" and belongs_to(n, step.module):
            chain.append(n)
            pending.extend(n.all_input_nodes)
        elif is_float(n):
            sources.add(n)
    if not chain or len(sources) != 1:
        return None
    (source,) = sources
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    chain.sort(key=order.__getitem__)

    def replay(value: Tensor) -> Tensor:
        local: dict[fx.Node, Any] = {source: value.expand_as(env[source])}
        for n in chain:
            args, kwargs = fx.node.map_arg((n.args, n.kwargs), lambda a: local[a] if a in local else env[a])
            local[n] = n.target(*args, **kwargs)
        return local[inputs[0]]

    return replay


def _one_class(
    node: fx.Node, env: dict[fx.Node, Any], step: Step, index: Tensor | None
) -> tuple[Operation, list[tuple[str, fx.Node]]] | None:
    """The explained output layer cut down to the explained class, when that gives the same relevance; its
    seed is then :func:`lrpc.targets.class_seed`.

    The seed of a class target is zero outside ``index`` (one class per sample, and for sequences the
    last position only). A rule that shares each output unit's relevance by that unit's row alone
    (:attr:`lrpc.rules.Rule.unit_wise`) then gives the same input relevance on the layer restricted to
    the row ``W[index]``: ``R_x = x ⊙ W[c] (R_c ⊘ stab(z_c))`` for ε, one row per sample instead of a
    matmul over every class (for a language model's head, as large as the forward's). ``z_c`` is read off
    the forward output, so ε's arithmetic is the full layer's, term for term.
    """
    if index is None or node.target is not torch.ops.aten.linear.default or not step.rule.unit_wise:
        return None
    names, _ = bind(node)
    x, weight, bias = (names.get(k) for k in ("input", "weight", "bias"))
    z = env[node]
    if not (isinstance(x, fx.Node) and isinstance(weight, fx.Node)) or step.receivers != (x.name,):
        return None
    if z.dim() not in (2, 3) or env[x].dim() != z.dim():
        return None
    rows = [env[weight].index_select(0, index)]
    if isinstance(bias, fx.Node):
        rows.append(env[bias].index_select(0, index))

    def fn(x: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
        out = torch.bmm(x if x.dim() == 3 else x.unsqueeze(1), w.unsqueeze(-1))  # (B, T or 1, 1)
        if b is not None:
            out = out + b.view(-1, 1, 1)
        return out if x.dim() == 3 else out.squeeze(1)

    op = Operation(
        fn=fn,
        inputs=(env[x], *rows),
        output=z.gather(-1, at_class(index, z)),
        relevant=(True, *[False] * len(rows)),
        roles=("input", "weight", "bias")[: 1 + len(rows)],
        signs=(1,) * (1 + len(rows)),
        nonnegative=(x.name in step.nonnegative, *[False] * len(rows)),
        negative_outputs_dead=step.negative_outputs_dead,
    )
    receivers = [("input", x)] + [(role, t) for role, t in (("weight", weight), ("bias", bias)) if isinstance(t, fx.Node)]
    return op, receivers


def _annotate(step: Step) -> Any:
    label = f"{step.rule.name} at {step.node}" + (f" ({step.module})" if step.module else "")
    annotate = getattr(fx_traceback, "annotate", None)
    if annotate is None:  # older torch: the program still works, only unannotated
        import contextlib

        return contextlib.nullcontext()
    return annotate({RULE_META: label})


def generate(
    plan: Plan,
    target: TargetSpec,
    example_inputs: list[Any],
    *,
    recompute: bool | Callable[[fx.GraphModule], bool] = True,
) -> tuple[fx.GraphModule, Signature]:
    """Trace the relevance function into one aten ``GraphModule``.

    ``example_inputs`` are the traced graph's placeholder values (fake tensors, dynamic dimensions
    symbolic) followed by an index tensor when the target mode takes one. ``recompute``: see
    :func:`lrpc.memory.rematerialize`; a function of the program decides per program (the backend's
    choice, :func:`lrpc.backends.recomputes`).
    """
    program, signature = relevance_function(plan, target)
    with fx_traceback.preserve_node_meta(), torch.no_grad(), _fake_kernel_errors_unlogged():
        gm = make_fx(program, tracing_mode="symbolic", _allow_non_fake_inputs=True)(*example_inputs)
    eliminate_common_subexpressions(gm.graph)
    merge_input_gradients(gm.graph)
    rematerialize(gm.graph, recompute=recompute(gm) if callable(recompute) else recompute)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm, signature


@contextlib.contextmanager
def _fake_kernel_errors_unlogged() -> Iterator[None]:
    """Fake tensors log every exception of a kernel they run with its traceback (20 lines at ERROR) before
    raising it; a rule that fails is reported by lrpc, naming the node, with that exception as its cause."""
    logger = logging.getLogger("torch._subclasses.fake_tensor")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def eliminate_common_subexpressions(graph: fx.Graph) -> fx.Graph:
    """Merge identical pure calls: the rules' VJPs recompute forward ops that the forward already has.

    Values written in place later (autograd formulas do that to their temporaries: ``dist``'s backward
    computes ``(self - other) / dist`` for each input and masks each copy in place) are not merged: each
    copy is written on its own.
    """
    written = written_in_place(graph)
    seen: dict[Any, fx.Node] = {}
    for node in list(graph.nodes):
        if node.op != "call_function" or impure(node) or node in written:
            continue
        try:
            key = (node.target, _freeze(node.args), _freeze(node.kwargs))
            hash(key)
        except TypeError:
            continue
        if key in seen:
            node.replace_all_uses_with(seen[key])
            graph.erase_node(node)
        else:
            seen[key] = node
    return graph


def _freeze(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, (torch.dtype, torch.device, torch.layout, torch.memory_format)):
        return (type(value), str(value))
    return value
