"""Backends ("executors"): what runs a generated relevance program. One seam: a backend takes the
``fx.GraphModule`` and returns a callable with the same signature. Register more with
:func:`register_backend` (the Triton backend plugs in here)."""

from __future__ import annotations

import contextlib
import logging
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv

from . import regions
from .channel_scales import unfold_weight_scales
from .dynamic_convolutions import opaque_input_gradients
from .errors import LRPCError
from .memory import reuse_buffers
from .tracing import static_shape

Backend = Callable[[fx.GraphModule], Callable[..., tuple]]
_BACKENDS: dict[str, Backend] = {}
#: Whether a backend's programs recompute a rebuilt value per reader (:func:`register_backend`'s ``recompute``).
_RECOMPUTES: dict[str, bool | Callable[[fx.GraphModule], bool]] = {}

class _CompileLock:
    """Dynamo's own compile lock (``torch._dynamo.convert_frame.compile_lock``, an ``RLock``), fetched on first
    use: export imports Dynamo anyway. Sharing it, a recompile of a dynamic program, which Dynamo starts
    on its own when a guard fails (a batch of 1), waits for lrpc's trace in another thread, and the other
    way round."""

    def __init__(self) -> None:
        self._lock: Any = None
        self._fetch = threading.Lock()

    def _get(self) -> Any:
        if self._lock is None:
            with self._fetch:
                if self._lock is None:
                    from torch._dynamo import convert_frame

                    self._lock = getattr(convert_frame, "compile_lock", None) or threading.RLock()
        return self._lock

    def __enter__(self) -> None:
        self._get().acquire()

    def __exit__(self, *exc: object) -> None:
        self._lock.release()


#: Held while lrpc traces or compiles, from any thread. torch.export's tracing and Inductor's compiler keep
#: process-wide state (export's pre-dispatch mode stack, Inductor's caches): two at once fail or collide.
#: A program's first call holds it too (compiled backends compile then); later calls do not, so a thread's
#: cached call never waits for another thread's compile. It is Dynamo's compile lock (:class:`_CompileLock`).
COMPILE_LOCK = _CompileLock()

_log = logging.getLogger(__name__)

AUTO = "auto"
#: Runs the rules eagerly on real tensors without tracing: the reference, slow, for checking the others.
INTERPRET = "interpret"


def register_backend(
    name: str, backend: Backend, *, recompute: bool | Callable[[fx.GraphModule], bool] = True
) -> None:
    """Make ``backend`` available as ``lrpc.compile(..., backend=name)``.

    ``recompute``: whether its programs may recompute a rebuilt forward value per reader
    (:func:`lrpc.memory.rematerialize`), which saves memory where tensors live as long as the program
    holds them (an eager run); a compiler that plans its own buffers (Inductor) peaked higher with it. A
    function decides per program: it is given the generated program before that pass (it may read it and
    record in its ``meta``, not change its graph), and returns the choice.
    """
    _BACKENDS[name] = backend
    _RECOMPUTES[name] = recompute


def names() -> list[str]:
    return sorted([*_BACKENDS, INTERPRET, AUTO])


def resolve(name: str) -> str:
    """Validate a backend name (``auto`` is resolved per program by :func:`choose`)."""
    if name != AUTO and name != INTERPRET and name not in _BACKENDS:
        raise LRPCError(f"unknown backend '{name}'; available: {', '.join(names())}")
    return name


def choose(name: str) -> str:
    """The backend a program runs with. ``auto`` is Inductor on every device, as measured
    (BENCHMARKS.md, 2026-11-26): on CUDA as fast as the fused kernels of ``"triton"`` or faster (an H200);
    on CPU faster per call than the eager program on every benchmark model (over the last runs VGG16 and
    ResNet-50 ε 0.99-1.09x gradient x input against 1.08-1.50x; the transformers 0.85-1.04x against
    0.97-1.24x). Its first call compiles (about 40 s for ResNet-50 or BERT-base on 2 cores): for a handful
    of calls ``"eager"`` is quicker in total."""
    return "inductor" if name == AUTO else name


def recomputes(name: str, gm: fx.GraphModule) -> bool:
    """Whether backend ``name``'s program ``gm`` (as generated, before :func:`lrpc.memory.rematerialize`)
    may recompute a rebuilt value per reader (that pass's ``recompute``, :func:`register_backend`'s): not
    under Inductor, unless it compiles the program in regions (:func:`_in_regions`). A compiled backend's
    program that falls back to eager (``backend="auto"``) keeps its choice: the same values, a little more
    memory than the eager backend's own program."""
    choice = _RECOMPUTES.get(name, True)
    return choice(gm) if callable(choice) else choice


