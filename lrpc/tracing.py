"""Tracing: a model and example inputs -> an aten graph (``torch.export``, non-strict), with the ops
whose LRP rule is defined at that level kept whole and everything else decomposed to core aten.

The model is never changed: it is wrapped (inputs flattened, the explained output selected), put in
eval mode only for the duration of the export, and its flags restored afterwards.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import warnings
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import sympy
import torch
import torch.utils._pytree as pytree
from torch import Tensor, fx, nn
from torch._prims_common import compute_elementwise_output_logical_to_physical_perm
from torch.export import Dim, ExportedProgram
from torch.export.graph_signature import InputKind, OutputKind
from torch.utils._sympy.value_ranges import bound_sympy

from .errors import LRPCError, TraceError

aten = torch.ops.aten

#: Ops kept whole by the decomposition: their LRP rules are defined at this level.
PRESERVED_OPS = (
    aten.linear.default,
    aten.silu.default,
    aten.hardswish.default,
    aten.hardsigmoid.default,
    aten.softplus.default,
    aten.mish.default,
    aten.relu6.default,
    aten.rms_norm.default,
)

_WRAPPED = "model"  # attribute under which the user's model sits inside the export wrapper

OutputSelector = Callable[[Any], Tensor] | int | str | None


def scaled_dot_product_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> Tensor:
    """lrpc's decomposition of SDPA: ``softmax(Q Kᵀ * scale + mask) V``, so that the product and softmax
    rules apply to its parts. Dropout is not applied (explanations use eval semantics). Unlike the
    default decomposition it returns the output in the query's memory layout, as torch's SDPA does
    (models ``view`` the result).

    It computes what ``torch.nn.functional.scaled_dot_product_attention`` computes: positions masked by
    ``is_causal``, a boolean mask or ``-inf`` get the dtype's lowest finite score (no NaN from ``-inf``),
    and a query row with every key masked that way attends to nothing (output 0, as torch's SDPA
    returns); finite additive masks (``finfo.min``) are added as they are."""
    scale = 1.0 / math.sqrt(query.size(-1)) if scale is None else scale
    if enable_gqa:
        repeat = query.size(-3) // key.size(-3)
        key, value = key.repeat_interleave(repeat, -3), value.repeat_interleave(repeat, -3)
    scores = torch.matmul(query, key.transpose(-2, -1)) * scale
    masked = None
    if is_causal:
        L, S = query.size(-2), key.size(-2)
        masked = torch.ones(L, S, dtype=torch.bool, device=query.device).tril().logical_not()  # top-left, as torch
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            blocked = attn_mask.logical_not()
        else:
            blocked = attn_mask == float("-inf")
            scores = scores + attn_mask.masked_fill(blocked, 0.0)
        masked = blocked if masked is None else masked | blocked
    if masked is None:
        return _like_query(torch.matmul(torch.softmax(scores, dim=-1), value), query)
    scores = scores.masked_fill(masked, torch.finfo(scores.dtype).min)
    weights = torch.softmax(scores, dim=-1).masked_fill(masked.all(-1, keepdim=True), 0.0)
    return _like_query(torch.matmul(weights, value), query)


def _like_query(out: Tensor, query: Tensor) -> Tensor:
    """The output in the memory layout torch's SDPA gives it, that of the query (its fake kernel is an
    ``empty_like(query)``, whatever order the query's dims lie in memory): models ``view`` it after a
    transpose (DistilBERT, Qwen2-MoE), a permute (``nn.MultiheadAttention``: sequence first in memory)
    or directly (GPT-2), and the exported graph holds no copy before that view where the query's layout
    made one unnecessary. Torch 2.14's export re-inserts the copy where a view fails; 2.11's does not."""
    # the dims from outermost to innermost in memory, judged as torch's elementwise ops do (sizes of 1 and
    # symbolic strides included)
    order, _ = compute_elementwise_output_logical_to_physical_perm(query)
    inverse = sorted(range(len(order)), key=order.__getitem__)
    return out.permute(order).contiguous().permute(inverse)


_EMBEDDING_BAG_MEAN, _EMBEDDING_BAG_MAX = 1, 2  # aten's modes (0: sum)


def embedding_bag(
    weight: Tensor,
    indices: Tensor,
    offsets: Tensor,
    scale_grad_by_freq: bool = False,
    mode: int = 0,
    sparse: bool = False,
    per_sample_weights: Tensor | None = None,
    include_last_offset: bool = False,
    padding_idx: int = -1,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """lrpc's decomposition of ``aten._embedding_bag`` (``nn.EmbeddingBag``): an embedding lookup, then a
    per-bag sum (``index_add``), mean or max (``scatter_reduce``), whose rules exist: each id then gets the
    relevance of its row's share in its bag, as with ``nn.Embedding`` and a sum over the bag. Only the
    first output (the bags) is meant to be read; the others have the op's shapes."""
    n, dim = indices.shape[0], weight.shape[1]
    bags = offsets.shape[0] - (1 if include_last_offset else 0)
    # the bag of each index: how many bags start at or before its position (after the first)
    starts = offsets[1:bags].long()  # int32 offsets too: the counts below are int64 (cumsum's type)
    marks = torch.zeros(n + 1, dtype=torch.long, device=offsets.device).index_add(0, starts, torch.ones_like(starts))
    offset2bag = marks[:n].cumsum(0)
    # padded ids are left out of their bags: they go to one more bag, which is dropped
    into = offset2bag if padding_idx < 0 else torch.where(indices == padding_idx, bags, offset2bag)
    rows = torch.nn.functional.embedding(indices, weight)
    if per_sample_weights is not None:
        rows = rows * per_sample_weights.unsqueeze(-1)
    bag_size = torch.zeros(bags + 1, dtype=torch.long, device=offsets.device).index_add(
        0, into, torch.ones_like(into)
    )[:bags]
    empty = weight.new_zeros(bags + 1, dim)
    if mode == _EMBEDDING_BAG_MAX:
        out = empty.scatter_reduce(0, into.unsqueeze(-1).expand(n, dim), rows, "amax", include_self=False)[:bags]
        return out, offset2bag, bag_size, torch.zeros(bags, dim, dtype=torch.long, device=offsets.device)
    out = empty.index_add(0, into, rows)[:bags]
    if mode == _EMBEDDING_BAG_MEAN:
        out = out / bag_size.clamp(min=1).unsqueeze(-1).to(out.dtype)
    return out, offset2bag, bag_size, torch.zeros_like(bag_size)


