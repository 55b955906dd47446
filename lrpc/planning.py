"""Planning: decide statically, for every node of the canonical graph, whether relevance reaches it, which
rule it gets, which inputs receive relevance and which forward values the rule needs.

This is where DynamicLRP's "promises" are resolved: because every forward value is a named node, a rule's
needs are known before anything runs. The plan is a plain, printable object; codegen follows it exactly.
"""

from __future__ import annotations

import operator
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import fx, nn

from .canonize import ACTIVATION_META, FROZEN_META
from .errors import LRPCError, RuleError, UnsupportedOperatorError
from .ops import (
    CONSTANT_OPS,
    NONNEGATIVE_OPS,
    SIDE_EFFECT_OPS,
    SIGN_PRESERVING_OPS,
    VALUE_MOVING_OPS,
    Family,
    OpSpec,
    arg_names,
    lookup,
)
from .presets import Preset
from .rules import Gradient, Pass, Route, Rule
from .tracing import belongs_to, module_calls, module_path, module_stack


@dataclass(frozen=True)
class Step:
    """The rule applied at one forward node."""

    node: str
    op: str
    family: str
    rule: Rule
    receivers: tuple[str, ...]  # forward nodes that get relevance from this step
    reads: tuple[str, ...]  # forward values the rule needs: kept alive for the relevance pass
    module: str
    fallback: bool = False
    nonnegative: tuple[str, ...] = ()  # inputs known to be >= 0 (after a ReLU): layer rules skip x⁻ terms
    negative_outputs_dead: bool = False  # relevance is 0 wherever the output is < 0 (it feeds a ReLU)
    frozen: tuple[str, ...] = ()  # arguments held constant (a sampling grid, a divisor, a gate): no relevance


@dataclass
class Plan:
    """Which rule runs where, in the order the relevance pass runs (reverse topological)."""

    graph: fx.Graph
    preset: Preset
    steps: list[Step]
    output: str
    inputs: dict[str, str]  # user input name -> placeholder node, in call order
    layers: dict[str, str]  # module path -> node whose relevance is reported
    node_count: int = 0
    op_counts: Counter = field(default_factory=Counter)
    constants: tuple[str, ...] = ()  # inputs held constant: no relevance flows into them

    @property
    def explained(self) -> dict[str, str]:
        """The inputs that receive relevance."""
        return {k: v for k, v in self.inputs.items() if k not in self.constants}

    @property
    def kept(self) -> list[str]:
        """Forward values the relevance pass reads (everything else can be freed after the forward)."""
        seen: dict[str, None] = {}
        for step in self.steps:
            for name in step.reads:
                seen.setdefault(name, None)
        return list(seen)

    @property
    def fallbacks(self) -> list[Step]:
        return [s for s in self.steps if s.fallback]

    @property
    def coverage(self) -> float:
        """Share of relevance-carrying nodes whose rule is a real one (not a gradient fallback)."""
        return 1.0 if not self.steps else 1.0 - len(self.fallbacks) / len(self.steps)

    def rules_by_op(self) -> dict[str, Counter]:
        table: dict[str, Counter] = {}
        for step in self.steps:
            table.setdefault(step.op, Counter())[
                step.rule.name + (" (fallback)" if step.fallback else "")
            ] += 1
        return table

    def __str__(self) -> str:
        lines = [
            f"Plan: preset {self.preset.name}, {len(self.steps)} rule steps over {self.node_count} nodes"
        ]
        lines.append(f"  explained output: {self.output}")
        lines.append("  explained inputs: " + ", ".join(f"{k} ({v})" for k, v in self.explained.items()))
        if self.constants:
            lines.append("  constant inputs: " + ", ".join(self.constants))
        if self.layers:
            lines.append("  layers: " + ", ".join(f"{k} -> {v}" for k, v in self.layers.items()))
        width = max([len(s.node) for s in self.steps] + [4])
        for s in self.steps:
            extra = (
                (" FALLBACK" if s.fallback else "")
                + (f"  x>=0: {', '.join(s.nonnegative)}" if s.nonnegative else "")
                + ("  R=0 where z<0" if s.negative_outputs_dead else "")
            )
            lines.append(
                f"  {s.node:<{width}}  {s.op:<40} {s.rule.name:<28} -> {', '.join(s.receivers) or '-'}"
                f"   reads [{', '.join(s.reads)}]  {s.module}{extra}"
            )
        lines.append(f"  kept for the relevance pass: {', '.join(self.kept)}")
        return "\n".join(lines)