def build(name: str, gm: fx.GraphModule, *, fallback: bool) -> Callable[..., tuple]:
    """The runnable program. Compiled backends compile on the first call, which holds :data:`COMPILE_LOCK`.
    With ``fallback`` (``backend="auto"``) a backend that cannot build or compile the program is replaced by
    the eager program, with a warning: the result is never silently different, the eager program is the
    reference they match."""
    if name == "eager":
        return get(name)(gm)
    try:
        compiled = get(name)(gm)
    except Exception as e:  # any build failure: run eagerly instead
        if not fallback:
            raise
        _warn_fallback(name, _one_line(e))
        return _FirstCall("eager", _eager(gm), gm, fallback=False)
    return _FirstCall(name, compiled, gm, fallback=fallback)


class _FirstCall:
    """Runs ``compiled``, its first call (the compile) under :data:`COMPILE_LOCK`. With ``fallback``, if
    that call fails where the eager backend's program of ``gm`` succeeds, warns and keeps running that."""

    def __init__(self, name: str, compiled: Callable[..., tuple], gm: fx.GraphModule, *, fallback: bool) -> None:
        self.name, self.run, self._gm, self._fallback, self._checked = name, compiled, gm, fallback, False

    @property
    def backend(self) -> str:
        return self.name

    def __call__(self, *args: object) -> tuple:
        if self._checked:
            return self.run(*args)
        with COMPILE_LOCK:  # one thread compiles (or falls back); the others then run what it chose
            if self._checked:
                return self.run(*args)
            failure = None
            try:
                out = self.run(*args)
            except Exception as e:  # compile errors come in many types
                if not self._fallback:
                    raise
                # the reason only: the error's frames (a cut program's values) must not outlive this block
                failure = _one_line(e)
            if failure is not None:
                eager = _eager(self._gm)
                out = eager(*args)  # a genuine error (bad input) raises here, from the reference
                _warn_fallback(self.name, failure)
                self.name, self.run = "eager", eager
            self._checked = True
        return out


def _warn_fallback(name: str, reason: str) -> None:
    warnings.warn(
        f"lrpc: the '{name}' backend could not compile this relevance program ({reason}); "
        "running it with the eager backend instead",
        stacklevel=4,
    )


def _one_line(error: Exception) -> str:
    """``error``'s type and the first line of its message (at most 200 characters), for a warning."""
    return f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:200]}"


def failing_node(gm: fx.GraphModule, args: tuple) -> fx.Node | None:
    """The node at which ``gm`` raises on ``args``, found by running it node by node (after a backend's
    call failed: compiled code does not say where)."""

    class Locate(fx.Interpreter):
        failed: fx.Node | None = None

        def call_function(self, target: object, args: tuple, kwargs: dict) -> object:
            if target is torch.ops.aten.view.default:  # as the eager backend runs it (_reshaping_views)
                target = torch.ops.aten.reshape.default
            return super().call_function(target, args, kwargs)  # type: ignore[arg-type]

        def run_node(self, n: fx.Node) -> object:
            try:
                return super().run_node(n)
            except Exception:
                self.failed = self.failed or n
                raise

    locate = Locate(gm)
    with contextlib.suppress(Exception), torch.no_grad():
        locate.run(*args)
    return locate.failed


def get(name: str) -> Backend:
    return _BACKENDS[name]


def _eager(gm: fx.GraphModule) -> Callable[..., tuple]:
    """Run the generated program node by node, one aten call each; pointwise ops write into operands that
    die at them (:func:`lrpc.memory.reuse_buffers`, on a copy: ``gm`` stays as generated)."""
    return _rewritten(gm, lambda graph: reuse_buffers(_reshaping_views(graph)))


def _reshaping_views(graph: fx.Graph) -> fx.Graph:
    """``view`` as ``reshape`` (in place; returns ``graph``): a view is traced where the fake tensors' strides
    allow it, and a kernel may return other strides than its fake kernel says (CPU batch norm on a
    transposed input returns it contiguous). ``reshape`` views where the real strides allow and copies where
    not; compiled backends lay out memory themselves."""
    for node in graph.find_nodes(op="call_function", target=torch.ops.aten.view.default):
        node.target = torch.ops.aten.reshape.default
    return graph


