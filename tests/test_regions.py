"""``lrpc.regions``: a program cut at the model's repeated blocks computes what the whole program does, equal
regions share one compiled function, and the Inductor backend takes that path only for deep models."""

from __future__ import annotations

import importlib.util
import operator
import warnings
import weakref
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from torch import nn

import lrpc
from lrpc import backends, regions


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm, self.up, self.down = nn.LayerNorm(width), nn.Linear(width, 2 * width), nn.Linear(2 * width, width)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.down(nn.functional.gelu(self.up(self.norm(h))))


class Deep(nn.Module):
    """Token embedding, ``depth`` residual blocks in a ModuleList, a classifier on the mean token."""

    def __init__(self, depth: int = 6, width: int = 8) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(20, width)
        self.blocks = nn.ModuleList(Block(width) for _ in range(depth))
        self.head = nn.Linear(width, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        for block in self.blocks:
            h = block(h)
        return self.head(h.mean(1))


def program(model: nn.Module, ids: torch.Tensor) -> tuple[torch.fx.GraphModule, tuple]:
    """The generated program and the arguments of a call (parameters, inputs, target index)."""
    attributor = lrpc.compile(model.eval(), rules="attnlrp", backend="eager")
    prog = attributor.program(ids, target=1)
    return prog.graph_module, (*prog.traced.state, ids, torch.full((ids.shape[0],), 1))


def assert_same_outputs(actual: tuple, expected: tuple) -> None:
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert (a is None and e is None) or torch.equal(a, e)


def test_the_cut_program_computes_the_same() -> None:
    gm, args = program(Deep(), torch.randint(0, 20, (2, 5)))
    cut = regions.split(gm)
    calls = list(cut.graph.find_nodes(op="call_module"))
    # forward and relevance pass of each of the six blocks, plus what lies around them
    assert len(calls) >= 12
    assert_same_outputs(cut(*args), gm(*args))
    assert any(n.meta.get("custom") for n in gm.graph.nodes)  # split did not change the program it cut


def test_equal_regions_share_one_compiled_function() -> None:
    gm, args = program(Deep(), torch.randint(0, 20, (2, 5)))
    cut = regions.split(gm)
    n_regions = len(list(cut.graph.find_nodes(op="call_module")))
    keys = {regions.structure(getattr(cut, c.target)) for c in cut.graph.find_nodes(op="call_module")}
    compiled: list[torch.fx.GraphModule] = []

    def compile_region(region: torch.fx.GraphModule):
        compiled.append(region)
        return region

    shared = regions.compile_shared(cut, compile_region)
    assert len(compiled) == len(keys) <= n_regions // 2  # the middle blocks' passes repeat
    assert_same_outputs(shared(*args), gm(*args))


def test_the_chain_drops_a_value_at_the_last_region_reading_it() -> None:
    """Each region's argument list is the chain's only reference to the values it reads last: once the
    region has emptied its list (as Inductor's code does on entry), those values are gone, and can be freed
    inside the region rather than when it returns."""
    gm, args = program(Deep(), torch.randint(0, 20, (2, 5)))
    cut = regions.split(gm)
    nodes = list(cut.graph.nodes)
    last_reader = {n: max(nodes.index(u) for u in n.users) for n in nodes if n.users}
    calls = list(cut.graph.find_nodes(op="call_module"))
    read_last: list[int] = []

    def compile_region(region: torch.fx.GraphModule):
        def run(arguments: list) -> tuple:
            call = calls[len(read_last)]
            refs = [
                weakref.ref(value)
                for node, value in zip(call.args, arguments)
                if node.op != "placeholder" and last_reader[node] == nodes.index(call)
            ]
            copies = [a.clone() if isinstance(a, torch.Tensor) else a for a in arguments]
            arguments.clear()
            read_last.append(len(refs))
            assert all(ref() is None for ref in refs)
            return region(copies)

        return run

    with torch.no_grad():  # as the attributor runs programs: no autograd graph holding values
        assert_same_outputs(regions.compile_shared(cut, compile_region)(*args), gm(*args))
    assert len(read_last) == len(calls) and sum(read_last) > len(calls)


def test_the_chain_reads_constants_and_returns_any_structure() -> None:
    """A top-level module attribute passed to a region, and an output of dicts, tuples, ``None`` and numbers:
    the chain returns what the cut program's own code returns."""

    class Region(nn.Module):
        def forward(self, x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return x * c, x + c

    root = nn.Module()
    root.regions = nn.Module()
    root.regions.submod_0 = torch.fx.symbolic_trace(Region())
    root.regions.scale = torch.tensor([2.0, 3.0])
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    call = graph.call_module("regions.submod_0", (x, graph.get_attr("regions.scale")))
    first, second = (graph.call_function(operator.getitem, (call, i)) for i in range(2))
    graph.output({"product": first, "rest": (second, None, 3), "listed": [first]})
    cut = torch.fx.GraphModule(root, graph)
    chain = regions.Chain(cut, {"regions.submod_0": lambda arguments: cut.regions.submod_0(*arguments)})
    x_value = torch.tensor([1.0, 4.0])
    out = chain(x_value)
    assert out.keys() == {"product", "rest", "listed"} and out["rest"][1:] == (None, 3)
    assert type(out["listed"]) is list and type(out["rest"]) is tuple  # not FX's immutable list
    torch.testing.assert_close(out["product"], torch.tensor([2.0, 12.0]))
    torch.testing.assert_close(out["rest"][0], cut(x_value)["rest"][0])


def _allocated_peak_mb(call) -> float:
    """bench/speed_worker.py's count of the bytes a call allocates at once."""
    path = Path(__file__).parents[1] / "bench" / "speed_worker.py"
    spec = importlib.util.spec_from_file_location("speed_worker", path)
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)
    return worker.allocated_peak_mb(call)


def test_a_compiled_region_frees_an_argument_after_its_last_use() -> None:
    """Inductor's code for a boxed region frees ``a`` after the first product: the three 1 MB products then
    never live with both arguments, as they do when the caller holds the arguments to the end."""

    def region(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor]:
        return ((a @ b @ b @ b).abs().sum(),)  # no cancellation: equal to eager in any summation order

    n = 512  # 1 MB matrices
    gm = torch.fx.experimental.proxy_tensor.make_fx(region)(torch.randn(n, n), torch.randn(n, n))
    boxed = backends._BoxedStaticInductor(regions.boxed(gm), {"layout_optimization": False})
    held = backends._StaticInductor(gm, {"layout_optimization": False})
    a, b = torch.randn(n, n), torch.randn(n, n)
    expected = gm(a, b)[0]
    torch.testing.assert_close(held(a.clone(), b.clone())[0], expected)
    arguments = [a.clone(), b.clone()]
    torch.testing.assert_close(boxed(arguments)[0], expected)
    assert arguments == []
    # an argument laid out otherwise than at the compile: copied into that layout, the list still emptied
    b_transposed = b.t().contiguous().t()
    arguments = [a.clone(), b_transposed]
    torch.testing.assert_close(boxed(arguments)[0], expected)
    assert arguments == [] and not b_transposed.is_contiguous()

    def call_boxed() -> None:
        arguments = [torch.randn(n, n), torch.randn(n, n)]
        boxed(arguments)

    def call_held() -> None:
        a, b = torch.randn(n, n), torch.randn(n, n)
        held(a, b)

    assert _allocated_peak_mb(call_held) == pytest.approx(4, abs=0.1)  # a, b and two products
    assert _allocated_peak_mb(call_boxed) == pytest.approx(3, abs=0.1)


def test_structure_tells_layouts_apart() -> None:
    """Regions compiled for one layout must not run another: the same code at another width is another key."""
    keys = []
    for width in (8, 12):
        gm, _ = program(Deep(depth=3, width=width), torch.randint(0, 20, (2, 5)))
        cut = regions.split(gm)
        keys.append({regions.structure(getattr(cut, c.target)) for c in cut.graph.find_nodes(op="call_module")})
    assert not keys[0] & keys[1]


def test_blocks_of_a_named_sequential() -> None:
    """torchvision's ViT names its encoder blocks ``encoder_layer_<i>`` inside a Sequential."""

    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.layers = nn.Sequential(OrderedDict((f"encoder_layer_{i}", Block(4)) for i in range(3)))
            self.head = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.layers(x).mean(1))

    attributor = lrpc.compile(Encoder().eval(), rules="attnlrp", backend="eager")
    gm = attributor.program(torch.randn(2, 3, 4), target=0).graph_module
    blocks = {b for n in gm.graph.nodes if (b := regions.block_of(n)) is not None}
    assert {path for path, _ in blocks} == {f"layers.encoder_layer_{i}" for i in range(3)}
    assert {type_name.rsplit(".", 1)[-1] for _, type_name in blocks} == {"Block"}