def op_name(node: fx.Node) -> str:
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return str(target)
    return getattr(target, "__qualname__", None) or str(target)


def bind(node: fx.Node) -> tuple[dict[str, Any], list[tuple[str, fx.Node]]]:
    """The node's arguments by schema name, and every tensor-valued argument as ``(name, node)``."""
    names = arg_names(node.target, len(node.args))
    args = dict(zip(names, node.args))
    args.update(node.kwargs)
    tensors = []
    for name, value in args.items():
        for leaf in pytree.tree_leaves(value):
            if isinstance(leaf, fx.Node) and isinstance(leaf.meta.get("val"), torch.Tensor):
                tensors.append((name, leaf))
    return args, tensors


def _values(node: fx.Node) -> list[torch.Tensor]:
    """The tensor values ``node`` holds (one, or those of a multi-output op)."""
    val = node.meta.get("val")
    return [v for v in (val if isinstance(val, (tuple, list)) else [val]) if isinstance(v, torch.Tensor)]


def _is_float(node: fx.Node) -> bool:
    """Whether ``node`` holds real or complex values (an FFT's spectrum carries relevance as far as an op
    without a rule, which is then reported, rather than ending it as a constant)."""
    return any(v.is_floating_point() or v.is_complex() for v in _values(node))


def _is_complex(node: fx.Node) -> bool:
    return any(v.is_complex() for v in _values(node))


def _is_int(node: fx.Node) -> bool:
    return any(not (v.is_floating_point() or v.is_complex()) and v.dtype != torch.bool for v in _values(node))


def frozen_args(
    node: fx.Node, spec: OpSpec | None, carry: set[fx.Node], gates_constant: bool = False
) -> frozenset[str]:
    """Tensor arguments the node treats as constants: the op's own (a divisor, indices), normalizer
    statistics marked by canonicalization, and, under CP-LRP, an activated gate in ``act(g) * u`` where
    both factors carry relevance (``carry``; ``act(x) * 0.5`` or ``act(x) * beta`` is a scaling, not a
    gated product: NFNet's blocks; nor is ``act(x) * s`` with ``s`` a statistic of ``x`` that
    canonicalization froze: the activation is what is scaled)."""
    frozen = (spec.frozen if spec else frozenset()) | node.meta.get(FROZEN_META, frozenset())
    if (
        gates_constant
        and node.target is torch.ops.aten.mul.Tensor
        and all(isinstance(a, fx.Node) and a in carry for a in node.args[:2])
        and not frozen & {"self", "other"}
    ):
        gates = {name for name, arg in zip(("self", "other"), node.args) if _is_activation(arg)}
        if len(gates) == 2:  # LSTM: sigmoid(o) * tanh(c); the squashing-to-[0, 1] one is the gate
            gates = {name for name, arg in zip(("self", "other"), node.args) if arg.target in _GATES}
        if len(gates) == 1:
            frozen |= gates
    return frozen


_GATES = frozenset({torch.ops.aten.sigmoid.default, torch.ops.aten.hardsigmoid.default})