def _rewritten(gm: fx.GraphModule, graph_pass: Callable[[fx.Graph], fx.Graph]) -> fx.GraphModule:
    """``graph_pass`` applied to a copy of ``gm``: the program users print stays as generated."""
    graph = fx.Graph()
    graph._codegen = gm.graph._codegen  # keep the calling convention make_fx gave the program
    graph.output(graph.graph_copy(gm.graph, {}))
    return fx.GraphModule(gm, graph_pass(graph))


def _inductor(gm: fx.GraphModule) -> Callable[..., tuple]:
    """``torch.compile`` with Inductor: fused C++/OpenMP kernels on CPU, Triton on GPU."""
    return dynamic_dims_marked(_compiled(gm), gm)


def _compiled(gm: fx.GraphModule) -> Callable[..., tuple]:
    # Off CUDA, Inductor's layout optimization puts every convolution in channels-last, which for a
    # program whose weights are inputs (not frozen constants) means copying each weight and activation
    # into that layout on every call: measured on 2 CPU cores it cost ResNet-50 epsilon 1.40x -> 1.03x
    # gradient x input with it off, VGG16 1.04x -> 1.00x, and a third of the compile time.
    options = {} if "cuda" in devices(gm) else {"layout_optimization": False}
    in_regions = _in_regions(gm)
    # batch-norm-folded weights: Inductor fuses the per-channel scale into the neighbouring pointwise kernels;
    # convolutions' input gradients at dynamic image sizes: Inductor's lowering would fix the sizes
    gm = _rewritten(gm, lambda graph: opaque_input_gradients(unfold_weight_scales(graph)))
    if not _symbolic(gm):
        if in_regions and (cut := _or_whole(regions.split_static, gm, None)) is not None:
            return _CutOrWhole(cut, gm, options)
        return _StaticInductor(gm, options)
    # the bound forward, not the module: the module's __call__ adds a few microseconds to every call
    return torch.compile(gm.forward, backend="inductor", fullgraph=True, dynamic=None, options=options)


#: ``GraphModule.meta`` key: whether Inductor compiles the program in regions (:func:`_in_regions`).
IN_REGIONS = "lrpc_in_regions"


def _in_regions(gm: fx.GraphModule) -> bool:
    """Whether Inductor compiles ``gm`` cut where the model repeats a block (:mod:`lrpc.regions`): a deep
    model's static CPU program (measured on CPU only so far).

    Decided once per program, on the program as generated, when :func:`recomputes` asks before
    ``rematerialize`` (and recorded in ``gm.meta[IN_REGIONS]``), so that the compile follows the choice the
    program was generated for: programs in regions recompute rebuilt values per reader. In one graph
    Inductor fuses a cheap rebuilt value into each reader itself, but a value made in one region and read
    in later ones is materialized at the cut and kept in between: ViT-B/16's residual stream, rebuilt in
    chains of a few blocks at once, peaked at 114 MB cut against 104 whole; recomputed per reader, 102.
    A program whose cut fails is compiled whole, with a warning."""
    decided = gm.meta.get(IN_REGIONS)
    if decided is None:
        decided = False
        if not _symbolic(gm) and devices(gm) == {"cpu"}:
            decided = _or_whole(regions.worth_splitting, gm, False)
        gm.meta[IN_REGIONS] = decided
    return decided


def _or_whole(step: Callable[[fx.GraphModule], Any], gm: fx.GraphModule, whole: Any) -> Any:
    """``step(gm)``, a step of cutting ``gm`` into regions; ``whole`` (compile it whole) with a warning if
    it raises: a missed speed-up, not a wrong result."""
    try:
        return step(gm)
    except Exception as e:  # noqa: BLE001 - any error of the cut: the program runs whole
        _log.debug("lrpc.regions: the cut failed", exc_info=e)
        _warn_whole(_one_line(e))
        return whole


def _warn_whole(reason: str) -> None:
    warnings.warn(f"lrpc.regions could not cut the program ({reason}); compiling it whole", stacklevel=3)


class _CutOrWhole:
    """A program cut into regions (:func:`lrpc.regions.compile_shared`, each region boxed), compiled on its
    first call; if that call fails (Inductor cannot compile a region that it compiles whole, or the chain
    cannot run the cut), the program compiled whole instead, with a warning. The first call runs under
    :data:`COMPILE_LOCK` (:class:`_FirstCall`)."""

    def __init__(self, cut: fx.GraphModule, gm: fx.GraphModule, options: dict) -> None:
        self._cut, self._gm, self._options = cut, gm, options
        #: what runs once the first call has chosen: the :class:`lrpc.regions.Chain` or the whole program
        self.run: Callable[..., Any] | None = None

    def __call__(self, *args: object) -> tuple:
        if self.run is not None:
            return self.run(*args)
        failure = None
        try:
            chain = regions.compile_shared(self._cut, lambda region: _BoxedStaticInductor(region, self._options))
            out = chain(*args)
        except Exception as e:  # noqa: BLE001 - any error of the cut; a genuine one raises again, whole
            failure = e
        if failure is None:
            self.run = chain
            return out
        _log.debug("lrpc.regions: the cut program failed", exc_info=failure)
        reason = _one_line(failure)
        # the error's frames hold the values the regions made before it: free them before the whole compile
        failure.__traceback__ = None
        del failure
        whole = _StaticInductor(self._gm, self._options)
        out = whole(*args)  # a genuine error (bad input) raises here too: then the cut was not the problem
        _warn_whole(reason)
        self.run = whole
        return out