def test_inductor_compiles_each_distinct_region_once(monkeypatch) -> None:
    """Through ``lrpc.compile``: a model deep enough is compiled region by region, a repeated block once,
    and explains as the eager program does; one too shallow is compiled whole."""
    compiles: list[int] = []
    original = backends._StaticInductor._compile

    def counting(self, args):
        compiles.append(len(self._gm.graph.nodes))
        return original(self, args)

    monkeypatch.setattr(backends._StaticInductor, "_compile", counting)
    ids = torch.randint(0, 20, (2, 5))
    model = Deep(depth=12).eval()
    expected = lrpc.compile(model, rules="attnlrp", backend="eager")(ids, target=1).relevance
    assert expected.abs().sum() > 0

    attributor = lrpc.compile(model, rules="attnlrp", backend="inductor")  # 12 blocks: BERT-base's depth
    torch.testing.assert_close(attributor(ids, target=1).relevance, expected, rtol=1e-5, atol=1e-6)
    gm = attributor.program(ids, target=1).graph_module
    n_regions = len(list(regions.split(gm).graph.find_nodes(op="call_module")))
    assert 1 < len(compiles) <= n_regions // 2
    later_ids = torch.randint(0, 20, (2, 5))
    again = attributor(later_ids, target=2).relevance  # the compiled regions, reused
    assert len(compiles) <= n_regions // 2
    expected_again = lrpc.compile(model, rules="attnlrp", backend="eager")(later_ids, target=2).relevance
    torch.testing.assert_close(again, expected_again, rtol=1e-5, atol=1e-6)

    monkeypatch.setattr(regions, "MIN_REPEATS", 13)
    compiles.clear()
    whole = lrpc.compile(model, rules="attnlrp", backend="inductor")(ids, target=1).relevance
    assert len(compiles) == 1
    torch.testing.assert_close(whole, expected, rtol=1e-5, atol=1e-6)


