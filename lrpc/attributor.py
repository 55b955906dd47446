"""The user's entry point: ``lrpc.compile(model)`` returns an :class:`Attributor`; calling it traces,
plans, generates and compiles a relevance program for the input signature on first use, caches it, and
runs it.

>>> import torch, lrpc
>>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
>>> attributor = lrpc.compile(model, backend="eager")
>>> res = attributor(torch.randn(2, 4), target=1)
>>> res.relevance.shape
torch.Size([2, 4])
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import inspect
import math
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import sympy
import torch
import torch.utils._pytree as pytree
from torch import Tensor, fx, nn

from . import backends, ops
from .canonize import canonicalize
from .codegen import Signature, generate, relevance_function
from .errors import LRPCError
from .model_state import ModelState, being_traced
from .narrowing import NARROWED_FROM
from .planning import Plan
from .planning import plan as make_plan
from .presets import Preset
from .presets import resolve as resolve_preset
from .report import Report
from .targets import TargetSpec, index_tensor
from .targets import parse as parse_target
from .tracing import (
    OutputSelector,
    ShapeConditions,
    Traced,
    check_model_runs,
    check_traceable,
    module_path,
    shape_conditions,
    trace,
)

ON_UNSUPPORTED = ("error", "warn")
DEFAULT_CONSTANTS = ("*mask*",)


@dataclass
class Attribution:
    """What one call returns.

    ``relevance`` is the input relevance: a tensor when one input is explained, else a tuple in call
    order. ``inputs`` holds the same by argument name. Float inputs get relevance shaped like
    themselves; token-id inputs get per-token relevance ``(B, T)``. ``target`` is the class index explained
    per sample (``None`` when the target was a callable or the output has no class dimension).
    """

    output: Tensor
    relevance: Tensor | tuple[Tensor, ...]
    inputs: dict[str, Tensor]
    layers: dict[str, Tensor]
    target: Tensor | None


@dataclass
class Program:
    """One compiled relevance program, valid for one input signature (dynamic dims within their ranges)."""

    traced: Traced
    plan: Plan
    graph_module: fx.GraphModule
    signature: Signature
    target: TargetSpec
    backend: str
    run: Callable[..., tuple]
    timings: dict[str, float] = field(default_factory=dict)
    # dynamic-dim values of the example it was traced on
    symbols: dict[str, int] = field(default_factory=dict)
    # the relevance pass specialized a dynamic dim, or the trace assumed what a call's sizes cannot decide:
    # only the traced sizes match
    static: bool = False
    #: what the trace assumed about the dynamic sizes beyond their ranges (usually nothing)
    conditions: ShapeConditions = field(default_factory=ShapeConditions)
    calls: int = 0
    _held: dict[tuple[int, ...], bool] = field(default_factory=dict, repr=False)  # conditions, per sizes seen

    def bind(self, tensors: Sequence[Tensor]) -> dict[str, int] | None:
        """Symbol values if ``tensors`` fit this program's shapes, ranges and conditions, else ``None``."""
        values: dict[str, int] = {}
        exprs = []
        for spec, t in zip(self.traced.inputs, tensors):
            if t.dim() != len(spec.shape):
                return None
            for want, got in zip(spec.shape, t.shape):
                if isinstance(want, int):
                    if want != got:
                        return None
                elif want.isidentifier():
                    if values.setdefault(want, got) != got:
                        return None
                else:
                    exprs.append((want, got))
        for sym, value in values.items():
            lower, upper = self.traced.ranges.get(sym, (0, math.inf))
            if not lower <= value <= upper:
                return None
            if self.static and self.symbols.get(sym) != value:
                return None
        for expr, got in exprs:
            if int(sympy.sympify(expr).subs(values)) != got:
                return None
        if self.conditions.exprs and not self._conditions_hold(values):
            return None
        return values

    def _conditions_hold(self, values: dict[str, int]) -> bool:
        key = tuple(values.values())  # symbols in input order: the same order on every call
        held = self._held.get(key)
        if held is None:
            if len(self._held) >= 4096:
                self._held.clear()
            held = self._held[key] = self.conditions.hold(values)
        return held

    @functools.cached_property
    def output_example(self) -> Tensor:
        """The explained output as traced (a fake tensor: shape, dtype)."""
        return self.plan.graph.find_nodes(op="output")[0].args[0][0].meta["val"]

    def code(self) -> str:
        """The generated relevance program as readable Python."""
        return self.graph_module.print_readable(print_output=False)