def decomposition_table() -> dict:
    """The table passed to ``ExportedProgram.run_decompositions``."""
    table = torch.export.default_decompositions()
    for op in PRESERVED_OPS:
        if op in table:
            del table[op]
    table[aten.scaled_dot_product_attention.default] = scaled_dot_product_attention
    table[aten._embedding_bag.default] = embedding_bag
    table[aten._embedding_bag_forward_only.default] = embedding_bag
    return table


@dataclass(frozen=True)
class InputSpec:
    """One tensor input of the traced program: its name, dtype and shape (``int`` or a symbol name)."""

    name: str
    dtype: torch.dtype
    shape: tuple[int | str, ...]


@dataclass
class Traced:
    """The result of tracing: the decomposed aten graph and what is needed to call it."""

    program: ExportedProgram
    graph: fx.Graph
    inputs: list[InputSpec]  # user tensor inputs, in placeholder order
    state: list[Tensor]  # parameters, buffers and constants, in placeholder order
    ranges: dict[str, tuple[int, float]]  # symbol -> (lower, upper) for dynamic dimensions
    seconds: float = 0.0

    @property
    def user_placeholders(self) -> list[fx.Node]:
        return [n for n in self.graph.nodes if n.op == "placeholder"][len(self.state) :]

    def copy(self) -> Traced:
        """The same trace with its own graph (same node names and metadata), for passes to change."""
        graph = fx.Graph()
        returned, output = graph.graph_copy(self.graph, {}, return_output_node=True)
        graph.output(returned).meta.update(output.meta)
        return replace(self, graph=graph, ranges=dict(self.ranges))