def test_programs_inductor_cuts_recompute_rebuilt_values_per_reader(monkeypatch) -> None:
    """A value rebuilt in one region and read in later ones would be materialized at the cut (Inductor
    fuses it into its readers only within one graph): a program Inductor cuts is generated with per-reader
    recomputation, as the eager backend's is, one it compiles whole is not. The choice is made once, on the
    program as generated, and the compile follows it."""
    ids = torch.randint(0, 20, (2, 5))
    model = Deep(depth=12).eval()

    def generated(backend: str) -> tuple[torch.fx.GraphModule, object]:
        prog = lrpc.compile(model, rules="attnlrp", backend=backend).program(ids, target=1)
        return prog.graph_module, prog.run

    def adds(gm: torch.fx.GraphModule) -> int:
        return len(gm.graph.find_nodes(op="call_function", target=torch.ops.aten.add.Tensor))

    eager, _ = generated("eager")
    cut, run = generated("inductor")
    assert cut.meta[backends.IN_REGIONS] and adds(cut) == adds(eager)
    assert isinstance(run.run, backends._CutOrWhole)
    monkeypatch.setattr(regions, "MIN_REPEATS", 13)
    whole, run = generated("inductor")
    assert not whole.meta[backends.IN_REGIONS] and adds(whole) < adds(eager)
    assert isinstance(run.run, backends._StaticInductor)
    monkeypatch.setattr(backends, "devices", lambda gm: {"cuda"})
    monkeypatch.setattr(regions, "MIN_REPEATS", 12)
    assert not backends.recomputes("inductor", program(model, ids)[0])  # CUDA programs stay whole


def test_the_compile_follows_the_decision_the_program_was_generated_for(monkeypatch) -> None:
    """Decided again on the final program (rebuilt values make its distinct regions a larger share), the
    answer could differ from the one its recomputation was chosen for: the recorded decision stands."""
    ids = torch.randint(0, 20, (2, 5))
    gm = lrpc.compile(Deep(depth=12).eval(), rules="attnlrp", backend="inductor").program(ids, target=1).graph_module
    assert gm.meta[backends.IN_REGIONS]
    monkeypatch.setattr(regions, "MAX_DISTINCT_SHARE", 0.0)  # deciding again would compile it whole
    assert isinstance(backends._compiled(gm), backends._CutOrWhole)
    gm.meta[backends.IN_REGIONS] = False
    monkeypatch.setattr(regions, "MAX_DISTINCT_SHARE", float("inf"))  # deciding again would cut it
    assert isinstance(backends._compiled(gm), backends._StaticInductor)