class Attributor:
    """Explains a model with LRP. Create with :func:`compile`; call like the model, plus ``target=``.

    Calling traces and compiles on the first call for each input signature (dtypes, device, ranks,
    non-dynamic sizes, target mode); later calls with the same signature reuse the program. The first
    program of a signature is compiled for its sizes; a call with other sizes compiles one whose dynamic
    dimensions (batch; sequence length of token ids; those whose size changed) take any size where export
    allows (``dynamic=``).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        rules: str | Preset = "epsilon",
        layers: Sequence[str] | str | None = (),
        backend: str = "auto",
        seed: str | None = None,
        output: OutputSelector = None,
        on_unsupported: str = "error",
        dynamic: bool | None = None,
        cache_size: int = 16,
        constants: Sequence[str] = DEFAULT_CONSTANTS,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"lrpc.compile expects an nn.Module, got {type(model).__name__}")
        check_traceable(model)
        if on_unsupported not in ON_UNSUPPORTED:
            raise LRPCError(f"on_unsupported must be one of {ON_UNSUPPORTED}, got {on_unsupported!r}")
        layers = () if layers is None else (layers,) if isinstance(layers, str) else tuple(layers)
        if not isinstance(cache_size, int) or isinstance(cache_size, bool) or cache_size < 1:
            raise LRPCError(f"cache_size must be a positive int (programs kept), got {cache_size!r}")
        if dynamic not in (None, True, False):
            raise LRPCError(f"dynamic must be None (automatic), True or False, got {dynamic!r}")
        for path in layers:
            if not isinstance(path, str):
                raise LRPCError(
                    f"layers: module paths are strings ('0', 'features.3', as named_modules() gives them), "
                    f"got {path!r} ({type(path).__name__})"
                )
            try:
                model.get_submodule(path)
            except AttributeError:
                raise LRPCError(f"layers: {type(model).__name__} has no submodule '{path}'") from None
        self.preset = resolve_preset(rules)
        _warn_unmatched_overrides(self.preset, model)
        seed = seed or self.preset.seed
        parse_target(None, seed)  # validates seed
        self.model = model
        self.layers = tuple(layers)
        self.backend = backends.resolve(backend)
        self.seed = seed
        self.output = output
        self.on_unsupported = on_unsupported
        self.dynamic = dynamic
        self.cache_size = cache_size
        self.constants = (constants,) if isinstance(constants, str) else tuple(constants)
        self._cache: OrderedDict[tuple, list[Program]] = OrderedDict()
        self._cache_lock = threading.Lock()  # the cache's order and counts, for calls from several threads
        self._state = ModelState(model, on_change=self._forget_programs)
        self._shadowed = _shadowed_parameters(model)
        self.stats = {"traces": 0, "hits": 0, "calls": 0}
        self._last: Program | None = None
        # the last call's program and relevance, one tuple so that report() never pairs one call's program with
        # another's relevance (threads; a program() or plan() in between); summed by report(), not per call
        self._last_relevance: tuple[Program, tuple[Tensor, ...], Tensor] | None = None

    # -- calling -------------------------------------------------------------------------------
    def __call__(self, *args: Any, target: Any = None, seed: str | None = None, **kwargs: Any) -> Attribution:
        if self._shadowed:
            self._check_shadowed(args, target=target, seed=seed)
        spec, index = parse_target(target, seed or self.seed)
        autocast = _autocast_state()
        program, tensors, sizes = self._program(args, kwargs, spec, autocast)
        # the program was traced on contiguous inputs: its views (a flatten after a convolution) assume them
        tensors = [t if t.is_contiguous() else t.contiguous() for t in tensors]
        extra = []
        if spec.mode == "index":
            _check_has_classes(program, index)
            extra.append(index_tensor(index, _batch(program, sizes), tensors[0].device))
            _check_classes(index if isinstance(index, int) else extra[-1], program, sizes)
        start = time.perf_counter()
        arguments = (*program.traced.state, *tensors, *extra)
        try:
            with torch.no_grad():
                if autocast:
                    with _without_autocast():
                        outs = program.run(*arguments)
                else:
                    outs = program.run(*arguments)
        except (LRPCError, torch.OutOfMemoryError):
            raise
        except Exception as e:  # name the node: a compiled program's own error does not say where
            message = _run_failure(self.model, program, arguments, e)
            try:  # the model's own error first: export may trace a call the model cannot run (torch 2.11
                # traces a float64 input into a float32 model)
                check_model_runs(self.model, args, kwargs, self.output)
            except LRPCError as own:
                raise LRPCError(f"{own}\n{message or ''}".rstrip()) from e
            if message is None:  # the program runs node by node: the backend failed, say so as it did
                raise
            raise LRPCError(message) from e
        elapsed = time.perf_counter() - start
        program.timings.setdefault("first_call", elapsed)
        program.timings["last_call"] = elapsed
        program.calls += 1
        program.backend = getattr(program.run, "backend", program.backend)  # "eager" after a fallback
        with self._cache_lock:
            self.stats["calls"] += 1
        return self._result(program, tensors, outs)

    def program(self, *args: Any, target: Any = None, seed: str | None = None, **kwargs: Any) -> Program:
        """The compiled program that a call with these arguments runs (compiling it if needed)."""
        if self._shadowed:
            self._check_shadowed(args, target=target, seed=seed)
        spec, _ = parse_target(target, seed or self.seed)
        return self._program(args, kwargs, spec, _autocast_state())[0]

    def graph_module(self, *args: Any, target: Any = None, **kwargs: Any) -> fx.GraphModule:
        """The generated relevance program (forward + relevance pass) as an ``fx.GraphModule``."""
        return self.program(*args, target=target, **kwargs).graph_module

    def plan(self, *args: Any, target: Any = None, **kwargs: Any) -> Plan:
        """The plan (rule per node, values kept) for a call with these arguments."""
        return self.program(*args, target=target, **kwargs).plan

    def report(self) -> Report:
        """Coverage, rules and timings of the most recently used program."""
        program, last = self._last, self._last_relevance
        if program is None:
            raise LRPCError("report() is available after the first call")
        conservation = None
        if last is not None and last[0] is program:
            _, values, seed_total = last
            conservation = (sum(v.sum() for v in values) if values else seed_total.new_zeros(()), seed_total)
        return Report.build(self.model, program, conservation)

    def _check_shadowed(self, args: tuple, **given: Any) -> None:
        """``target=`` and ``seed=`` are lrpc's: where the model's forward has a parameter of that name, it
        must come positionally, or the call would be ambiguous (lrpc took it, and the model never saw it)."""
        for name, position in self._shadowed.items():
            if given[name] is None or (position is not None and len(args) > position):
                continue
            head = (
                f"{type(self.model).__name__}.forward takes an argument named '{name}', and {name}= of an lrpc "
                f"call is lrpc's own ({'the class to explain' if name == 'target' else 'the seed'}), never the model's"
            )
            if position is None:
                raise LRPCError(f"{head}; the model's is keyword-only: wrap the model in a module that names it otherwise")
            raise LRPCError(f"{head}: pass the model's '{name}' positionally, as argument {position + 1} of the call")

    # -- compiling -----------------------------------------------------------------------------
    def _key(self, args: tuple, kwargs: dict, spec: TargetSpec, autocast: tuple) -> tuple[tuple, list[Tensor]]:
        if all(type(x) is Tensor for x in args) and all(type(x) is Tensor for x in kwargs.values()):
            # the common call, tensors only: its structure without pytree (a third of a tiny model's call)
            tensors = [*args, *kwargs.values()]
            structure: Any = (len(args), tuple(kwargs))
            constants: list = []
        else:
            leaves, tree = pytree.tree_flatten((args, kwargs))  # names are only needed when compiling
            tensors = [x for x in leaves if isinstance(x, Tensor)]
            structure, constants = str(tree), []
            for x in leaves:
                if not isinstance(x, Tensor):
                    if hasattr(x, "__array__") and getattr(x, "ndim", 0) > 0:  # an array; NumPy scalars pass
                        raise LRPCError(
                            f"got a {type(x).__name__} argument: lrpc explains tensors; pass torch.from_numpy(x) "
                            "(or torch.as_tensor) on the model's device"
                        )
                    try:
                        hash(x)
                    except TypeError:
                        raise LRPCError(
                            f"non-tensor argument of type {type(x).__name__} is not hashable; lrpc bakes "
                            "non-tensor arguments into the compiled program and caches on them"
                        ) from None
                    constants.append((type(x).__name__, x))
        if not tensors:
            raise LRPCError("the call has no tensor inputs to explain")
        key = (
            structure,
            tuple(constants),
            tuple((t.dtype, t.device, t.dim()) for t in tensors),
            spec,
            ops.table_version(),
            autocast,
            self._state.dtype_and_device(),
        )
        return key, tensors

    def _forget_programs(self) -> None:
        with self._cache_lock:
            self._cache.clear()

    def _program(
        self, args: tuple, kwargs: dict, spec: TargetSpec, autocast: tuple
    ) -> tuple[Program, list[Tensor], dict[str, int]]:
        """The program for this call (``autocast``: :func:`_autocast_state`), its tensors, and the sizes its
        dynamic dims take."""
        key, tensors = self._key(args, kwargs, spec, autocast)
        found = self._cached(key, tensors)
        if found is None:
            with backends.COMPILE_LOCK:
                found = self._cached(key, tensors)  # compiled by another thread while this one waited
                if found is None:
                    program = self._compile(args, kwargs, spec, tensors, self._dynamic(key), self._grown(key, tensors))
                    found = self._add(key, program, tensors)
        program, sizes = found
        return program, tensors, sizes

    def _dynamic(self, key: tuple) -> bool:
        # automatic dynamic shapes (torch.compile's default): sizes seen before under this signature did
        # not fit, so the next program takes any batch / sequence size
        return self.dynamic if self.dynamic is not None else key in self._cache

    def _grown(self, key: tuple, tensors: list[Tensor]) -> list[set[int]]:
        """Per tensor input, the dims whose size differs from a cached program of this signature that had them
        static (a float sequence's length; batch and token dims are dynamic anyway): the next program makes
        them dynamic, as torch.compile's automatic dynamic shapes would."""
        grown: list[set[int]] = [set() for _ in tensors]
        with self._cache_lock:
            programs = list(self._cache.get(key, []))
        for program in programs:
            for dims, spec, t in zip(grown, program.traced.inputs, tensors):
                dims.update(d for d, (want, got) in enumerate(zip(spec.shape, t.shape)) if isinstance(want, int) and want != got)
        return grown

    def _add(self, key: tuple, program: Program, tensors: list[Tensor]) -> tuple[Program, dict[str, int]]:
        with self._cache_lock:
            self._cache.setdefault(key, []).append(program)
            self._cache.move_to_end(key)
            while sum(len(v) for v in self._cache.values()) > self.cache_size:
                oldest = next(iter(self._cache))
                self._cache[oldest].pop(0)
                if not self._cache[oldest]:
                    del self._cache[oldest]
            self._last = program
        return program, program.bind(tensors) or {}

    def _cached(self, key: tuple, tensors: list[Tensor]) -> tuple[Program, dict[str, int]] | None:
        """A cached program these tensors fit, and the sizes its dynamic dims take."""
        with self._cache_lock:
            for program in self._cache.get(key, []):
                sizes = program.bind(tensors)
                if sizes is not None:
                    self._cache.move_to_end(key)
                    self.stats["hits"] += 1
                    self._last = program
                    return program, sizes
        return None

    def _plan(self, traced: Traced) -> tuple[Traced, Plan]:
        """Canonicalize ``traced``'s graph and plan it. Where narrowing cut down a layer whose rule holds a
        value per position (ZBox bounds shaped like a sample of tokens), that layer must see every position:
        plan again, from a copy of the trace, with those layers whole (rare: only such rules need the copy)."""
        per_position = self.preset.holds_positions or any(r.holds_positions for r in ops.registered_rules())
        pristine = traced.copy() if per_position else None
        whole: set[str] = set()
        while True:
            graph = canonicalize(
                traced.graph, traced.user_placeholders, fold=self.preset.fold_batch_norm, keep=self.layers, whole=whole
            )
            inputs = {s.name: n for s, n in zip(traced.inputs, traced.user_placeholders)}
            the_plan = make_plan(
                graph,
                self.preset,
                inputs,
                layers=self.layers,
                on_unsupported=self.on_unsupported,
                modules=dict(self.model.named_modules()),
                constants=[name for name in inputs if any(fnmatch.fnmatchcase(name, p) for p in self.constants)],
            )
            nodes = {n.name: n for n in graph.nodes}
            # each round keeps more nodes whole, none of them narrowed before: it ends
            met = {
                nodes[step.node].meta[NARROWED_FROM]
                for step in the_plan.steps
                if step.rule.holds_positions and NARROWED_FROM in nodes[step.node].meta
            }
            if pristine is None or not met:
                return traced, the_plan
            whole |= met
            traced = pristine.copy()

    def _compile(
        self, args: tuple, kwargs: dict, spec: TargetSpec, tensors: list[Tensor], dynamic: bool, grown: list[set[int]]
    ) -> Program:
        self.stats["traces"] += 1
        with being_traced(self.model):
            traced = trace(self.model, args, kwargs, output=self.output, dynamic=dynamic, grown=grown)
        try:
            with _without_autocast():  # the trace has the casts autocast made; the relevance pass adds none
                return self._generate(traced, spec, tensors)
        except LRPCError:
            with being_traced(self.model):
                check_model_runs(self.model, args, kwargs, self.output)  # a rule failing where the model does
            raise

    def _generate(self, traced: Traced, spec: TargetSpec, tensors: list[Tensor]) -> Program:
        start = time.perf_counter()
        traced, the_plan = self._plan(traced)
        graph = the_plan.graph
        planned = time.perf_counter()
        examples: list[Any] = [n.meta["val"] for n in graph.nodes if n.op == "placeholder"]
        if spec.mode == "index":
            examples.append(_index_example(graph, the_plan))
        shape_env = _shape_env(examples)
        before = _symbol_state(shape_env)
        backend = backends.choose(self.backend)
        gm, signature = generate(the_plan, spec, examples, recompute=functools.partial(backends.recomputes, backend))
        after = _symbol_state(shape_env)
        # A symbol replaced by a value: the program only fits the traced shapes. A narrowed range (a guard
        # like the convolution's backend choice, batch < 16): the program fits that range.
        static = after is not None and after[0] != before[0]
        if after != before and not static:
            _narrow_ranges(traced, shape_env)
        names = {d for spec in traced.inputs for d in spec.shape if isinstance(d, str) and d.isidentifier()}
        conditions = shape_conditions(shape_env, names) if shape_env is not None and not static else ShapeConditions()
        if conditions is None:  # the trace assumed what a call's sizes cannot decide
            static, conditions = True, ShapeConditions()
        generated = time.perf_counter()
        if backend == backends.INTERPRET:
            run, _ = relevance_function(the_plan, spec)
        else:
            run = backends.build(backend, gm, fallback=self.backend == backends.AUTO)
        symbols = {
            want: got
            for s, t in zip(traced.inputs, tensors)
            for want, got in zip(s.shape, t.shape)
            if isinstance(want, str) and want.isidentifier()
        }
        timings = {"trace": traced.seconds, "plan": planned - start, "codegen": generated - planned}
        return Program(traced, the_plan, gm, signature, spec, backend, run, timings, symbols, static, conditions)

    # -- results -------------------------------------------------------------------------------
    def _result(self, program: Program, tensors: list[Tensor], outs: tuple) -> Attribution:
        sig = program.signature
        output, used_index, seed_total = outs[0], outs[1], outs[2]
        rel_values = outs[3 : 3 + len(sig.relevance_names)]
        layer_values = outs[3 + len(sig.relevance_names) :]
        name_to_tensor = dict(zip(sig.input_names, tensors))
        inputs: dict[str, Tensor] = {}
        for name, r in zip(sig.relevance_names, rel_values):
            t = name_to_tensor[name]
            if r is None:
                if not t.is_floating_point():
                    continue
                r = torch.zeros_like(t)
            inputs[name] = r
        layers = dict(zip(sig.layer_names, layer_values))
        values = tuple(inputs.values())
        self._last_relevance = (program, values, seed_total)
        return Attribution(
            output=output,
            relevance=values[0] if len(values) == 1 else values,
            inputs=inputs,
            layers=layers,
            target=used_index,
        )


def _warn_unmatched_overrides(preset: Preset, model: nn.Module) -> None:
    """An override whose key names no module of ``model`` applies nowhere: a mistyped path would otherwise
    leave the preset's rule in place without a word."""
    modules = list(model.named_modules())
    for key, rule in preset.overrides:
        if isinstance(key, str):
            if any(fnmatch.fnmatchcase(path, key) for path, _ in modules):
                continue
            paths = ", ".join(repr(p) for p, _ in modules[1:7]) + (", ..." if len(modules) > 7 else "")
            what = f"no module path of {type(model).__name__} matches it (its modules: {paths or 'none'})"
        elif any(isinstance(m, key) for _, m in modules):
            continue
        else:
            what = f"{type(model).__name__} has no {key.__name__} module"
        label = repr(key) if isinstance(key, str) else key.__name__
        warnings.warn(f"lrpc: the override {label}: {rule.name} applies nowhere: {what}", stacklevel=4)


def _shadowed_parameters(model: nn.Module) -> dict[str, int | None]:
    """Parameters of ``model.forward`` named like an lrpc call's own keywords, with their position (``None``:
    keyword-only)."""
    try:
        parameters = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return {}
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return {
        p.name: (i if p.kind in positional else None)
        for i, p in enumerate(parameters)
        if p.name in ("target", "seed") and p.kind is not inspect.Parameter.VAR_KEYWORD
    }


_AUTOCAST_DEVICES = ("cpu", "cuda")


def _autocast_state() -> tuple[tuple[str, torch.dtype], ...]:
    """The devices autocast is on for, and its dtype there: a program traced under autocast has its casts."""
    if not (torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda")):  # every call: no generator
        return ()
    return tuple((d, torch.get_autocast_dtype(d)) for d in _AUTOCAST_DEVICES if torch.is_autocast_enabled(d))


@contextlib.contextmanager
def _without_autocast() -> Iterator[None]:
    """Autocast off where it is on: programs run (and are generated) with the casts their trace has, so that
    every backend computes in the same dtypes (the eager program's ops would be cast again, Inductor's not)."""
    with contextlib.ExitStack() as stack:
        for device, _ in _autocast_state():
            stack.enter_context(torch.autocast(device, enabled=False))
        yield


def _batch(program: Program, sizes: dict[str, int]) -> int:
    """The explained output's batch size for a call whose dynamic dims take ``sizes``."""
    return 1 if program.output_example.dim() == 0 else _output_size(program, 0, sizes)


def _output_size(program: Program, dim: int, sizes: dict[str, int]) -> int:
    """The explained output's size along ``dim`` for a call whose dynamic dims take ``sizes``."""
    size = program.output_example.shape[dim]
    if isinstance(size, int):
        return size
    return int(sympy.sympify(str(size.node.expr)).subs(sizes))


def _check_has_classes(program: Program, index: Any) -> None:
    """Class indices pick from an output's last dimension: one score per sample has none to pick from."""
    out = program.output_example
    if out.dim() <= 1:
        shown = index if isinstance(index, int) else f"a tensor of shape {tuple(index.shape)}"
        raise LRPCError(
            f"target={shown} picks a class, but the explained output {tuple(out.shape)} is "
            f"{'a scalar' if out.dim() == 0 else 'one score per sample'}, with no class dimension: drop target= "
            "to explain the score itself, pass output= to explain another of the model's outputs, or a callable "
            "target for another seed"
        )


def _check_classes(index: int | Tensor, program: Program, sizes: dict[str, int]) -> None:
    """A class index outside the output's class dimension selects nothing: say so before running."""
    out = program.output_example
    if out.dim() < 2:
        return
    shape = tuple(_output_size(program, d, sizes) for d in range(out.dim()))  # this call's, dynamic dims too
    classes = shape[-1]
    if isinstance(index, int):
        bad = [index] if not 0 <= index < classes else []
    elif index.numel() and (int(index.min()) < 0 or int(index.max()) >= classes):
        bad = index[(index < 0) | (index >= classes)].unique()[:8].tolist()
    else:
        bad = []
    if bad:
        raise LRPCError(f"target index out of range: {bad}; the output {shape} has {classes} classes")


def _index_example(graph: fx.Graph, the_plan: Plan) -> Tensor:
    out = next(n for n in graph.nodes if n.name == the_plan.output).meta["val"]
    fake_mode = out.fake_mode
    with fake_mode:
        return torch.empty(out.shape[0] if out.dim() else 1, dtype=torch.long, device=out.device)


def _shape_env(examples: list[Any]) -> Any:
    for val in examples:
        mode = getattr(val, "fake_mode", None)
        if mode is not None and mode.shape_env is not None:
            return mode.shape_env
    return None


def _symbol_state(shape_env: Any) -> Any:
    """What the relevance tracing could have narrowed: replacements and value ranges of the symbols."""
    if shape_env is None:
        return None
    return (
        {str(k): str(v) for k, v in shape_env.replacements.items()},
        {str(k): str(v) for k, v in shape_env.var_to_range.items()},
    )


def _run_failure(model: nn.Module, program: Program, arguments: tuple, error: Exception) -> str | None:
    """What to say when a program raises at run time (an op the trace saw with fake values fails on real
    ones, as a float64 ``finfo.min`` filled into a float32 tensor does): the node, its op and module, and
    the line of the model's source it came from; ``None`` if the program runs node by node."""
    node = backends.failing_node(program.graph_module, arguments)
    if node is None:
        return None
    frames = (node.meta.get("stack_trace") or "").strip().splitlines()
    source = next((line.strip() for line in reversed(frames) if line.strip().startswith("File ")), "")
    return (
        f"{type(model).__name__}'s relevance program failed at run time at node '{node.name}' ({node.target}, "
        f"module '{module_path(node)}'{f', {source}' if source else ''}): {type(error).__name__}: {error}"
    )


def _narrow_ranges(traced: Traced, shape_env: Any) -> None:
    """Intersect the traced ranges of the dynamic dims with what the relevance tracing guarded on."""
    for sym, vr in shape_env.var_to_range.items():
        name = str(sym)
        if name in traced.ranges:
            lower, upper = traced.ranges[name]
            traced.ranges[name] = (
                max(lower, _int_bound(vr.lower, lower)),
                min(upper, _int_bound(vr.upper, upper)),
            )


def _int_bound(value: Any, default: Any) -> Any:
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError, AttributeError):
        return default


def compile(model: nn.Module, **options: Any) -> Attributor:
    """Prepare ``model`` for LRP explanations. Nothing is traced until the first call.

    Args:
        model: any ``nn.Module`` that ``torch.export`` can trace (non-strict). It is never modified; a
            model in training mode is explained in eval semantics, with a warning.
        rules: a preset name (``"epsilon"``, ``"lrp0"``) or an :class:`lrpc.presets.Preset`.
        layers: module paths whose output relevance is returned too (``res.layers``), same pass; one path
            may be given as a string.
        backend: ``"auto"`` (default: Inductor, the fastest per call on CPU and CUDA; a program that
            cannot compile runs eagerly, with a warning), ``"inductor"``,
            ``"triton"`` (CUDA: lrpc's fused kernels plus Inductor),
            ``"eager"`` (the generated program as is) or ``"interpret"`` (the rules run eagerly without
            tracing: the reference).
        seed: ``"logit"`` puts the selected output value in as relevance; ``"one"`` puts in 1.0. Default:
            the preset's (``"one"`` for ``"dynamiclrp"``, else ``"logit"``).
        output: which model output to explain: a callable on the output, an index or a key/attribute
            name; default the first tensor (``logits`` for Hugging Face models).
        on_unsupported: ``"error"`` raises :class:`lrpc.UnsupportedOperatorError` for an op with no
            rule; ``"warn"`` routes relevance through its gradient, warns, and records the fallback.
        dynamic: ``None`` (default, like ``torch.compile``'s automatic dynamic shapes): the first program
            for an input signature is compiled for its exact sizes (faster to compile: BERT-base's first
            call with Inductor on 2 CPU cores took 39 s instead of 68 s); a later call with new sizes
            compiles one program whose batch, token sequence and changed dimensions are dynamic where
            export allows, and that program serves the sizes after. ``True``: dynamic from
            the first call (for inputs whose sizes change from call to call). ``False``: never dynamic,
            a program per shape.
        cache_size: how many compiled programs to keep (least recently used are dropped).
        constants: input names (glob patterns) held constant: they get no relevance and relevance does
            not flow into them. Default ``("*mask*",)``: attention, pixel and head masks say where to
            look, they are not evidence (Hugging Face passes float masks too). ``()`` explains every input.
    """
    return Attributor(model, **options)