_Layout = tuple[torch.dtype, torch.device, tuple[int, ...]] | None  # of one argument; None: not a tensor


class _StaticInductor:
    """A program with static shapes compiled by Inductor directly (``torch._inductor.compile``), on its
    first call's inputs, and run without ``torch.compile``'s guards, which cost a tiny model's call about
    20 µs of its 60. Instead: lrpc's program cache has matched the sizes, dtypes and devices of the call's
    own tensors; here each argument, the model's parameters included, is checked against the dtype and
    device it was compiled for (a model moved or cast after its first call gets a new compile, as Dynamo
    would give it), and an argument laid out otherwise than at compile time is copied into that layout.
    Programs with dynamic sizes keep ``torch.compile``, whose guards carry the size conditions that
    Inductor's code relies on. Both reach Inductor's on-disk caches, so a later process compiling the same
    program loads its code (:func:`_cacheable`)."""

    def __init__(self, gm: fx.GraphModule, options: dict) -> None:
        self._gm, self._options = gm, options
        self._compiled: tuple[Callable[..., list], list[_Layout]] | None = None  # code, and the layouts it takes

    def __call__(self, *args: object) -> tuple:
        compiled = self._compiled
        matched = self._matched(args, compiled[1]) if compiled is not None else None
        if matched is None:
            compiled, matched = self._compile(args)
        return tuple(compiled[0](*matched))

    def _compile(self, args: tuple) -> tuple[tuple[Callable[..., list], list[_Layout]], tuple]:
        import torch._inductor  # loaded by the first compile, as torch.compile does

        with COMPILE_LOCK:
            # another thread may have compiled for these arguments while this one waited
            compiled = self._compiled
            if compiled is not None and (matched := self._matched(args, compiled[1])) is not None:
                return compiled, matched
            args = tuple(_standard_layout(a) for a in args)
            # inference graph: no autograd bookkeeping for the parameters that require grad
            with torch.no_grad(), _cacheable() as fake:
                examples = [fake.from_tensor(a, static_shapes=True) if isinstance(a, torch.Tensor) else a for a in args]
                run = torch._inductor.compile(self._gm, self._examples(examples), self._options)
            layouts = [(a.dtype, a.device, a.stride()) if isinstance(a, torch.Tensor) else None for a in args]
            self._compiled = run, layouts  # one assignment: a thread never sees code with another's layouts
            return self._compiled, args

    @staticmethod
    def _examples(examples: list) -> list:
        return examples

    @staticmethod
    def _matched(args: tuple, layouts: list[_Layout]) -> tuple | None:
        """``args`` in the compiled ``layouts``, or ``None`` if one has another dtype or device."""
        out = None
        for i, (a, layout) in enumerate(zip(args, layouts)):
            if layout is None:
                continue
            dtype, device, stride = layout
            if a.dtype != dtype or a.device != device:  # type: ignore[attr-defined]
                return None
            if a.stride() != stride:  # type: ignore[attr-defined]
                out = out or list(args)
                out[i] = torch.empty_strided(a.shape, stride, dtype=dtype, device=device).copy_(a)  # type: ignore[attr-defined]
        return args if out is None else tuple(out)


class _BoxedStaticInductor(_StaticInductor):
    """:class:`_StaticInductor` for a region of a cut program (:func:`lrpc.regions.boxed`): called with a list
    of its arguments, which the compiled code empties, so that each argument is freed after its last use in
    the region rather than when the region returns."""

    def __call__(self, args: list) -> Sequence:  # type: ignore[override]
        compiled = self._compiled
        matched = self._matched(tuple(args), compiled[1]) if compiled is not None else None
        if matched is None:
            compiled, matched = self._compile(tuple(args))
        args[:] = matched
        del matched  # the list is the arguments' only holder here
        return compiled[0](args)

    @staticmethod
    def _examples(examples: list) -> list:
        return [examples]