@pytest.mark.parametrize("failing_call", [1, 2])
def test_a_failing_cut_compiles_the_program_whole(failing_call: int, monkeypatch) -> None:
    """Cutting is a speed-up: where it fails, deciding (the first split) or compiling (the second), the
    program is compiled whole, with a warning naming the error, and explains as the eager program does."""
    ids = torch.randint(0, 20, (2, 5))
    model = Deep(depth=12).eval()
    expected = lrpc.compile(model, rules="attnlrp", backend="eager")(ids, target=1).relevance
    calls: list[int] = []
    original = regions.split

    def failing(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
        calls.append(1)
        if len(calls) == failing_call:
            raise RuntimeError("no cut today\nsecond line")
        return original(gm)

    monkeypatch.setattr(regions, "split", failing)
    attributor = lrpc.compile(model, rules="attnlrp", backend="inductor")
    with pytest.warns(UserWarning, match=r"could not cut the program \(RuntimeError: no cut today\)"):
        relevance = attributor(ids, target=1).relevance
    torch.testing.assert_close(relevance, expected, rtol=1e-5, atol=1e-6)
    assert isinstance(attributor.program(ids, target=1).run.run, backends._StaticInductor)


def test_a_region_inductor_cannot_compile_compiles_the_program_whole(monkeypatch) -> None:
    """The cut can fail later too, when Inductor compiles a region on the first call: then the program is
    compiled whole (not handed to the eager backend, not an error under ``backend="inductor"``)."""
    ids = torch.randint(0, 20, (2, 5))
    model = Deep(depth=12).eval()
    expected = lrpc.compile(model, rules="attnlrp", backend="eager")(ids, target=1).relevance

    def failing(self, args):
        raise RuntimeError("this region does not lower\nsecond line")

    monkeypatch.setattr(backends._BoxedStaticInductor, "_compile", failing)
    attributor = lrpc.compile(model, rules="attnlrp", backend="inductor")
    with pytest.warns(UserWarning, match=r"could not cut the program \(RuntimeError: this region does not lower\)"):
        relevance = attributor(ids, target=1).relevance
    torch.testing.assert_close(relevance, expected, rtol=1e-5, atol=1e-6)
    run = attributor.program(ids, target=1).run
    assert run.backend == "inductor" and isinstance(run.run.run, backends._StaticInductor)
    again = lrpc.compile(model, rules="attnlrp", backend="eager")(ids, target=2).relevance
    torch.testing.assert_close(attributor(ids, target=2).relevance, again, rtol=1e-5, atol=1e-6)


def test_a_call_that_fails_whole_too_raises_without_blaming_the_cut() -> None:
    """A first call that fails cut and whole alike (here: too few arguments) was not the cut's fault: its
    error comes through, with no warning about the cut."""
    gm = lrpc.compile(Deep(depth=12).eval(), rules="attnlrp", backend="inductor").program(
        torch.randint(0, 20, (2, 5)), target=1
    ).graph_module
    compiled = backends._compiled(gm)
    assert isinstance(compiled, backends._CutOrWhole)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(Exception):  # noqa: B017 - whatever Inductor raises for a short call
            compiled(torch.zeros(1))


@pytest.mark.parametrize("share", [0.0, 1.0])
def test_too_little_sharing_keeps_the_program_whole(share: float, monkeypatch) -> None:
    monkeypatch.setattr(regions, "MIN_REPEATS", 2)
    monkeypatch.setattr(regions, "MAX_DISTINCT_SHARE", share)
    gm, _ = program(Deep(), torch.randint(0, 20, (2, 5)))
    assert regions.worth_splitting(gm) == (share > 0.0)


def test_a_number_passed_between_blocks_keeps_the_program_whole(monkeypatch) -> None:
    """An ``.item()`` read once and used in every block would enter the regions as a Python number, which a
    compiled region takes as a constant (no guard re-checks it): such programs are not cut."""

    class Scaled(Deep):
        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            h = self.emb(ids)
            scale = h.detach().abs().amax().item()
            for block in self.blocks:
                h = block(h) * scale
            return self.head(h.mean(1))

    gm, _ = program(Scaled(depth=12), torch.randint(0, 20, (2, 5)))
    cut = regions.split(gm)
    inputs = [
        p.meta.get("val")
        for call in cut.graph.find_nodes(op="call_module")
        for p in getattr(cut, call.target).graph.find_nodes(op="placeholder")
    ]
    assert any(not isinstance(v, torch.Tensor) for v in inputs)  # the number does cross a boundary
    # a region taking it is never shared: its compiled code could not be matched on the number
    assert any(regions.structure(getattr(cut, c.target)) is None for c in cut.graph.find_nodes(op="call_module"))
    assert regions.split_static(gm) is None and not regions.worth_splitting(gm)
    assert regions.worth_splitting(program(Deep(depth=12), torch.randint(0, 20, (2, 5)))[0])