class _Explained(nn.Module):
    """Takes the flat tensor inputs, rebuilds the user's call and returns the explained output."""

    def __init__(self, model: nn.Module, spec: pytree.TreeSpec, leaves: list[Any], select: OutputSelector):
        super().__init__()
        setattr(self, _WRAPPED, model)
        self._spec, self._leaves, self._select = spec, leaves, select
        self._tensor_slots = [i for i, leaf in enumerate(leaves) if isinstance(leaf, Tensor)]

    def forward(self, *tensors: Tensor) -> Tensor:
        leaves = list(self._leaves)
        for slot, t in zip(self._tensor_slots, tensors):
            leaves[slot] = t
        args, kwargs = pytree.tree_unflatten(leaves, self._spec)
        return select_output(getattr(self, _WRAPPED)(*args, **kwargs), self._select)


def select_output(out: Any, select: OutputSelector) -> Tensor:
    """The output to explain: ``select(out)`` for a callable, ``out[select]`` for an int or str, else
    the first floating-point tensor in ``out`` (Hugging Face outputs: the first field that is set, e.g.
    ``logits``; a model returning ``(predicted ids, logits)``: the logits) other than a loss, which a call
    with ``labels=`` puts first: the predictions are explained, not the loss (``output="loss"`` or
    ``output=0`` picks it). A loss is a ``loss`` entry, or, in a tuple (``return_dict=False``), a scalar
    followed by tensors that are not scalars. An integer or boolean output has no relevance to explain."""
    if select is None:
        if isinstance(out, Mapping) and "loss" in out and len(out) > 1:
            out = {k: v for k, v in out.items() if k != "loss"}
        leaves = [x for x in pytree.tree_leaves(out) if isinstance(x, Tensor)]
        if not leaves:
            raise TraceError(
                f"the model returned no tensor that lrpc can find (got {type(out).__name__}, which torch's pytree "
                "does not look into); pick the output to explain with output= (an attribute name, an index or "
                "a callable)"
            )
        scores = [x for x in leaves if x.is_floating_point()]
        if not scores:
            raise TraceError(
                f"the model returned only integer or boolean tensors ({', '.join(_describe(x) for x in leaves[:4])}): "
                "lrpc explains a floating-point score, such as the logits; return one, or pick it with output="
            )
        batched = [x for x in scores if x.dim() > 0]
        return batched[0] if isinstance(out, (tuple, list)) and scores[0].dim() == 0 and batched else scores[0]
    try:
        if callable(select):
            picked = select(out)
        elif isinstance(select, str) and not isinstance(out, dict) and hasattr(out, select):
            picked = getattr(out, select)
        else:
            picked = out[select]
    except Exception as e:  # the selector's error, not the model's
        raise TraceError(
            f"output={select!r} does not pick from what the model returned ({_describe(out)}): "
            f"{type(e).__name__}: {e}"
        ) from e
    if not isinstance(picked, Tensor):
        raise TraceError(f"output={select!r} picked a {type(picked).__name__} ({_describe(picked)}), not a tensor")
    if not picked.is_floating_point():
        raise TraceError(
            f"output={select!r} picked {_describe(picked)}: lrpc explains a floating-point "
            "score (the logits, not the predicted class ids)"
        )
    return picked


def _describe(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"a tensor of shape {tuple(value.shape)}" + ("" if value.is_floating_point() else f" ({value.dtype})")
    if isinstance(value, Mapping):
        return f"a {type(value).__name__} with keys {list(value)[:8]}"
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)}"
    return f"a {type(value).__name__}"