@contextlib.contextmanager
def _cacheable() -> Iterator[FakeTensorMode]:
    """A tracing context for compiling outside Dynamo whose fake mode has a shape environment (with no
    symbols: the shapes stay static). Inductor's and AOTAutograd's on-disk caches need one and skip the
    graph without it, so that every process compiled its programs from scratch."""
    fake = FakeTensorMode(shape_env=ShapeEnv())
    with torch._guards.tracing(torch._guards.TracingContext(fake)):
        yield fake


def _standard_layout(value: object) -> object:
    """``value`` if it is contiguous (or channels-last), else a contiguous copy: the layout compiled for
    should be the common one, and one a copy can take (not a broadcast's zero strides)."""
    if not isinstance(value, torch.Tensor) or value.is_contiguous():
        return value
    if value.dim() == 4 and value.is_contiguous(memory_format=torch.channels_last):
        return value
    if value.dim() == 5 and value.is_contiguous(memory_format=torch.channels_last_3d):
        return value
    return value.contiguous()


def _symbolic(gm: fx.GraphModule) -> bool:
    """Whether any input of ``gm`` has a symbolic size (or is a symbolic integer)."""
    for n in gm.graph.nodes:
        if n.op != "placeholder":
            continue
        val = n.meta.get("val")
        if isinstance(val, torch.SymInt) or (isinstance(val, torch.Tensor) and static_shape(val) is None):
            return True
    return False


def devices(gm: fx.GraphModule) -> set[str]:
    """The device types of ``gm``'s tensor inputs, from their fake values."""
    return {
        v.device.type
        for n in gm.graph.nodes
        if n.op == "placeholder" and isinstance(v := n.meta.get("val"), torch.Tensor)
    }


def dynamic_dims_marked(compiled: Callable[..., tuple], gm: fx.GraphModule) -> Callable[..., tuple]:
    """``compiled``, told on every call which input dims the program keeps symbolic (batch, sequence).
    Otherwise Dynamo specializes the first call's sizes and compiles again at the second size."""
    dims = [
        (i, d)
        for i, node in enumerate(n for n in gm.graph.nodes if n.op == "placeholder")
        if isinstance(val := node.meta.get("val"), torch.Tensor)
        for d, size in enumerate(val.shape)
        if not isinstance(size, int)
    ]
    if not dims:
        return compiled

    def run(*args: torch.Tensor) -> tuple:
        for i, d in dims:
            torch._dynamo.maybe_mark_dynamic(args[i], d)
        return compiled(*args)

    return run


register_backend("eager", _eager)
register_backend("inductor", _inductor, recompute=_in_regions)


#: The fusion patterns the "triton" backend swaps in. Not the sign-split linear kernels (z⁺, αβ, γ): on an
#: H200 they took 3-25x the time of the Inductor-compiled reference in float32 (bench/kernels.py,
#: BENCHMARKS.md); ``lrpc.kernels.fusion.fuse(gm, patterns=...)`` still applies them on request.
TRITON_PATTERNS = ("linear_epsilon", "softmax", "uniform_product")


def _triton(gm: fx.GraphModule) -> Callable[..., tuple]:
    """Fused rule kernels from :mod:`lrpc.kernels` (:data:`TRITON_PATTERNS`: ε through linear layers as one
    matmul each, the softmax and uniform product rules) swapped into the program by
    :func:`lrpc.kernels.fusion.fuse`, the rest compiled by Inductor. Needs triton and the program's tensors
    on a CUDA device."""
    try:
        from lrpc.kernels import HAS_TRITON, available, fusion  # imported here: triton is optional
    except ImportError as e:  # pragma: no cover - a broken triton install
        raise LRPCError(f"the 'triton' backend could not import lrpc.kernels: {e}") from e
    if not available():
        missing = "no CUDA device is available" if HAS_TRITON else "the triton package is not installed"
        raise LRPCError(
            f"the 'triton' backend needs a CUDA device and triton ({missing}); "
            "use backend='inductor' (or 'eager') on CPU."
        )
    if (others := devices(gm) - {"cuda"}):
        raise LRPCError(
            "the 'triton' backend runs on CUDA tensors; this program's model and inputs are on "
            f"{', '.join(sorted(others))}: move them to the GPU (model.cuda(), x.cuda()) "
            "or use backend='inductor'."
        )
    fused = fusion.fuse(gm, patterns=TRITON_PATTERNS)
    return dynamic_dims_marked(_compiled(fused), gm)


register_backend("triton", _triton, recompute=False)