def _is_activation(node: Any) -> bool:
    """An elementwise activation's output: a PASS op, or one written with primitive ops (GPT-2's
    ``0.5·x·(1 + tanh(...))``, ``x·sigmoid(1.702x)``), which canonicalization marks."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return False
    return _family(node) is Family.PASS or ACTIVATION_META in node.meta


def carriers(
    graph: fx.Graph,
    inputs: Sequence[fx.Node],
    constants: frozenset[Family] = frozenset(),
    gates_constant: bool = False,
) -> set[fx.Node]:
    """Nodes that can carry relevance: float values computed from a float input, and integer values
    (token ids) moved by routing ops. An int -> float conversion (a mask turned into a bias) starts a
    constant, so attention masks never receive relevance; embeddings turn ids into relevance sinks.
    Outputs of ops in the ``constants`` families (CP-LRP: softmax) are constants too."""
    carry: set[fx.Node] = {n for n in inputs if _is_float(n) or _is_int(n)}
    for node in graph.nodes:
        if node.op != "call_function" or node in carry:
            continue
        if node.target is operator.getitem:
            parent = node.args[0]
            if parent in carry and (_is_float(node) or (_is_int(node) and _family(parent) is Family.ROUTE)):
                carry.add(node)
            continue
        spec = lookup(node.target)
        if node.target in CONSTANT_OPS or (spec is not None and spec.family in constants):
            continue
        _, tensors = bind(node)
        frozen = frozen_args(node, spec, carry, gates_constant)
        live = [(name, t) for name, t in tensors if t in carry and name not in frozen]
        if not live:
            continue
        if spec is not None and spec.family is Family.EMBEDDING:
            carry.add(node)
        elif _is_float(node) and any(_is_float(t) for _, t in live):
            carry.add(node)
        elif _is_int(node) and spec is not None and spec.family is Family.ROUTE:
            carry.add(node)
        elif spec is None and _is_float(node) and any(_is_float(t) for _, t in tensors):
            # an op without a rule that looks token ids up in a table (as an embedding bag does): carried,
            # so that planning reports it, rather than a constant that silently absorbs the ids' share. Ids
            # turned into values alone (log of a length) start a constant, like any int -> float conversion
            carry.add(node)
    return carry


def _family(node: fx.Node) -> Family | None:
    spec = lookup(node.target) if node.op == "call_function" else None
    return spec.family if spec else None


def plan(
    graph: fx.Graph,
    preset: Preset,
    inputs: dict[str, fx.Node],
    *,
    layers: Sequence[str] = (),
    on_unsupported: str = "error",
    modules: Mapping[str, nn.Module] | None = None,
    constants: Sequence[str] = (),
) -> Plan:
    """Walk ``graph`` in reverse topological order and assign a rule to every node relevance reaches.

    ``modules`` (path -> module) lets overrides keyed by module type match subclasses; the inputs named
    in ``constants`` are held constant (no relevance starts from or flows into them)."""
    explained_inputs = [node for name, node in inputs.items() if name not in constants]
    carry = carriers(graph, explained_inputs, preset.constants, preset.gates_constant)
    first = _first_layer(graph, preset, carry)
    context = _Context(preset, carry, on_unsupported, first, modules or {})
    output_node = next(n for n in graph.nodes if n.op == "output")
    explained = (
        output_node.args[0][0] if isinstance(output_node.args[0], (tuple, list)) else output_node.args[0]
    )
    if explained not in carry:
        held = [name for name in inputs if name in constants]
        raise LRPCError(
            "the explained output does not depend on any floating-point input or embedded token id, "
            "so no relevance can reach the inputs"
            + (
                f" (held constant: {', '.join(held)}, whose names match compile(..., constants=...); the default "
                "holds masks constant, '*mask*': pass constants=() or other patterns to explain them)"
                if held
                else ""
            )
        )
    reached = {explained}
    steps: list[Step] = []
    for node in reversed(list(graph.nodes)):
        if node not in reached or node.op != "call_function":
            continue
        if node.target is operator.getitem:
            reached.add(node.args[0])
            continue
        step = _step(node, context, reached)
        context.steps[node] = step
        for receiver in step.receivers:
            context.consumers.setdefault(receiver, []).append(node)
        steps.append(step)
    layer_nodes = {path: find_layer_output(graph, path).name for path in layers}
    call_nodes = [n for n in graph.nodes if n.op == "call_function" and n.target not in SIDE_EFFECT_OPS]
    return Plan(
        graph=graph,
        preset=preset,
        steps=steps,
        output=explained.name,
        inputs={name: node.name for name, node in inputs.items()},
        layers=layer_nodes,
        node_count=len(call_nodes),
        op_counts=Counter(op_name(n) for n in call_nodes),
        constants=tuple(name for name in inputs if name in constants),
    )


@dataclass(frozen=True)
class _Context:
    preset: Preset
    carry: set[fx.Node]
    on_unsupported: str
    first: fx.Node | None
    modules: Mapping[str, nn.Module]
    signs: dict[fx.Node, bool] = field(default_factory=dict)  # memo of :func:`nonnegative`
    steps: dict[fx.Node, Step] = field(default_factory=dict)  # the steps planned so far (downstream ones)
    # node name -> the planned nodes whose steps send it relevance (a grouped activation's step sits on
    # the region's output node, not on the inner node that reads the source)
    consumers: dict[str, list[fx.Node]] = field(default_factory=dict)
    dead: dict[tuple[fx.Node, bool], bool] = field(default_factory=dict)  # memo of :func:`_relevance_dead`


def _relevant(
    node: fx.Node, spec: OpSpec | None, carry: set[fx.Node], gates_constant: bool = False
) -> tuple[dict[str, Any], list, list, frozenset[str]]:
    args, tensors = bind(node)
    frozen = frozen_args(node, spec, carry, gates_constant)
    # integers carry relevance only as data moved by routing ops and as embedding indices: an int mask
    # multiplied into float activations (Mamba) is a constant there
    ints = spec is not None and spec.family in (Family.ROUTE, Family.EMBEDDING)
    return (
        args,
        tensors,
        [(name, t) for name, t in tensors if t in carry and name not in frozen and (ints or _is_float(t))],
        frozen,
    )


def _first_layer(graph: fx.Graph, preset: Preset, carry: set[fx.Node]) -> fx.Node | None:
    """The first parameterized layer reached from the input (Zennit's "first layer"), if the preset
    has a rule for it."""
    if preset.first is None:
        return None
    for node in graph.nodes:
        if node.op != "call_function" or node not in carry:
            continue
        spec = lookup(node.target)
        if spec is None:
            continue
        args, _, relevant, _ = _relevant(node, spec, carry, preset.gates_constant)
        if spec.family_for({name for name, _ in relevant}, args) in preset.first_families:
            return node
    return None


def _choose(node: fx.Node, spec: OpSpec | None, family: Family, ctx: _Context) -> Rule:
    """User rule for the op > module override > first-layer rule > the preset's rule for the family."""
    if spec is not None and spec.rule is not None:
        return spec.rule
    if ctx.preset.overrides:
        stack = [(path, ctx.modules.get(path)) for path, _ in module_stack(node)]
        rule = ctx.preset.override_for(family, stack)
        if rule is not None:
            return rule
    if node is ctx.first and ctx.preset.first is not None:
        return ctx.preset.first
    return ctx.preset.rule_for(family)


def _step(node: fx.Node, ctx: _Context, reached: set[fx.Node]) -> Step:
    if ACTIVATION_META in node.meta:
        return _activation_step(node, ctx, reached)
    spec = lookup(node.target)
    args, tensors, relevant, frozen = _relevant(node, spec, ctx.carry, ctx.preset.gates_constant)
    module = module_path(node)
    fallback = False
    if spec is None:
        complex_values = _is_complex(node) or any(_is_complex(t) for _, t in tensors)
        if ctx.on_unsupported == "error" or complex_values:
            val = node.meta.get("val")
            raise UnsupportedOperatorError(
                op_name(node), node.name, module, getattr(val, "shape", None), complex_values=complex_values
            )
        warnings.warn(
            f"lrpc: no LRP rule for {op_name(node)} at node '{node.name}' (module '{module}'); "
            "relevance is routed through its gradient (Gradient rule)",
            stacklevel=4,
        )
        family, rule, fallback = Family.GRADIENT, Gradient(), True
    else:
        family = spec.family_for({name for name, _ in relevant}, args)
        rule = _choose(node, spec, family, ctx)
    if rule.serves is not None and family.value not in rule.serves:
        raise RuleError(
            f"{rule.name} serves {sorted(rule.serves)} ops, but {op_name(node)} at node '{node.name}' "
            f"(module '{module}') is a '{family.value}' op"
        )
    if rule.unary and len(relevant) != 1:
        raise RuleError(
            f"{rule.name} needs exactly one relevant input, but {op_name(node)} at node '{node.name}' "
            f"(module '{module}') has {len(relevant)}"
        )
    receivers = _receivers(family, relevant)
    for t in receivers:
        reached.add(t)
    reads: list[str] = []
    if "inputs" in rule.reads:
        reads += [t.name for _, t in tensors]
    if "output" in rule.reads:
        reads.append(node.name)
    return Step(
        node=node.name,
        op=op_name(node),
        family=family.value,
        rule=rule,
        receivers=tuple(dict.fromkeys(t.name for t in receivers)),
        reads=tuple(dict.fromkeys(reads)),
        module=module,
        fallback=fallback,
        nonnegative=tuple(t.name for t in receivers if family in _LAYERS and nonnegative(t, ctx.signs)),
        negative_outputs_dead=family in _LAYERS and _relevance_dead(node, ctx, negative=True),
        frozen=tuple(sorted(frozen)),
    )


_LAYERS = frozenset({Family.LINEAR, Family.CONV, Family.CONV_TRANSPOSE})


def nonnegative(node: fx.Node, memo: dict[fx.Node, bool] | None = None) -> bool:
    """Whether ``node``'s value is >= 0 by construction: a ReLU (sigmoid, softmax, ...) output, moved,
    pooled or averaged by ops that keep signs. Decided from the graph alone, so it holds for every input."""
    memo = {} if memo is None else memo
    if node not in memo:
        memo[node] = False  # provisional; the graph is acyclic
        if node.op == "call_function":
            if node.target is operator.getitem:
                memo[node] = isinstance(node.args[0], fx.Node) and nonnegative(node.args[0], memo)
            elif node.target in NONNEGATIVE_OPS:
                memo[node] = True
            elif node.target in SIGN_PRESERVING_OPS:
                inputs = [a for a in node.all_input_nodes if isinstance(a.meta.get("val"), torch.Tensor)]
                memo[node] = bool(inputs) and all(nonnegative(a, memo) for a in inputs)
    return memo[node]


def _relevance_dead(node: fx.Node, ctx: _Context, *, negative: bool) -> bool:
    """Whether the relevance arriving at ``node`` is zero wherever its value is zero (``negative``: < 0),
    whatever the input. Every step that sends ``node`` relevance must do so: a rule with
    ``R_i = x_i ⊙ ...`` (zero where the value is zero, so not for ``negative``), a lone ReLU whose output
    has the property for zero (it is 0 wherever ``node`` is <= 0), or an op that moves values unchanged
    (max pooling, views, cat) whose output has it. A grouped activation (``relu(x) - c``, GELU written
    out) never qualifies. The consumers' steps are planned already: planning walks the graph backwards.
    The explained output is never dead (its seed can sit anywhere)."""
    key = (node, negative)
    if key in ctx.dead:
        return ctx.dead[key]
    ctx.dead[key] = False  # provisional; the graph is acyclic
    dead = not any(user.op == "output" for user in node.users)
    for user in node.users:
        if dead and user.target is operator.getitem:
            dead = _relevance_dead(user, ctx, negative=negative)
    for consumer in ctx.consumers.get(node.name, ()) if dead else ():
        step = ctx.steps[consumer]
        if ACTIVATION_META in consumer.meta:
            dead = False
        elif step.rule.zero_where_input_zero and not negative:
            continue
        elif isinstance(step.rule, Pass) and consumer.target is torch.ops.aten.relu.default:
            dead = _relevance_dead(consumer, ctx, negative=False)
        elif isinstance(step.rule, Route) and consumer.target in VALUE_MOVING_OPS:
            dead = _relevance_dead(consumer, ctx, negative=negative)
        else:
            dead = False
        if not dead:
            break
    ctx.dead[key] = dead
    return dead


def activation_name(region: Sequence[fx.Node]) -> str:
    """How an elementwise activation written with primitive ops shows in plans and reports."""
    return "activation(" + ", ".join(op_name(n).removeprefix("aten.").split(".")[0] for n in region) + ")"


def _activation_step(node: fx.Node, ctx: _Context, reached: set[fx.Node]) -> Step:
    """One step for a whole elementwise activation region (canonicalization grouped it)."""
    source, region = node.meta[ACTIVATION_META]
    rule = _choose(node, None, Family.PASS, ctx)
    receivers = (source,) if source in ctx.carry else ()
    reached.update(receivers)
    reads = ([source.name] if "inputs" in rule.reads else []) + (
        [node.name] if "output" in rule.reads else []
    )
    return Step(
        node=node.name,
        op=activation_name(region),
        family=Family.PASS.value,
        rule=rule,
        receivers=tuple(r.name for r in receivers),
        reads=tuple(reads),
        module=module_path(node),
    )


def _receivers(family: Family, relevant: list[tuple[str, fx.Node]]) -> list[fx.Node]:
    if family is Family.EMBEDDING:
        return [t for name, t in relevant if name == "indices"]
    if family is Family.NORM:
        return [t for name, t in relevant if name == "input"]
    return [t for _, t in relevant]


def find_layer_output(graph: fx.Graph, path: str) -> fx.Node:
    """The value a module returns: the last node created inside it that is used outside it."""

    members = [n for n in graph.nodes if n.op == "call_function" and belongs_to(n, path)]
    outputs = [n for n in members if _is_float(n) and any(not belongs_to(u, path) for u in n.users)]
    if not outputs:
        raise LRPCError(
            f"layer '{path}' has no output in the traced graph: it is not called in forward, its result is not "
            "used by the explained output, or it computes nothing a trace keeps (nn.Identity, a bare view): "
            "ask for the module that computes its input"
        )
    calls = {call for n in members for call in module_calls(n, path)}
    if len(calls) > 1:
        warnings.warn(
            f"lrpc: module '{path}' is called {len(calls)} times in forward; layers['{path}'] is the relevance at "
            "its last call's output (ask for the modules around the other calls for theirs)",
            stacklevel=2,
        )
    return outputs[-1]