def flatten_inputs(model: nn.Module, args: tuple, kwargs: dict) -> tuple[list[Any], pytree.TreeSpec, list[str]]:
    """Flatten a call into leaves; name every leaf after the forward parameter it belongs to."""
    leaves_with_path, spec = pytree.tree_flatten_with_path((args, kwargs))
    try:
        params = list(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        params = []
    names = []
    for path, _ in leaves_with_path:
        head, rest = path[1], path[2:]
        if path[0].idx == 0:  # positional
            i = head.idx
            base = params[i] if i < len(params) and params[i] not in ("args", "kwargs") else f"args[{i}]"
        else:
            base = str(head.key)
        names.append(base + "".join(pytree.keystr((k,)) for k in rest) if rest else base)
    return [leaf for _, leaf in leaves_with_path], spec, names


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode for the duration, then restore each one's own flag."""
    flags = [(m, m.training) for m in model.modules()]
    try:
        for m, _ in flags:  # the flags themselves: an exported program's module refuses .eval()
            m.training = False
        yield
    finally:
        for m, training in flags:
            m.training = training


def _dynamic_shapes(tensors: Sequence[Tensor], grown: Sequence[Collection[int]] = ()) -> tuple:
    """Batch (dim 0) dynamic for every input; also the sequence (dim 1) for integer inputs (token ids), and
    the dims in ``grown`` (per tensor: those whose size changed between calls, a float sequence's length).
    Sizes 0 and 1 are left static (export would specialize them anyway, with a warning). Shaped for the
    wrapper's ``forward(*tensors)``: one entry, the tuple of per-tensor specs."""
    spec = []
    for i, t in enumerate(tensors):
        wanted = {0} | ({1} if not t.is_floating_point() else set()) | set(grown[i] if i < len(grown) else ())
        spec.append({d: Dim.AUTO for d in sorted(wanted) if d < t.dim() and t.shape[d] > 1})
    return (tuple(spec),)


def trace(
    model: nn.Module,
    args: tuple,
    kwargs: dict,
    *,
    output: OutputSelector = None,
    dynamic: bool = True,
    grown: Sequence[Collection[int]] = (),
) -> Traced:
    """Export ``model(*args, **kwargs)`` and decompose it with :func:`decomposition_table`. With ``dynamic``,
    batch and token dims are dynamic, and the dims in ``grown`` (per tensor input)."""
    import time

    start = time.perf_counter()
    if _builds_a_cache(model, kwargs):
        # a transformers model builds its key/value cache in Python (Gemma 2's and 3's do not export), and
        # the explained output does not read it
        kwargs = {**kwargs, "use_cache": False}
    wrapper, tensors, tensor_names = _wrapped_call(model, args, kwargs, output)
    if _trains_differently(model):
        warnings.warn(
            f"{type(model).__name__} is in training mode; lrpc explains it in eval semantics "
            "(dropout off, batch norm running statistics). The model's own mode is left unchanged.",
            stacklevel=5,  # the user's call: trace <- _compile <- _program <- __call__ / program()
        )
    with eval_mode(model), torch.no_grad(), _without_torchs_own_deprecations():
        program, error = _export(wrapper, tensors, dynamic, grown)
        if program is None:
            _check_model_runs(wrapper, tensors, tensor_names, model)
            raise TraceError(_export_message(model, kwargs, error)) from error
        try:
            program = program.run_decompositions(decomposition_table())
        except Exception as e:
            raise TraceError(f"decomposing the exported graph of {type(model).__name__} failed: {e}") from e
    program.example_inputs = None  # the program is cached: it must not keep the first call's inputs alive
    return _traced(program, wrapper, tensor_names, time.perf_counter() - start)


def _export(
    wrapper: nn.Module, tensors: list[Tensor], dynamic: bool, grown: Sequence[Collection[int]]
) -> tuple[ExportedProgram | None, Exception | None]:
    """``wrapper`` exported (non-strict), with dynamic dims if asked and without if that fails; else the
    last error."""
    error = None
    for shapes in ([_dynamic_shapes(tensors, grown)] if dynamic else []) + [None]:
        try:
            return torch.export.export(wrapper, tuple(tensors), dynamic_shapes=shapes, strict=False), None
        except LRPCError:  # lrpc's own finding (a wrong output= selector): not export's
            raise
        except Exception as e:  # noqa: BLE001 - reported by the caller with the export's own message
            error = e
    return None, error


def _builds_a_cache(model: nn.Module, kwargs: dict) -> bool:
    """Whether ``model`` (a transformers model) builds a key/value cache on this call: its config says
    ``use_cache=True``, its forward takes ``use_cache`` and the call does not set it."""
    if not _config_caches(model) or "use_cache" in kwargs:
        return False
    try:
        return "use_cache" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _config_caches(model: nn.Module) -> bool:
    """Whether ``model``'s (transformers) config asks for a key/value cache."""
    return getattr(getattr(model, "config", None), "use_cache", False) is True


@contextlib.contextmanager
def _without_torchs_own_deprecations() -> Iterator[None]:
    """Torch 2.11's export deep-copies its own ``LeafSpec``, which warns of that class's deprecation: a
    FutureWarning no user can act on (and an error where warnings are errors)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning)
        yield


#: torch.nn modules that compute otherwise in training mode.
_TRAINING_DEPENDENT = (
    nn.modules.dropout._DropoutNd,
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.RReLU,
    nn.MultiheadAttention,  # its dropout
    nn.Transformer, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer,
)


def _trains_differently(model: nn.Module) -> bool:
    """Whether a module in training mode may compute otherwise than in eval mode: one of torch.nn's that do,
    or a module of the user's own (its forward may read ``self.training``). Not for torch's other modules
    (an ``nn.Identity``, activations, an exported program's module), whose mode changes nothing here."""
    for m in model.modules():
        if not m.training or isinstance(m, fx.GraphModule):
            continue
        if isinstance(m, _TRAINING_DEPENDENT) or not type(m).__module__.startswith("torch."):
            return True
    return False


def check_traceable(model: nn.Module) -> None:
    """Raise :class:`TraceError` for models that ``torch.export`` cannot trace whatever their inputs, at
    ``lrpc.compile`` rather than with export's message about their internals at the first call."""
    if isinstance(model, torch.jit.RecursiveScriptModule):
        raise TraceError(
            f"{type(model).__name__} is a TorchScript module (torch.jit.script), which torch.export cannot "
            "trace: compile the nn.Module it was scripted from"
        )
    for path, module in model.named_modules():
        kind = type(module).__module__
        if kind.startswith(_QUANTIZED) and ".reference" not in kind:  # reference modules keep float weights
            raise TraceError(
                f"module '{path}' ({type(module).__module__}.{type(module).__name__}) is quantized: its packed "
                "integer weights cannot be traced, and LRP's rules are defined on real-valued layers. Explain the "
                "floating-point model it was quantized from"
            )


_QUANTIZED = ("torch.ao.nn.quantized", "torch.ao.nn.intrinsic.quantized")


def check_model_runs(model: nn.Module, args: tuple, kwargs: dict, output: OutputSelector = None) -> None:
    """Raise the model's own error on this call, if it has one (see :func:`_check_model_runs`): where a later
    stage failed on a call that export traced (a float64 input to a float32 model), that is the cause."""
    wrapper, tensors, tensor_names = _wrapped_call(model, args, kwargs, output)
    with eval_mode(model), torch.no_grad():
        _check_model_runs(wrapper, tensors, tensor_names, model)


def _wrapped_call(
    model: nn.Module, args: tuple, kwargs: dict, output: OutputSelector
) -> tuple[_Explained, list[Tensor], list[str]]:
    """The call as export takes it: the wrapper that rebuilds it, its tensors, and their argument names."""
    leaves, spec, names = flatten_inputs(model, args, kwargs)
    # traced contiguous, as every call runs them (Attributor.__call__): export specializes the program's
    # views to the example's strides, and a channels-last example would give views a contiguous input breaks
    tensors = [x.contiguous() for x in leaves if isinstance(x, Tensor)]
    tensor_names = [n for n, x in zip(names, leaves) if isinstance(x, Tensor)]
    return _Explained(model, spec, leaves, output), tensors, tensor_names


def _check_model_runs(wrapper: nn.Module, tensors: list[Tensor], names: list[str], model: nn.Module) -> None:
    """After export failed: if the model itself fails on these inputs, that is the error to report (a
    shape or dtype mismatch), not an export limitation. It runs on copies of the buffers: a forward that
    writes to them (a step counter, a running average) leaves the model as it was."""
    copies = {name: b.clone() for name, b in wrapper.named_buffers(remove_duplicate=False)}
    try:
        torch.func.functional_call(wrapper, copies, tuple(tensors))
    except LRPCError:
        raise
    except Exception as e:  # reported with the inputs' shapes
        shapes = ", ".join(f"{n} {tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}" for n, t in zip(names, tensors))
        raise LRPCError(f"{type(model).__name__} fails on the given inputs ({shapes}): {type(e).__name__}: {e}") from e


def _export_message(model: nn.Module, kwargs: dict, error: Exception) -> str:
    text = str(error).strip().splitlines()
    head = "\n".join(text[:12])
    # transformers' key/value caches (Gemma2's HybridCache, Mamba's) are built in Python from sizes
    cache = _config_caches(model) and kwargs.get("use_cache") is not False
    hint = (
        " This model's config has use_cache=True: its key/value cache is Python-side state, and "
        "model.config.use_cache = False (or use_cache=False in the call) usually makes it traceable."
        if cache
        else ""
    )
    return (
        f"torch.export could not trace {type(model).__name__}:\n{head}\n"
        "lrpc needs a model that torch.export can trace (non-strict). Data-dependent Python control flow "
        "and Python-side state are the usual causes: rewrite the branch with torch.where / torch.cond, or "
        "explain the traceable part of the model (pass output= or wrap the submodule)." + hint
    )


def _traced(program: ExportedProgram, wrapper: nn.Module, names: list[str], seconds: float) -> Traced:
    state: list[Tensor] = []
    for spec in program.graph_signature.input_specs:
        if spec.kind == InputKind.PARAMETER:
            state.append(wrapper.get_parameter(spec.target))
        elif spec.kind == InputKind.BUFFER:
            state.append(wrapper.get_buffer(spec.target))
        elif spec.kind in (InputKind.CONSTANT_TENSOR, InputKind.CUSTOM_OBJ):
            state.append(program.constants[spec.target])
        elif spec.kind != InputKind.USER_INPUT:
            raise TraceError(f"unsupported exported input kind {spec.kind} for '{spec.target}'")
    graph = program.graph
    users = [n for n in graph.nodes if n.op == "placeholder"][len(state) :]
    # A forward that writes to its buffers, parameters or inputs (a step counter; RWKV rescales its weights
    # on its first call in eval mode) returns the written values before its own: explain only its own, and
    # write nothing (the program computes with the written values where the forward reads them).
    specs = program.graph_signature.output_specs
    if any(spec.kind is not OutputKind.USER_OUTPUT for spec in specs):
        output = next(n for n in graph.nodes if n.op == "output")
        output.args = (tuple(v for v, spec in zip(output.args[0], specs) if spec.kind is OutputKind.USER_OUTPUT),)
        graph.eliminate_dead_code()
        # an input is named as the user's call names it, not as the wrapper's placeholder (tensors_0)
        called = {n.name: name for name, n in zip(names, users)}
        written = [
            called.get(spec.target, _strip(spec.target))
            for spec in specs
            if spec.kind is not OutputKind.USER_OUTPUT and spec.target
        ]
        if written:
            model = getattr(wrapper, _WRAPPED)
            warnings.warn(
                f"{type(model).__name__}'s forward writes to {', '.join(written[:3])}"
                f"{f' and {len(written) - 3} more' if len(written) > 3 else ''}: lrpc explains the traced call "
                "(with what it writes there) and writes nothing back; where the model's later calls read what "
                "earlier ones wrote, they may differ from lrpc's cached program",
                stacklevel=6,  # the user's call: _traced <- trace <- _compile <- _program <- __call__
            )
    inputs = []
    for name, node in zip(names, users):
        val = node.meta["val"]
        # a size export specialized (MaxPool1d fixes a length marked dynamic) is a number, not an expression
        shape = tuple(int(d) if isinstance(d, int) or d.node.expr.is_number else str(d.node.expr) for d in val.shape)
        inputs.append(InputSpec(name, val.dtype, shape))
    ranges = {}
    for sym, vr in program.range_constraints.items():
        ranges[str(sym)] = (_bound(vr.lower, 0), _bound(vr.upper, math.inf))
    return Traced(program, graph, inputs, state, ranges, seconds)


@dataclass(frozen=True)
class ShapeConditions:
    """What a trace assumed about its dynamic sizes beyond their ranges: the shape environment's guards
    that the symbols' value ranges do not imply. Export keeps such a guard (a branch on ``length % 2``, a
    pad taken only where a window does not divide the length) in its shape environment, not in the range
    constraints or the graph, and the program holds only the branch it traced: sizes that break it must
    not run it."""

    exprs: tuple[Any, ...] = ()  # sympy conditions over the input symbols

    def hold(self, sizes: Mapping[str, int]) -> bool:
        """Whether every condition holds at ``sizes`` (symbol name -> size)."""
        for expr in self.exprs:
            value = expr.xreplace({s: sympy.Integer(sizes[s.name]) for s in expr.free_symbols})
            if value is not sympy.true:
                return False
        return True


def shape_conditions(shape_env: Any, symbols: Collection[str]) -> ShapeConditions | None:
    """The guards of ``shape_env`` (after export and the relevance tracing) that its symbols' ranges do not
    imply, as :class:`ShapeConditions`; ``None`` if one reads a symbol outside ``symbols`` (the input dims'
    own), which a call's sizes cannot decide. Programs of BERT, GPT-2 or Llama over batch and length, or of
    a CNN over batch, get none (every guard implied) and pay nothing per call; ResNet-50 over image sizes
    gets 15, torchvision's Swin 462."""
    exprs = []
    for guard in shape_env.guards:
        expr = shape_env.replace(guard.expr)
        if expr is sympy.true:
            continue
        try:
            implied = bound_sympy(expr, shape_env.var_to_range)
            if implied.is_singleton() and implied.lower is sympy.true:
                continue
        except Exception:  # noqa: BLE001, S110 - an expression the range analysis cannot bound: kept
            pass
        if any(s.name not in symbols for s in expr.free_symbols):
            return None
        if expr not in exprs:
            exprs.append(expr)
    return ShapeConditions(tuple(exprs))


def _bound(value: Any, infinite: float) -> Any:
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError, AttributeError):
        return infinite


def insert_call(
    graph: fx.Graph,
    target: Callable,
    args: tuple,
    kwargs: dict | None = None,
    *,
    like: fx.Node,
    name: str | None = None,
) -> fx.Node:
    """Insert ``target(*args, **kwargs)`` at the graph's insertion point, with ``like``'s metadata (module
    stack, source line) and its own ``meta["val"]``, computed on the arguments' fake values. If that
    computation raises, nothing is inserted."""
    vals = fx.node.map_arg((args, kwargs or {}), lambda n: n.meta["val"])
    mode = None  # a factory call (``empty``) has no fake argument: ``like``'s value gives the mode then
    for v in pytree.tree_leaves((like.meta.get("val"), vals)):
        mode = mode or getattr(v, "fake_mode", None)
    env = getattr(mode, "shape_env", None)
    with contextlib.ExitStack() as stack:
        if mode is not None:
            stack.enter_context(mode)
        if env is not None:
            # Decisions on sizes a decomposition takes here (is this view contiguous?) must not become
            # guards: the exported program's shape environment is final, and torch 2.11 would settle an
            # undecided one by specializing a dynamic size to its traced value, for the whole program
            stack.enter_context(env.suppress_guards())
        val = target(*vals[0], **vals[1])
    node = graph.create_node("call_function", target, args, kwargs, name=name)
    node.meta.update({k: v for k, v in like.meta.items() if k not in ("val", "tensor_meta")})
    node.meta["val"] = val
    return node


def static_shape(value: object) -> tuple[int, ...] | None:
    """The sizes of ``value`` (a node's ``meta["val"]``) if it is a tensor whose sizes are all plain integers;
    ``None`` for a symbolic size or anything but a tensor."""
    if isinstance(value, Tensor) and all(isinstance(d, int) for d in value.shape):
        return tuple(value.shape)
    return None


def module_path(node: fx.Node) -> str:
    """The path of the innermost user module a node was created in (``""`` for the top level)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return _strip(path)


#: Module paths whose output a rewritten node now produces (a batch norm folded into a convolution by
#: :func:`lrpc.canonize.fold_batch_norm`).
FUSED_META = "lrpc_fused_modules"


def belongs_to(node: fx.Node, path: str) -> bool:
    """Whether ``node`` computes (part of) module ``path``: it was created inside it, or the module was
    fused into it."""
    return any(p == path for p, _ in module_stack(node)) or path in node.meta.get(FUSED_META, ())


def module_stack(node: fx.Node) -> list[tuple[str, type | str]]:
    """``(path, type)`` of every module a node was created in, outermost first, wrapper excluded."""
    stack = node.meta.get("nn_module_stack") or {}
    out = []
    for path, typ in stack.values():
        p = _strip(path)
        if p is not None and p != "":
            out.append((p, typ))
    return out


def module_calls(node: fx.Node, path: str) -> list[str]:
    """Which call of module ``path`` created ``node`` (export names a module's second call ``path@1``)."""
    return [key for key, (p, _) in (node.meta.get("nn_module_stack") or {}).items() if _strip(p) == path]


def _strip(path: str) -> str:
    if path == _WRAPPED or path.startswith("_empty_nn_module_stack"):
        return ""
    prefix = _WRAPPED + "."
    return path.removeprefix(prefix)
