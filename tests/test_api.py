"""The behaviour a user of ``lrpc.compile`` relies on.

* the program cache: one trace per signature, dynamic batch (and token) dims reused, a new program for a
  new static shape, dtype or target mode (checked against a freshly compiled attributor), bounded size,
  invalidated by ``lrpc.register_rule``;
* the model is left exactly as it was (parameters, buffers, hooks, training flags); a model in training
  mode is explained in eval semantics with a warning;
* unsupported ops (a ``torch.library`` custom op): a precise error, the ``on_unsupported="warn"`` gradient
  fallback, and covering the op with ``lrpc.register_rule``;
* token-id models (per-token relevance, attention masks get none) and tiny random Hugging Face models
  (BERT, GPT-2, Llama with grouped-query attention), padded batches included;
* target modes and seeds, checked against gradient x input on a bias-free ReLU network (LRP-0 equals it
  there), and the errors for bad arguments;
* several inputs and structured outputs.

Everything runs with ``backend="eager"`` except the backend tests (``interpret`` is fast; ``inductor`` is
marked slow).
"""

from __future__ import annotations

import threading
import warnings
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch import nn

import lrpc

# --- helpers ----------------------------------------------------------------------------------------


def compile_eager(model: nn.Module, **options) -> lrpc.Attributor:
    return lrpc.compile(model, backend="eager", **options)


def nonzero(t: torch.Tensor) -> torch.Tensor:
    """``t``, after checking that it is not all zero (a comparison against it would be vacuous)."""
    assert t.abs().max() > 0, "reference is all zero"
    return t


def grad_x_input(model: nn.Module, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Gradient x input of ``model(x)[i, index[i]]`` (summed over the batch: samples are independent)."""
    x = x.detach().clone().requires_grad_(True)
    out = model(x)
    out.gather(1, index.view(-1, 1)).sum().backward()
    return (x * x.grad).detach()


def relu_net(bias: bool = False, d_in: int = 6, classes: int = 4) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(d_in, 16, bias=bias),
        nn.ReLU(),
        nn.Linear(16, 16, bias=bias),
        nn.ReLU(),
        nn.Linear(16, classes, bias=bias),
    ).eval()


def conv_net(pool: nn.Module | None = None, features: int = 4 * 8 * 8) -> nn.Module:
    """Conv -> ReLU -> (pool) -> flatten -> linear. With ``pool=None`` the linear layer fixes the image
    size at 8x8."""
    torch.manual_seed(0)
    layers = [nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()]
    if pool is not None:
        layers.append(pool)
    layers += [nn.Flatten(), nn.Linear(features, 5)]
    return nn.Sequential(*layers).eval()


def n_programs(a: lrpc.Attributor) -> int:
    return sum(len(v) for v in a._cache.values())


# --- the program cache ------------------------------------------------------------------------------


def test_nothing_is_traced_before_the_first_call() -> None:
    a = compile_eager(relu_net())
    assert a.stats == {"traces": 0, "hits": 0, "calls": 0}
    with pytest.raises(lrpc.LRPCError, match="after the first call"):
        a.report()


def test_same_signature_traces_once() -> None:
    model = relu_net()
    a = compile_eager(model)
    x = torch.randn(3, 6)
    first = a(x).relevance
    for _ in range(3):
        again = a(x).relevance
        torch.testing.assert_close(again, first, rtol=0, atol=0)
    assert a.stats == {"traces": 1, "hits": 3, "calls": 4}
    # new values, same signature: still one program, and the right answer for the new values
    y = torch.randn(3, 6)
    torch.testing.assert_close(a(y).relevance, compile_eager(model)(y).relevance)
    assert a.stats["traces"] == 1


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("dynamic", [None, True, False])
def test_other_batch_sizes(kind: str, dynamic: bool | None) -> None:
    """``dynamic=None``: the first size gets a program of its own, the second one dynamic program that
    serves every size after; ``True``: one dynamic program from the start; ``False``: one per size."""
    if kind == "mlp":
        model, shape = relu_net(bias=True), (6,)
    else:
        model, shape = conv_net(), (3, 8, 8)
    a = compile_eager(model, dynamic=dynamic)
    a(torch.randn(2, *shape))
    assert [bool(p.symbols) for p in a._cache[next(iter(a._cache))]] == [bool(dynamic)]  # a dynamic dim
    for batch in (5, 3, 7, 2):
        x = torch.randn(batch, *shape)
        res = a(x)
        assert res.relevance.shape == x.shape
        fresh = compile_eager(model, dynamic=False)(x)
        torch.testing.assert_close(res.relevance, nonzero(fresh.relevance))
        torch.testing.assert_close(res.output, model(x).detach())
    assert a.stats["traces"] == {None: 2, True: 1, False: 4}[dynamic], a.stats


def test_conv_batch_sizes_share_few_programs() -> None:
    """Tracing a convolution's VJP guards on the batch size (CPU backend choice at 16): the program is
    valid on a range of batch sizes, not only on the traced one."""
    model = conv_net()
    a = compile_eager(model)
    for batch in (2, 9, 15, 16, 40, 3, 33):
        x = torch.randn(batch, 3, 8, 8)
        torch.testing.assert_close(a(x).relevance, compile_eager(model, dynamic=False)(x).relevance)
    assert a.stats["traces"] <= 3, a.stats  # the first batch's own program, then at most two ranges


def test_new_image_size_gets_a_new_program() -> None:
    """A second image size: a program whose batch and image sizes are dynamic (they changed), which then
    serves other batches and sizes too."""
    model = conv_net(nn.AdaptiveAvgPool2d(2), features=4 * 2 * 2)
    a = compile_eager(model)
    a(torch.randn(2, 3, 8, 8))
    x = torch.randn(2, 3, 12, 12)
    res = a(x)
    assert a.stats["traces"] == 2
    assert res.relevance.shape == x.shape
    torch.testing.assert_close(res.relevance, nonzero(compile_eager(model)(x).relevance))
    # the first program is still cached and still right
    torch.testing.assert_close(a(torch.ones(2, 3, 8, 8)).relevance, compile_eager(model)(torch.ones(2, 3, 8, 8)).relevance)
    assert a.stats["traces"] == 2
    # other batches and image sizes: the dynamic program
    for batch, size in ((4, 8), (6, 10), (3, 16)):
        y = torch.randn(batch, 3, size, size)
        torch.testing.assert_close(a(y).relevance, compile_eager(model)(y).relevance)
    assert a.stats["traces"] == 2


class PooledSignal(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.pool, self.head = nn.Conv1d(3, 4, 3), nn.MaxPool1d(2), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(torch.relu(self.conv(x))).mean(-1))


def test_a_size_that_export_specializes_is_a_number() -> None:
    """MaxPool1d makes export fix a length asked to be dynamic: the program's shape holds it as the number it
    is (it held the expression "80", which matched only by evaluating it on every call)."""
    torch.manual_seed(0)
    model = PooledSignal().eval()
    a = compile_eager(model)
    a(torch.randn(2, 3, 64))
    x = torch.randn(3, 3, 80)
    torch.testing.assert_close(a(x).relevance, compile_eager(model)(x).relevance)
    shape = a.program(x).traced.inputs[0].shape
    assert isinstance(shape[0], str) and shape[1:] == (3, 80), shape


@pytest.mark.parametrize("dynamic", [None, True])
def test_float_sequences_of_new_lengths_share_one_program(dynamic: bool | None) -> None:
    """Float inputs ``(B, T, F)`` (audio features, ``inputs_embeds``) compiled a program for every length:
    a dim whose size changed becomes dynamic, as torch.compile's automatic dynamic shapes make it."""
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
    a = compile_eager(model, output=lambda out: out.mean(1), dynamic=dynamic)
    for length in (4, 7, 9, 12, 5):
        x = torch.randn(2, length, 5)
        torch.testing.assert_close(a(x).relevance, compile_eager(model, output=lambda out: out.mean(1))(x).relevance)
    assert a.stats["traces"] == 2


class ParityBranch(nn.Module):
    """Takes one branch for even lengths and another for odd ones: export's guard on ``length % 2`` is no
    range, and the traced program holds one branch only."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.head = nn.Conv1d(1, 4, 3, padding=1), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        h = h * 2 if x.shape[-1] % 2 == 0 else h * 3
        return self.head(h.mean(-1))


def test_a_dynamic_program_serves_only_the_sizes_its_branch_was_traced_for() -> None:
    """The dynamic program traced at an even length used to explain an odd one with the even branch: a
    wrong output and relevance, silently. Sizes that break a condition of the trace get their own program."""
    model = ParityBranch().eval()
    a = compile_eager(model)
    for length in (16, 20, 17, 22, 19):
        x = torch.randn(2, 1, length)
        result = a(x, target=0)
        torch.testing.assert_close(result.output, model(x))
        torch.testing.assert_close(result.relevance, compile_eager(model, dynamic=False)(x, target=0).relevance)
    assert a.stats["traces"] == 3  # 16 static, then one dynamic program for even and one for odd lengths
    even, odd = (a.program(torch.randn(2, 1, n), target=0) for n in (24, 25))
    assert even is not odd and even.conditions.exprs and odd.conditions.exprs
    assert a.stats["traces"] == 3


def test_models_whose_sizes_meet_ranges_only_carry_no_conditions() -> None:
    """A transformer's dynamic program assumes nothing beyond its dims' ranges: no per-call check."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)
    model = nn.Sequential(nn.Embedding(10, 8), nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)).eval()
    a = compile_eager(model, output=lambda out: out.sum((1, 2)), dynamic=True)
    program = a.program(torch.randint(0, 10, (2, 5)))
    assert all(isinstance(d, str) for d in program.traced.inputs[0].shape) and program.conditions.exprs == ()


def test_image_size_that_the_model_cannot_take_is_named() -> None:
    a = compile_eager(conv_net())
    a(torch.randn(2, 3, 8, 8))
    with pytest.raises(
        lrpc.LRPCError, match=r"fails on the given inputs \(input \(2, 3, 10, 10\) float32\)"
    ) as info:
        a(torch.randn(2, 3, 10, 10))
    assert not isinstance(info.value, lrpc.TraceError)  # the input's problem, not an export limitation


class Casting(nn.Module):
    """Accepts any float dtype (casts to its own)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x.float())


def test_new_dtype_gets_a_new_program() -> None:
    model = Casting().eval()
    a = compile_eager(model)
    x = torch.randn(3, 5)
    r32 = a(x)
    r64 = a(x.double())
    assert a.stats["traces"] == 2
    assert r32.relevance.dtype == torch.float32 and r64.relevance.dtype == torch.float64
    torch.testing.assert_close(r64.relevance, compile_eager(model)(x.double()).relevance)
    torch.testing.assert_close(r64.relevance.float(), r32.relevance)


def test_target_mode_gets_its_own_program() -> None:
    model = relu_net()
    a = compile_eager(model)
    x = torch.randn(4, 6)

    def everything(out: torch.Tensor) -> torch.Tensor:
        return out

    a(x)  # argmax
    a(x, target=1)  # index
    a(x, target=everything)  # callable
    assert a.stats["traces"] == 3
    # the index is a runtime input: other ints and per-sample tensors reuse the index program
    a(x, target=2)
    a(x, target=torch.tensor([0, 1, 2, 3]))
    a(x, target=everything)
    a(x)
    assert a.stats["traces"] == 3
    assert a.stats["hits"] == 4


def test_cache_is_bounded_and_least_recently_used() -> None:
    model = relu_net()
    x = torch.randn(2, 6)

    def seed(out: torch.Tensor) -> torch.Tensor:
        return out

    def sequence(a: lrpc.Attributor) -> None:
        a(x)  # argmax
        a(x, target=0)  # index
        a(x)  # hit: argmax is now the most recently used
        a(x, target=seed)  # callable: with room for 2, evicts the index program
        a(x)  # still cached
        a(x, target=1)  # index again

    small = compile_eager(model, cache_size=2)
    sequence(small)
    assert small.stats["traces"] == 4
    assert n_programs(small) <= 2
    big = compile_eager(model)
    sequence(big)
    assert big.stats["traces"] == 3
    assert n_programs(big) == 3


def test_autocast_is_part_of_the_signature() -> None:
    """A call under ``torch.autocast`` explains the model as it runs there (its output in bfloat16); a call
    outside it, the model in its own dtype. Autocast was not in the cache key: a plain call after an
    autocast one reused the bfloat16 program (1e-2 off), and the eager program ran its relevance pass
    autocast again where the Inductor one did not."""
    torch.manual_seed(0)
    model, x = relu_net(bias=True), torch.randn(3, 6)
    a = compile_eager(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = a(x, target=1)
        model_output = model(x)
        reference = lrpc.compile(model, backend="interpret")(x, target=1)
    assert cast.output.dtype == torch.bfloat16
    torch.testing.assert_close(cast.output, model_output, rtol=0, atol=0)
    torch.testing.assert_close(cast.relevance, reference.relevance, rtol=0, atol=0)
    plain = a(x, target=1)
    assert plain.output.dtype == torch.float32 and a.stats["traces"] == 2
    torch.testing.assert_close(plain.relevance, nonzero(compile_eager(model)(x, target=1).relevance), rtol=0, atol=0)


def test_the_compile_lock_is_dynamos() -> None:
    """A dynamic program is compiled by Dynamo, which compiles again on its own when a guard fails (a batch of
    1): holding lrpc's lock must keep Dynamo's compiles in other threads out, and the other way round."""
    from torch._dynamo import convert_frame

    from lrpc import backends

    taken: list[bool] = []
    with backends.COMPILE_LOCK:
        probe = threading.Thread(target=lambda: taken.append(convert_frame.compile_lock.acquire(blocking=False)))
        probe.start()
        probe.join()
    assert taken == [False]
    with convert_frame.compile_lock:
        probe = threading.Thread(target=lambda: taken.append(backends.COMPILE_LOCK._get().acquire(blocking=False)))
        probe.start()
        probe.join()
    assert taken == [False, False]


@pytest.mark.parametrize("backend", ["eager", "inductor"])
def test_calls_from_several_threads(backend: str) -> None:
    """A server's threads share one attributor: their first calls compile one program (torch.export and
    Inductor keep process-wide state; two traces at once fail), and a second attributor compiling at the
    same time waits its turn instead of colliding."""
    model, other = relu_net(), conv_net(nn.MaxPool2d(2), features=4 * 4 * 4)
    xs = [torch.randn(3, 6) for _ in range(6)]
    expected = [compile_eager(model)(x, target=1).relevance for x in xs]
    shared, second = lrpc.compile(model, backend=backend), lrpc.compile(other, backend=backend)
    start = threading.Barrier(len(xs) + 1)
    results: dict[int, torch.Tensor] = {}
    errors: list[BaseException] = []

    def explain(i: int) -> None:
        start.wait()
        try:
            for _ in range(2):
                results[i] = shared(xs[i], target=1).relevance
        except BaseException as e:  # noqa: BLE001 - reported below, with the thread's error
            errors.append(e)

    def compile_second() -> None:
        start.wait()
        try:
            second(torch.randn(2, 3, 8, 8))
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=explain, args=(i,)) for i in range(len(xs))]
    threads.append(threading.Thread(target=compile_second))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert shared.stats == {"traces": 1, "hits": 2 * len(xs) - 1, "calls": 2 * len(xs)}
    for i, x in enumerate(expected):
        torch.testing.assert_close(results[i], x)


# --- the model is left alone ------------------------------------------------------------------------


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.5)
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(4 * 6 * 6, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(torch.relu(self.bn(self.conv(x)))))


def trained_net() -> Net:
    """Batch norm with non-trivial running statistics and affine parameters (fresh BN hides bugs)."""
    net = Net()
    with torch.no_grad():
        for _ in range(3):
            net(torch.randn(8, 3, 6, 6) * 2 + 0.5)
        net.bn.weight.uniform_(0.5, 1.5)
        net.bn.bias.uniform_(-0.5, 0.5)
    return net


def snapshot(model: nn.Module) -> dict:
    return {
        "params": {n: (p, p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()},
        "buffers": {n: (b, b.detach().clone()) for n, b in model.named_buffers()},
        "hooks": {
            n: tuple(
                list(getattr(m, h).items())
                for h in (
                    "_forward_hooks",
                    "_forward_pre_hooks",
                    "_backward_hooks",
                    "_forward_hooks_with_kwargs",
                )
            )
            for n, m in model.named_modules()
        },
        "training": {n: m.training for n, m in model.named_modules()},
        "modules": {n: m for n, m in model.named_modules()},
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["params"].keys() == before["params"].keys()
    for name, (p, value, requires_grad) in before["params"].items():
        q, now, rg = after["params"][name]
        assert q is p, f"parameter {name} was replaced"
        assert torch.equal(now, value), f"parameter {name} changed"
        assert rg == requires_grad, f"parameter {name}: requires_grad changed"
    assert after["buffers"].keys() == before["buffers"].keys()
    for name, (b, value) in before["buffers"].items():
        c, now = after["buffers"][name]
        assert c is b, f"buffer {name} was replaced"
        assert torch.equal(now, value), f"buffer {name} changed"
    assert after["hooks"] == before["hooks"]
    assert after["training"] == before["training"]
    assert after["modules"] == before["modules"]


@pytest.mark.parametrize("mode", ["eval", "train", "mixed"])
def test_model_is_unchanged(mode: str) -> None:
    net = trained_net()
    net.train(mode == "train")
    if mode == "mixed":
        net.head.train()  # the user's own mix of flags must survive too
    calls = []
    net.head.register_forward_hook(lambda m, i, o: calls.append("fwd"))
    net.conv.register_forward_pre_hook(lambda m, i: calls.append("pre"))
    before = snapshot(net)
    x = torch.randn(2, 3, 6, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = compile_eager(net, layers=["bn"])
        assert_unchanged(net, before)
        a(x)
        a(torch.randn(5, 3, 6, 6), target=1)
        a.report()
    assert_unchanged(net, before)
    # the user's hooks still work
    calls.clear()
    net(x)
    assert calls == ["pre", "fwd"]


class WritesItsState(nn.Module):
    """A forward that counts its calls in a buffer and, on its first call, rescales a weight in place (as
    Hugging Face's RWKV does in eval mode); a Python flag says that it did."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 8)
        self.head = nn.Linear(8, 3)
        self.register_buffer("calls", torch.zeros(()))
        self.rescaled = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.add_(1)
        if not self.rescaled:
            with torch.no_grad():
                self.head.weight.mul_(0.5)
            self.rescaled = True
        return self.head(torch.relu(self.fc(x)))


def test_a_forward_that_writes_its_state_is_explained_without_writing_it() -> None:
    """Writes to buffers and parameters come out of export before the model's own output: lrpc explains the
    output, computes with the written weight where the forward reads it, warns naming what is written, and
    leaves the model (its buffers, weights and Python state) as it was."""
    torch.manual_seed(0)
    model = WritesItsState().eval()
    before = snapshot(model)
    x = torch.randn(4, 6)
    with pytest.warns(UserWarning, match=r"forward writes to head\.weight, calls"):
        res = compile_eager(model, rules="lrp0")(x)
    assert_unchanged(model, before)
    assert model.rescaled is False
    plain = nn.Sequential(model.fc, nn.ReLU(), nn.Linear(8, 3)).eval()  # what the traced call computes
    with torch.no_grad():
        plain[2].weight.copy_(model.head.weight * 0.5)
        plain[2].bias.copy_(model.head.bias)
    expected = compile_eager(plain, rules="lrp0")(x, target=res.target)
    torch.testing.assert_close(res.output, expected.output, rtol=0, atol=0)
    torch.testing.assert_close(res.relevance, expected.relevance, rtol=0, atol=0)


class ScalesItsInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 3)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        features.mul_(2)
        return self.fc(features)


def test_a_forward_that_writes_its_input_is_warned_about_by_the_input_name() -> None:
    """The warning named the input after lrpc's wrapper (``tensors_0``); the input is left as it was."""
    x = torch.randn(2, 6)
    before = x.clone()
    with pytest.warns(UserWarning, match=r"forward writes to features:"):
        compile_eager(ScalesItsInput().eval())(x)
    assert torch.equal(x, before)


class CountsThenBranches(WritesItsState):
    """Writes its buffer, then branches on a value: torch.export cannot trace it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.add_(1)
        h = self.head(torch.relu(self.fc(x)))
        return h if h.sum() > 0 else -h


def test_a_failed_trace_of_a_model_with_a_cache_says_use_cache() -> None:
    """Gemma2 and Mamba2 with transformers' default use_cache=True fail in export (their caches are built in
    Python from sizes); the one-word fix was not in the message. Models without the flag do not get the hint."""
    from types import SimpleNamespace

    model = CountsThenBranches().eval()
    with pytest.raises(lrpc.TraceError, match="could not trace") as plain:
        compile_eager(model)(torch.randn(2, 6))
    assert "use_cache" not in str(plain.value)
    model.config = SimpleNamespace(use_cache=True)
    with pytest.raises(lrpc.TraceError, match=r"use_cache=True.*model.config.use_cache = False"):
        compile_eager(model)(torch.randn(2, 6))


def test_a_failed_trace_leaves_the_buffers_as_they_were() -> None:
    """After export fails, lrpc runs the model to tell its own errors from export's limits: that run wrote
    the model's buffers (its step counter went from 0 to 1)."""
    model = CountsThenBranches().eval()
    before = snapshot(model)
    with pytest.raises(lrpc.TraceError, match="could not trace"):
        compile_eager(model)(torch.randn(2, 6))
    assert_unchanged(model, before)
    with pytest.raises(lrpc.LRPCError, match=r"fails on the given inputs \(x \(2, 5\) float32\)"):
        compile_eager(model)(torch.randn(2, 5))  # the model's own error is still the one reported
    assert_unchanged(model, before)


def test_training_mode_warns_only_where_it_changes_something() -> None:
    """Every ``lrpc explain model.pt2`` warned: an exported program's module comes back in training mode,
    as does a fresh ``nn.Sequential`` of layers and activations, whose results no mode changes."""
    x = torch.randn(2, 6)
    plain = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Identity())
    exported = torch.export.export(relu_net(), (x,)).module()
    for model in (plain, exported):
        assert model.training
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            compile_eager(model)(x)
    with pytest.warns(UserWarning, match="training mode"):
        compile_eager(nn.Sequential(nn.Linear(6, 4), nn.Dropout(0.5)))(x)
    with pytest.warns(UserWarning, match="training mode"):  # the user's own module may read self.training
        compile_eager(WritesItsState())(x)


def test_training_model_warns_and_is_explained_in_eval_semantics() -> None:
    net = trained_net().train()
    x = torch.randn(4, 3, 6, 6)
    a = compile_eager(net)
    with pytest.warns(UserWarning, match="training mode"):
        first = a(x)
    second = a(x)  # dropout would make two calls differ
    torch.testing.assert_close(second.relevance, first.relevance, rtol=0, atol=0)
    assert all(m.training for m in net.modules())
    net_eval = trained_net().eval()  # same weights and statistics
    expected = compile_eager(net_eval)(x)
    torch.testing.assert_close(first.relevance, nonzero(expected.relevance))
    with torch.no_grad():
        torch.testing.assert_close(first.output, net_eval(x))
    # batch norm ran with its running statistics: the buffers did not move
    torch.testing.assert_close(net.bn.running_mean, net_eval.bn.running_mean, rtol=0, atol=0)


def test_eval_model_does_not_warn() -> None:
    a = compile_eager(relu_net())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        a(torch.randn(2, 6))


def test_models_export_cannot_trace_are_named_at_compile() -> None:
    """TorchScript and quantized models fail inside torch.export with messages about its internals; lrpc
    says what they are when they are compiled, before any call. Wrappers that export are explained as the
    model they wrap."""
    with pytest.raises(lrpc.TraceError, match=r"RecursiveScriptModule is a TorchScript module \(torch.jit.script\)"):
        lrpc.compile(torch.jit.script(relu_net()))
    quantized = torch.ao.quantization.quantize_dynamic(relu_net(), {nn.Linear}, dtype=torch.qint8)
    with pytest.raises(lrpc.TraceError, match=r"module '0' \(torch\.ao\.nn\.quantized\.dynamic\..*Linear\) is quantized"):
        lrpc.compile(quantized)
    x = torch.randn(2, 6)
    expected = nonzero(compile_eager(relu_net())(x).relevance)
    for wrapped in (torch.jit.trace(relu_net(), x), torch.compile(relu_net()), nn.DataParallel(relu_net())):
        torch.testing.assert_close(compile_eager(wrapped)(x).relevance, expected)


# --- unsupported ops: a torch.library custom op -------------------------------------------------------


def _weird_impl(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)  # SiLU, so that aten.silu is a reference


def _custom_op(name: str):
    @torch.library.custom_op(f"lrpctest::{name}", mutates_args=(), device_types="cpu")
    def impl(x: torch.Tensor) -> torch.Tensor:
        return _weird_impl(x)

    @impl.register_fake
    def _(x: torch.Tensor) -> torch.Tensor:
        return torch.empty_like(x)

    return impl


if not hasattr(torch.ops.lrpctest, "weird"):
    _weird = _custom_op("weird")

    def _weird_setup(ctx, inputs, output) -> None:
        ctx.save_for_backward(inputs[0])

    def _weird_backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        s = torch.sigmoid(x)
        return grad * (s + x * s * (1 - s))

    _weird.register_autograd(_weird_backward, setup_context=_weird_setup)

if not hasattr(torch.ops.lrpctest, "noautograd"):
    _custom_op("noautograd")  # no autograd formula: the gradient fallback cannot differentiate it


WEIRD = torch.ops.lrpctest.weird.default


class Act(nn.Module):
    def __init__(self, op) -> None:
        super().__init__()
        self.op = op

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Block(nn.Module):
    def __init__(self, op) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 8)
        self.act = Act(op)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.lin(x))


class WithOp(nn.Module):
    """``head(act(lin(x)))`` where ``act`` calls ``op``: the custom op, or ``F.silu`` as its reference."""

    def __init__(self, op) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.block = Block(op)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(x))


def test_unsupported_op_error_names_op_node_and_module() -> None:
    a = compile_eager(WithOp(torch.ops.lrpctest.weird).eval())
    with pytest.raises(lrpc.UnsupportedOperatorError) as info:
        a(torch.randn(2, 6))
    err = info.value
    assert isinstance(err, lrpc.LRPCError)
    message = str(err)
    assert "lrpctest.weird.default" in message
    assert f"'{err.node}'" in message and "weird" in err.node
    assert "block.act" in message and err.module == "block.act"
    assert "register_rule" in message and "on_unsupported" in message


if not hasattr(torch.ops.lrpctest, "bag"):

    @torch.library.custom_op("lrpctest::bag", mutates_args=(), device_types="cpu")
    def _bag(table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Token ids looked up in a table and summed per row, by an op lrpc has no rule for."""
        return table[ids].sum(1)

    @_bag.register_fake
    def _(table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return table.new_empty(ids.shape[0], table.shape[1])


class TokensAndSpectrum(nn.Module):
    """Token ids through the op above or through a log (a length as a feature), or an input's spectrum
    (complex values), beside a dense input."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        self.table = nn.Parameter(torch.randn(9, 2))
        self.fc = nn.Linear(2, 3)

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        if self.path == "ids":
            return self.fc(x + torch.ops.lrpctest.bag(self.table, ids))
        if self.path == "log":
            return self.fc(x + torch.log10(ids + 1).sum(1, keepdim=True))
        return self.fc(x + torch.view_as_real(torch.fft.fft(x, dim=-1))[..., 0])


@pytest.mark.parametrize("path, op", [("ids", "lrpctest.bag"), ("spectrum", "aten.view_as_real")])
def test_ops_without_rules_are_reported_on_token_ids_and_complex_values(path: str, op: str) -> None:
    """Such an op counted as a constant, not as unsupported: its share of the relevance vanished without an
    error (nn.EmbeddingBag before it had a rule, torch.fft)."""
    with pytest.raises(lrpc.UnsupportedOperatorError, match=op.replace(".", r"\.")):
        compile_eager(TokensAndSpectrum(path).eval())(torch.randn(2, 2), torch.randint(0, 9, (2, 4)))


def test_ids_turned_into_values_alone_stay_a_constant() -> None:
    """An int -> float op without a table (the log of a count) starts a constant, as a mask turned into a
    bias does: it is not reported as unsupported, and the dense input is explained."""
    res = compile_eager(TokensAndSpectrum("log").eval())(torch.randn(2, 2), torch.randint(0, 9, (2, 4)))
    assert set(res.inputs) == {"x"}
    assert res.relevance.abs().sum() > 0


def test_complex_values_are_not_routed_through_the_gradient() -> None:
    """``on_unsupported="warn"`` routes an op without a rule through its gradient, which for an FFT crashed
    inside the fallback (complex primals cast to the real relevance's dtype): the error says why instead."""
    with pytest.raises(lrpc.UnsupportedOperatorError, match=r"view_as_real.*\n.*complex values"):
        compile_eager(TokensAndSpectrum("spectrum").eval(), on_unsupported="warn")(
            torch.randn(2, 2), torch.randint(0, 9, (2, 4))
        )


def test_unsupported_op_warn_falls_back_to_the_gradient() -> None:
    model = WithOp(torch.ops.lrpctest.weird).eval()
    x = torch.randn(3, 6)
    a = compile_eager(model, on_unsupported="warn")
    with pytest.warns(UserWarning, match=r"lrpctest\.weird"):
        res = a(x)
    assert res.relevance.shape == x.shape and torch.isfinite(res.relevance).all()
    report = a.report()
    assert report.coverage < 1.0
    assert any("lrpctest.weird.default" in f and "block.act" in f for f in report.fallbacks)
    assert "fallback" in str(report)
    # the fallback is the Gradient rule: the same as aten.silu with lrpc.rules.Gradient()
    reference = WithOp(nn.functional.silu).eval()
    silu = torch.ops.aten.silu.default
    try:
        lrpc.register_rule(silu, lrpc.rules.Gradient())
        expected = compile_eager(reference)(x).relevance
    finally:
        lrpc.register_rule(silu, None)
    torch.testing.assert_close(res.relevance, nonzero(expected))
    # ... which is not what the Pass rule (the preset's rule for silu) gives
    assert not torch.allclose(res.relevance, compile_eager(reference)(x).relevance)


def test_fallback_without_autograd_formula_names_the_op() -> None:
    a = compile_eager(WithOp(torch.ops.lrpctest.noautograd).eval(), on_unsupported="warn")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(
            lrpc.LRPCError, match=r"Gradient\(\) failed at node .*lrpctest\.noautograd.*module 'block\.act'"
        ):
            a(torch.randn(2, 6))


def test_register_rule_covers_the_op_and_invalidates_the_cache() -> None:
    model = WithOp(torch.ops.lrpctest.weird).eval()
    x = torch.randn(3, 6)
    a = compile_eager(model, on_unsupported="warn")
    with pytest.warns(UserWarning):
        fallback = a(x).relevance
    assert a.stats["traces"] == 1
    try:
        lrpc.register_rule(WEIRD, lrpc.rules.Pass())
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            covered = a(x)
            assert a.stats["traces"] == 2, "a registry change must invalidate cached programs"
            assert a.report().coverage == 1.0 and a.report().fallbacks == []
            strict = compile_eager(model)(x)  # on_unsupported="error" compiles now
        # Pass at the custom op is what the preset does at aten.silu
        expected = compile_eager(WithOp(nn.functional.silu).eval())(x).relevance
        torch.testing.assert_close(covered.relevance, nonzero(expected))
        torch.testing.assert_close(strict.relevance, expected)
        assert not torch.allclose(covered.relevance, fallback)
    finally:
        lrpc.register_rule(WEIRD, None)
    # removed again: unsupported as before, and nothing stale is reused
    with pytest.raises(lrpc.UnsupportedOperatorError):
        compile_eager(model)(x)
    with pytest.warns(UserWarning, match=r"lrpctest\.weird"):
        again = a(x)
    assert a.stats["traces"] == 3
    torch.testing.assert_close(again.relevance, fallback)


def test_register_rule_rejects_non_rules() -> None:
    with pytest.raises(TypeError):
        lrpc.register_rule(WEIRD, lambda op, R: R)


# --- token ids ----------------------------------------------------------------------------------------


class BagOfEmbeddings(nn.Module):
    """Masked mean of token embeddings, then a bias-free linear head."""

    def __init__(self, vocab: int = 50, dim: int = 8, classes: int = 3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, classes, bias=False)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        e = self.emb(ids)
        if mask is None:
            return self.head(e.mean(1))
        m = mask.to(e.dtype).unsqueeze(-1)
        return self.head((e * m).sum(1) / m.sum(1))


def test_token_ids_get_per_token_relevance() -> None:
    model = BagOfEmbeddings().eval()
    ids = torch.randint(0, 50, (3, 7))
    a = compile_eager(model, rules="lrp0")
    res = a(ids)
    assert set(res.inputs) == {"ids"}
    assert res.relevance.shape == (3, 7) and res.relevance.is_floating_point()
    # by hand: LRP-0 through a mean and a bias-free linear layer gives token t: e_t . W_c / T
    c = res.target
    expected = (model.emb.weight[ids] * model.head.weight[c].unsqueeze(1)).sum(-1).detach() / 7
    torch.testing.assert_close(res.relevance, nonzero(expected))
    # other batch sizes and sequence lengths: one dynamic program for all of them
    for shape in ((5, 4), (2, 9), (3, 7)):
        assert a(torch.randint(0, 50, shape)).relevance.shape == shape
    assert a.stats["traces"] == 2


def test_attention_mask_gets_no_relevance_entry() -> None:
    model = BagOfEmbeddings().eval()
    ids = torch.randint(0, 50, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, 4:] = 0
    res = compile_eager(model)(ids, mask)
    assert set(res.inputs) == {"ids"}
    assert isinstance(res.relevance, torch.Tensor) and res.relevance.shape == (2, 6)
    assert torch.equal(res.relevance[1, 4:], torch.zeros(2))  # masked-out tokens: no relevance
    assert (res.relevance[:, :4] != 0).all()


class FloatMaskedMean(nn.Module):
    """A masked mean over positions with a float mask, as Hugging Face vision-language models pass it."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(4, 3, bias=False)

    def forward(self, x: torch.Tensor, pixel_mask: torch.Tensor) -> torch.Tensor:
        pooled = (x * pixel_mask.unsqueeze(-1)).sum(1) / pixel_mask.sum(1, keepdim=True)
        return self.head(pooled)


def test_float_mask_is_held_constant_by_default() -> None:
    model = FloatMaskedMean().eval()
    x, mask = torch.randn(2, 5, 4, dtype=torch.float64), torch.ones(2, 5, dtype=torch.float64)
    mask[0, 3:] = 0
    model.double()
    res = compile_eager(model, rules="lrp0")(x, mask)
    assert list(res.inputs) == ["x"]
    # LRP-0 with the mask constant: gradient x input with respect to x alone; it conserves the logit
    x_ = x.clone().requires_grad_()
    model(x_, mask).gather(1, res.target.view(-1, 1)).sum().backward()
    torch.testing.assert_close(res.relevance, nonzero(x_ * x_.grad).detach())
    assert torch.equal(res.relevance[0, 3:], torch.zeros(2, 4, dtype=torch.float64))
    assert "constant inputs: pixel_mask" in str(compile_eager(model, rules="lrp0").plan(x, mask))
    # constants=() explains every input: the product rule now splits relevance between x and the mask
    both = compile_eager(model, rules="lrp0", constants=())(x, mask)
    assert list(both.inputs) == ["x", "pixel_mask"] and both.inputs["pixel_mask"].abs().sum() > 0
    # a pattern of the user's choice
    only_mask = compile_eager(model, rules="lrp0", constants="x")(x, mask)
    assert list(only_mask.inputs) == ["pixel_mask"]
    # every input held constant (an image named "masked_image"): the error names the pattern, not the model
    with pytest.raises(lrpc.LRPCError, match=r"held constant: x, pixel_mask, whose names match compile\(\.\.\., constants"):
        compile_eager(model, rules="lrp0", constants=("x", "*mask*"))(x, mask)


# --- tiny Hugging Face models ---------------------------------------------------------------------------

transformers = pytest.importorskip("transformers")


def _bert():
    config = transformers.BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        initializer_range=0.1,
        num_labels=3,
    )
    return transformers.BertForSequenceClassification(config), "bert.encoder.layer.0"


def _gpt2():
    config = transformers.GPT2Config(
        vocab_size=100,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=64,
        initializer_range=0.1,
        bos_token_id=1,
        eos_token_id=2,
    )
    return transformers.GPT2LMHeadModel(config), "transformer.h.0"


def _llama():
    config = transformers.LlamaConfig(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        initializer_range=0.1,
    )
    return transformers.LlamaForCausalLM(config), "model.layers.0"


def test_a_model_that_builds_its_cache_in_python_is_explained_without_it() -> None:
    """Gemma 2 with transformers' default use_cache=True builds a HybridCache in Python, which export cannot
    trace: lrpc calls it with use_cache=False (the logits do not read the cache), the model's config
    untouched."""
    config = transformers.Gemma2Config(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        sliding_window=4,
        max_position_embeddings=32,
        initializer_range=0.1,
    )
    torch.manual_seed(0)
    model = transformers.Gemma2ForCausalLM(config).eval()
    assert model.config.use_cache
    ids = torch.randint(0, 64, (1, 6))
    explained = compile_eager(model, rules="cp-lrp")(input_ids=ids)
    expected = compile_eager(model, rules="cp-lrp")(input_ids=ids, use_cache=False)
    torch.testing.assert_close(nonzero(explained.relevance), expected.relevance, rtol=0, atol=0)
    assert model.config.use_cache


@pytest.mark.parametrize("build", [_bert, _gpt2, _llama], ids=["bert", "gpt2", "llama"])
def test_hugging_face_tiny_models(build) -> None:
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    model, layer = build()
    model.eval()
    a = compile_eager(model, layers=[layer])
    ids = torch.randint(3, 100, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    # decoders: left padding (under a causal mask the first rows attend to nothing); BERT: right padding
    # (its pooler reads position 0)
    pad = slice(5, 7) if "bert" in layer else slice(0, 2)
    mask[1, pad] = 0
    res = a(input_ids=ids, attention_mask=mask)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits

    torch.testing.assert_close(res.output, logits)  # the program computes the model's own output
    assert set(res.inputs) == {"input_ids"}  # no entry for the attention mask
    assert res.relevance.shape == (2, 7)
    assert torch.isfinite(res.relevance).all()
    assert (res.relevance[0] != 0).all()
    assert (res.relevance[1, :5] != 0).all() if "bert" in layer else (res.relevance[1, 2:] != 0).all()
    torch.testing.assert_close(res.relevance[1, pad], torch.zeros(2))  # padding explains nothing
    scores = logits[:, -1] if logits.dim() == 3 else logits  # sequences: the last position
    assert torch.equal(res.target, scores.argmax(-1))

    hidden = res.layers[layer]
    assert hidden.shape == (2, 7, model.config.hidden_size)
    assert torch.isfinite(hidden).all() and hidden.abs().sum() > 0
    torch.testing.assert_close(hidden[1, pad], torch.zeros(2, model.config.hidden_size))

    report = a.report()
    assert report.coverage == 1.0 and report.fallbacks == [], str(report)

    for shape in ((3, 5), (4, 9)):
        res2 = a(input_ids=torch.randint(3, 100, shape), attention_mask=torch.ones(shape, dtype=torch.long))
        assert res2.relevance.shape == shape and torch.isfinite(res2.relevance).all()
        assert res2.layers[layer].shape == (*shape, model.config.hidden_size)
    assert a.stats["traces"] == 2, "other batch sizes and sequence lengths share one dynamic program"

    # an explicit class (for sequence outputs: at the last position) other than sample 0's argmax
    c = int(res.target[0] + 1) % logits.shape[-1]
    res3 = a(input_ids=ids, attention_mask=mask, target=c)
    assert torch.equal(res3.target, torch.tensor([c, c]))
    assert not torch.allclose(res3.relevance[0], res.relevance[0])
    assert a.stats["traces"] == 3


def test_a_call_with_labels_explains_the_predictions() -> None:
    """``labels=`` makes a Hugging Face model return its loss first: lrpc explained the batch's mean loss, a
    scalar, without a word. The logits are explained, as without labels; ``output="loss"`` still picks it."""
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    model, _ = _bert()
    model.eval()
    ids, labels = torch.randint(3, 100, (2, 7)), torch.tensor([0, 1])
    plain = compile_eager(model)(input_ids=ids)
    res = compile_eager(model)(input_ids=ids, labels=labels)
    torch.testing.assert_close(res.output, plain.output)
    assert torch.equal(res.target, plain.target)
    torch.testing.assert_close(res.relevance, nonzero(plain.relevance))
    loss = compile_eager(model, output="loss")(input_ids=ids, labels=labels)
    assert loss.output.shape == ()
    torch.testing.assert_close(loss.output, model(input_ids=ids, labels=labels).loss.detach())
    # a tuple (return_dict=False) has no names: the loss is the scalar before the logits
    res = compile_eager(model)(input_ids=ids, labels=labels, return_dict=False)
    torch.testing.assert_close(res.relevance, plain.relevance)
    loss = compile_eager(model, output=0)(input_ids=ids, labels=labels, return_dict=False)
    assert loss.output.shape == ()


# --- targets and seeds ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lrp0():
    model = relu_net()
    torch.manual_seed(1)
    x = torch.randn(4, 6)
    return model, x, compile_eager(model, rules="lrp0"), model(x).detach()


def test_target_none_is_the_argmax(lrp0) -> None:
    model, x, a, out = lrp0
    res = a(x)
    assert torch.equal(res.target, out.argmax(-1))
    torch.testing.assert_close(res.output, out)
    torch.testing.assert_close(res.relevance, nonzero(grad_x_input(model, x, out.argmax(-1))))


def test_target_int(lrp0) -> None:
    model, x, a, _out = lrp0
    for c in (0, 3):
        res = a(x, target=c)
        assert torch.equal(res.target, torch.full((4,), c))
        torch.testing.assert_close(res.relevance, nonzero(grad_x_input(model, x, torch.full((4,), c))))


def test_target_per_sample(lrp0) -> None:
    model, x, a, _out = lrp0
    index = torch.tensor([3, 0, 2, 1])
    res = a(x, target=index)
    assert torch.equal(res.target, index)
    torch.testing.assert_close(res.relevance, nonzero(grad_x_input(model, x, index)))
    # a one-element tensor is broadcast over the batch
    res1 = a(x, target=torch.tensor([2]))
    torch.testing.assert_close(res1.relevance, a(x, target=2).relevance)
    # lists, NumPy arrays and NumPy integers are read as indices too, with the same program
    traces = a.stats["traces"]
    for same in ([3, 0, 2, 1], (3, 0, 2, 1), index.numpy()):
        torch.testing.assert_close(a(x, target=same).relevance, res.relevance)
    torch.testing.assert_close(a(x, target=np.int64(2)).relevance, res1.relevance)
    assert a.stats["traces"] == traces
    for bad, message in (([0.5, 1.0, 2.0, 3.0], "integer class indices"), ([[1], [2, 3]], "cannot read")):
        with pytest.raises(lrpc.LRPCError, match=message):
            a(x, target=bad)
    with pytest.raises(lrpc.LRPCError, match=r"ndarray argument: .*torch\.from_numpy"):
        a(x.numpy())


class Scaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = relu_net()

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        return self.net(x) * scale


def test_numpy_scalars_are_constants_like_python_numbers() -> None:
    x = torch.randn(2, 6)
    res = compile_eager(Scaled().eval())(x, scale=np.float32(2.0))
    torch.testing.assert_close(res.output, Scaled().eval()(x, 2.0).detach())


def test_target_callable_is_the_seed(lrp0) -> None:
    _model, x, a, _out = lrp0
    index = torch.tensor([1, 1, 3, 0])

    def seed(output: torch.Tensor) -> torch.Tensor:
        onehot = torch.nn.functional.one_hot(torch.tensor([1, 1, 3, 0]), output.shape[-1]).to(output.dtype)
        return output * onehot

    res = a(x, target=seed)
    assert res.target is None
    torch.testing.assert_close(res.relevance, a(x, target=index).relevance)

    # a seed on two classes at once is the sum of the two explanations (LRP-0 is linear in the seed)
    res2 = a(x, target=lambda o: o * torch.tensor([1.0, 0.0, 1.0, 0.0]))
    expected = a(x, target=0).relevance + a(x, target=2).relevance
    torch.testing.assert_close(res2.relevance, expected)


@dataclass
class Unit:
    """A callable target that is unhashable (a dataclass with ``eq``): a hidden unit, here an output class."""

    k: int

    def __call__(self, output: torch.Tensor) -> torch.Tensor:
        seed = torch.zeros_like(output)
        seed[:, self.k] = output[:, self.k]
        return seed


def test_an_unhashable_callable_target_is_cached_by_identity(lrp0) -> None:
    """It failed with ``TypeError: unhashable type`` from the program cache's key."""
    _model, x, a, _out = lrp0
    unit = Unit(2)
    torch.testing.assert_close(a(x, target=unit).relevance, nonzero(a(x, target=2).relevance))
    traces = a.stats["traces"]
    a(x, target=unit)
    assert a.stats["traces"] == traces  # the same object reuses its program
    torch.testing.assert_close(a(x, target=Unit(1)).relevance, a(x, target=1).relevance)


@pytest.mark.parametrize("seed", ["logit", "one"])
def test_seed_logit_and_one(lrp0, seed: str) -> None:
    model, x, _, out = lrp0
    a = compile_eager(model, rules="lrp0", seed=seed)
    res = a(x)
    logit = out.gather(1, res.target.view(-1, 1)).squeeze(1)
    totals = res.relevance.sum(1)
    # LRP-0 on a bias-free ReLU network conserves the seed
    torch.testing.assert_close(totals, nonzero(logit) if seed == "logit" else torch.ones(4))
    # the per-call seed overrides the compiled one
    other = "one" if seed == "logit" else "logit"
    res_other = a(x, seed=other)
    torch.testing.assert_close(res_other.relevance.sum(1), logit if other == "logit" else torch.ones(4))
    report = a.report()
    assert report.conservation == pytest.approx(1.0, abs=1e-4)
    # a program looked up but not run since: its report has no conservation, not the other program's
    a.plan(x, target=lambda out: out)
    assert a.report().conservation is None


def test_scalar_output_is_explained_as_is() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(5, 8, bias=False), nn.ReLU(), nn.Linear(8, 1, bias=False), nn.Flatten(0)
    ).eval()
    x = torch.randn(3, 5)
    res = compile_eager(model, rules="lrp0")(x)
    assert res.target is None and res.output.shape == (3,)
    torch.testing.assert_close(res.relevance.sum(1), nonzero(model(x).detach()))


@pytest.mark.parametrize(
    "target, match",
    [
        (torch.tensor([0.0, 1.0, 2.0, 0.0]), "integer class indices"),
        (torch.tensor([True, False, True, False]), "integer class indices"),
        (torch.tensor([0, 1]), "2 indices for a batch of 4"),
        (7, r"out of range.*4 classes"),
        (-1, r"out of range.*4 classes"),
        (torch.tensor([0, 1, 9, 0]), r"out of range"),
        ("cat", "target must be"),
        (True, "target must be"),
        (1.5, "target must be"),
        (lambda out: out[:, :1], "seed tensor shaped like the output"),
    ],
    ids=[
        "float",
        "bool",
        "length",
        "big",
        "negative",
        "per-sample",
        "str",
        "bool-scalar",
        "float-scalar",
        "callable-shape",
    ],
)
def test_bad_target_is_a_clear_error(lrp0, target, match: str) -> None:
    _, x, a, _ = lrp0
    with pytest.raises(lrpc.LRPCError, match=match):
        a(x, target=target)


@pytest.mark.parametrize("target", [7, -1, torch.tensor([0, 9])])
def test_a_target_out_of_a_dynamic_class_dimension_is_a_clear_error(target) -> None:
    """Per-token scores (a question-answering head's span starts): the class dimension is the sequence, which
    a second length makes dynamic. An index past this call's length selected nothing (zero relevance, no
    error) where the static program refused it."""

    class StartScores(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.score = nn.Embedding(10, 4), nn.Linear(4, 1)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.score(self.emb(ids)).squeeze(-1)

    torch.manual_seed(0)
    a = compile_eager(StartScores().eval())
    a(torch.randint(0, 10, (2, 5)), target=1)
    a(torch.randint(0, 10, (2, 6)), target=1)  # another length: the dynamic program
    assert a.stats["traces"] == 2
    with pytest.raises(lrpc.LRPCError, match=r"out of range.*the output \(2, 4\) has 4 classes"):
        a(torch.randint(0, 10, (2, 4)), target=target)
    assert a(torch.randint(0, 10, (2, 4)), target=3).relevance.abs().sum() > 0


@pytest.mark.parametrize("reduce", ["per-sample", "scalar"])
def test_a_class_target_on_an_output_without_classes_is_refused(reduce: str) -> None:
    """One score per sample ``(B,)`` or a scalar: ``target=3`` was silently ignored (the score explained,
    ``res.target`` None). No target still explains the score."""
    model = nn.Sequential(relu_net(), nn.Flatten(0) if reduce == "scalar" else nn.Identity())
    head = (lambda out: out.sum()) if reduce == "scalar" else (lambda out: out[:, 0])
    a = compile_eager(model, output=head)
    x = torch.randn(3, 6)
    for target in (3, [0, 1, 2]):
        with pytest.raises(lrpc.LRPCError, match=r"picks a class, but the explained output .* no class dimension"):
            a(x, target=target)
    res = a(x)
    assert res.target is None
    torch.testing.assert_close(res.relevance.sum(), head(model(x)).sum().detach(), rtol=1e-5, atol=1e-6)


class ClassConditional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb, self.fc = nn.Embedding(4, 6), nn.Linear(6, 4)

    def forward(self, x: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        return self.fc(x if target is None else x + self.emb(target))


def test_a_forward_argument_named_target_comes_positionally() -> None:
    """``target=`` of a call is lrpc's: a class-conditional model's own ``target`` was taken for the class to
    explain and the model never saw it. The ambiguous call is refused; positionally it reaches the model."""
    torch.manual_seed(0)
    model, x, t = ClassConditional().eval(), torch.randn(3, 6), torch.tensor([0, 2, 3])
    a = compile_eager(model)
    with pytest.raises(lrpc.LRPCError, match=r"forward takes an argument named 'target'.*as argument 2"):
        a(x, target=t)
    res = a(x, t, target=1)
    torch.testing.assert_close(res.output, model(x, t).detach(), rtol=0, atol=0)
    assert torch.equal(res.target, torch.tensor([1, 1, 1]))
    torch.testing.assert_close(a(x).output, model(x).detach(), rtol=0, atol=0)


def test_an_override_that_names_no_module_warns() -> None:
    """A mistyped path (``"features.2"`` on a plain ``Sequential``) left the preset's rule in place silently."""
    model = relu_net()
    for key, match in [("features.2", r"'features\.2'.*applies nowhere: no module path.*'0', '1'"), (nn.Conv1d, "no Conv1d")]:
        with pytest.warns(UserWarning, match=match):
            lrpc.compile(model, rules=lrpc.composite("epsilon", {key: lrpc.rules.ZPlus()}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lrpc.compile(model, rules=lrpc.composite("epsilon", {"2": lrpc.rules.ZPlus(), nn.Linear: lrpc.rules.Epsilon()}))


class TwoOutputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.fc(x), x.sum(-1)


def test_errors_name_what_is_wrong_not_the_model(capfd) -> None:
    """A wrong ``output=`` was reported as the model failing on its inputs; a float64 input to a float32
    model as a rule failing at a node (after 20 lines of fake-tensor log); a box bound of the wrong shape as
    a failed ``expand``."""
    x = torch.randn(3, 6)
    for output, match in [
        (5, r"output=5 does not pick from what the model returned \(a tuple of 2\): IndexError"),
        ("logits", r"output='logits' does not pick .*a tuple of 2"),
        (lambda out: out, r"picked a tuple \(a tuple of 2\), not a tensor"),
    ]:
        with pytest.raises(lrpc.TraceError, match=match):
            compile_eager(TwoOutputs().eval(), output=output)(x)
    with pytest.raises(lrpc.LRPCError, match=r"fails on the given inputs \(input \(3, 6\) float64\).*same dtype"):
        compile_eager(relu_net())(x.double())
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(256, 3))
    box = lrpc.presets.epsilon_gamma_box(low=torch.zeros(3, 5, 5), high=torch.ones(3, 5, 5))
    with pytest.raises(lrpc.RuleError, match=r"ZBox: a bound of shape \(3, 5, 5\) does not fit .*\(3, 8, 8\) per sample"):
        compile_eager(model.eval(), rules=box)(torch.rand(2, 3, 8, 8))
    assert "fake_tensor" not in capfd.readouterr().err


class PredictionAndLogits(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.fc(x)
        return logits.argmax(-1), logits


class Predictions(PredictionAndLogits):
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(x)[0]


def test_integer_outputs_are_not_explained() -> None:
    """A model returning ``(predicted ids, logits)``: the default picks the logits (it picked the ids, and
    the error blamed the inputs: "does not depend on any floating-point input"); picking the ids, or a
    model with no float output, says that an integer tensor has no score to explain."""
    torch.manual_seed(0)
    model, x = PredictionAndLogits().eval(), torch.randn(3, 6)
    res = compile_eager(model)(x)
    torch.testing.assert_close(res.output, model(x)[1].detach())
    torch.testing.assert_close(res.relevance, compile_eager(model, output=1)(x).relevance, rtol=0, atol=0)
    with pytest.raises(lrpc.TraceError, match=r"output=0 picked a tensor of shape \(3,\) \(torch.int64\)"):
        compile_eager(model, output=0)(x)
    with pytest.raises(lrpc.TraceError, match=r"only integer or boolean tensors \(a tensor of shape \(3,\) \(torch"):
        compile_eager(Predictions().eval())(x)


def test_bad_options_are_clear_errors() -> None:
    model = relu_net()
    with pytest.raises(lrpc.LRPCError, match=r"unknown rules preset 'nope'.*epsilon"):
        lrpc.compile(model, rules="nope")
    with pytest.raises(lrpc.LRPCError, match=r"unknown backend 'nope'.*eager"):
        lrpc.compile(model, backend="nope")
    with pytest.raises(lrpc.LRPCError, match=r"no submodule '5\.weight'"):
        lrpc.compile(model, layers=["5.weight"])
    with pytest.raises(lrpc.LRPCError, match=r"no submodule 'encoder'"):
        lrpc.compile(model, layers=["encoder"])
    with pytest.raises(lrpc.LRPCError, match=r"module paths are strings .*got 0 \(int\)"):
        lrpc.compile(model, layers=[0])  # it said Sequential had no submodule '0'
    with pytest.raises(lrpc.LRPCError, match="cache_size must be a positive int"):
        lrpc.compile(model, cache_size=-1)  # a StopIteration at the first call
    with pytest.raises(lrpc.LRPCError, match="dynamic must be None"):
        lrpc.compile(model, dynamic="yes")
    with pytest.raises(lrpc.LRPCError, match="seed must be one of"):
        lrpc.compile(model, seed="two")
    with pytest.raises(lrpc.LRPCError, match="on_unsupported must be one of"):
        lrpc.compile(model, on_unsupported="ignore")
    with pytest.raises(lrpc.LRPCError, match="seed must be one of"):
        compile_eager(model)(torch.randn(2, 6), seed="two")
    with pytest.raises(TypeError, match="nn.Module"):
        lrpc.compile(lambda x: x)


def test_layer_not_on_the_explained_path_is_an_error() -> None:
    class Unused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used = nn.Linear(4, 2)
            self.unused = nn.Linear(4, 2)

        def forward(self, x):
            return self.used(x)

    with pytest.raises(lrpc.LRPCError, match="layer 'unused'"):
        compile_eager(Unused().eval(), layers=["unused"])(torch.randn(2, 4))


class SharedActivation(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1, self.act, self.l2, self.head, self.skip = nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.Linear(8, 3), nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.l2(self.act(self.l1(self.skip(x))))))


def test_layers_of_a_module_called_twice_or_computing_nothing() -> None:
    """A module called twice: the relevance at its last call, with a warning saying so (one of the two came
    back without a word). ``nn.Identity`` leaves nothing in the trace: the error said it was not called."""
    model, x = SharedActivation().eval(), torch.randn(2, 6)
    with pytest.warns(UserWarning, match=r"module 'act' is called 2 times.*last call"):
        res = compile_eager(model, rules="lrp0", layers=["act", "l2"])(x)
    torch.testing.assert_close(res.layers["act"], res.layers["l2"])  # the identity rule: ReLU(l2) carries l2's
    with pytest.raises(lrpc.LRPCError, match=r"layer 'skip'.*computes nothing a trace keeps \(nn.Identity"):
        compile_eager(model, layers=["skip"])(x)


def test_layer_relevance_is_conserved(lrp0) -> None:
    model, x, _, out = lrp0
    res = compile_eager(model, rules="lrp0", layers=["0", "2"])(x)
    logit = out.gather(1, res.target.view(-1, 1)).squeeze(1)
    assert set(res.layers) == {"0", "2"}
    assert res.layers["0"].shape == (4, 16) and res.layers["2"].shape == (4, 16)
    torch.testing.assert_close(res.layers["2"].sum(1), nonzero(logit))
    torch.testing.assert_close(res.layers["0"].sum(1), logit)


@pytest.mark.parametrize("backend", ["eager", "interpret"])
def test_layers_sharing_one_output_each_get_it(backend: str) -> None:
    """A module's output that is its parent's output too (the last layer of an encoder): both paths get
    the relevance there, not one of them zeros (a helper's sweep found ``bert.encoder.layer.1`` empty when
    asked with ``bert.encoder``)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Sequential(nn.Linear(6, 16), nn.ReLU()), nn.Linear(16, 3)).eval()
    x = torch.randn(4, 6)
    both = lrpc.compile(model, rules="lrp0", backend=backend, layers=["0.1", "0"])(x)
    alone = lrpc.compile(model, rules="lrp0", backend=backend, layers=["0"])(x)
    assert both.layers["0"].shape == both.layers["0.1"].shape == (4, 16)
    torch.testing.assert_close(both.layers["0.1"], alone.layers["0"], rtol=0, atol=0)
    torch.testing.assert_close(both.layers["0"], alone.layers["0"], rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["eager", "interpret"])
def test_a_layer_no_relevance_reaches_gets_zeros_of_its_shape(backend: str) -> None:
    """cp-lrp holds a squeeze-excitation gate constant: the gate's layer gets no relevance, and is returned
    as zeros shaped like its output (it was a 0-d tensor, which broke code indexing it per sample)."""

    class Gated(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.fc, self.head = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 1), nn.Linear(4, 5)

        def forward(self, x):
            h = self.conv(x)
            return self.head((h * torch.sigmoid(self.fc(h.mean((2, 3), keepdim=True)))).mean((2, 3)))

    torch.manual_seed(0)
    res = lrpc.compile(Gated().eval(), rules="cp-lrp", backend=backend, layers=["fc", "conv"])(torch.randn(2, 3, 8, 8))
    assert res.layers["fc"].shape == (2, 4, 1, 1) and not res.layers["fc"].any()
    assert res.layers["conv"].shape == (2, 4, 6, 6) and res.layers["conv"].any()


def test_layers_given_as_one_path_or_none(lrp0) -> None:
    model, x, _, _ = lrp0
    one = compile_eager(model, rules="lrp0", layers="2")(x)
    assert set(one.layers) == {"2"}
    torch.testing.assert_close(one.layers["2"], compile_eager(model, rules="lrp0", layers=["2"])(x).layers["2"])
    assert compile_eager(model, rules="lrp0", layers=None)(x).layers == {}


# --- several inputs, structured outputs -----------------------------------------------------------------


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.la = nn.Linear(3, 8, bias=False)
        self.lb = nn.Linear(2, 8, bias=False)
        self.head = nn.Linear(8, 4, bias=False)
        self.aux = nn.Linear(3, 5, bias=False)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> dict[str, torch.Tensor]:
        h = torch.relu(self.la(a) + self.lb(b))
        return {"logits": self.head(h), "aux": self.aux(a)}


def test_two_float_inputs() -> None:
    model = TwoInputs().eval()
    xa, xb = torch.randn(3, 3), torch.randn(3, 2)
    res = compile_eager(model, rules="lrp0")(xa, xb)
    assert isinstance(res.relevance, tuple) and len(res.relevance) == 2
    assert list(res.inputs) == ["a", "b"]
    assert res.inputs["a"] is res.relevance[0] and res.inputs["b"] is res.relevance[1]
    assert res.relevance[0].shape == xa.shape and res.relevance[1].shape == xb.shape
    # against gradient x input of the explained logit
    a_, b_ = xa.clone().requires_grad_(), xb.clone().requires_grad_()
    logits = model(a_, b_)["logits"]
    logits.gather(1, res.target.view(-1, 1)).sum().backward()
    torch.testing.assert_close(res.inputs["a"], nonzero(a_ * a_.grad).detach())
    torch.testing.assert_close(res.inputs["b"], nonzero(b_ * b_.grad).detach())
    torch.testing.assert_close(res.output, logits.detach())
    # keyword arguments: the same names
    res_kw = compile_eager(model, rules="lrp0")(b=xb, a=xa)
    torch.testing.assert_close(res_kw.inputs["a"], res.inputs["a"])
    torch.testing.assert_close(res_kw.inputs["b"], res.inputs["b"])


def test_dict_output_first_tensor_and_output_selector() -> None:
    model = TwoInputs().eval()
    xa, xb = torch.randn(3, 3), torch.randn(3, 2)
    with torch.no_grad():
        out = model(xa, xb)
    default = compile_eager(model)(xa, xb)
    torch.testing.assert_close(default.output, out["logits"])
    aux = compile_eager(model, output="aux")(xa, xb)
    torch.testing.assert_close(aux.output, out["aux"])
    assert torch.equal(aux.target, out["aux"].argmax(-1))
    assert torch.equal(aux.inputs["b"], torch.zeros_like(xb))  # b does not reach "aux"
    assert (aux.inputs["a"] != 0).any()
    picked = compile_eager(model, output=lambda o: o["aux"])(xa, xb)
    torch.testing.assert_close(picked.relevance[0], aux.relevance[0])


def test_tuple_output_first_tensor_and_index_selector() -> None:
    class Pair(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.a = nn.Linear(4, 3)
            self.b = nn.Linear(4, 6)

        def forward(self, x):
            return self.a(x), self.b(x)

    model = Pair().eval()
    x = torch.randn(2, 4)
    first = compile_eager(model)(x)
    second = compile_eager(model, output=1)(x)
    with torch.no_grad():
        torch.testing.assert_close(first.output, model.a(x))
        torch.testing.assert_close(second.output, model.b(x))
    assert second.output.shape == (2, 6)
    assert not torch.allclose(first.relevance, second.relevance)


def test_attribution_fields_and_introspection() -> None:
    model = relu_net()
    a = compile_eager(model, layers=["2"])
    x = torch.randn(2, 6)
    res = a(x)
    assert isinstance(res, lrpc.Attribution)
    assert set(res.inputs) == {"input"}
    assert isinstance(a.program(x), lrpc.Program)
    gm = a.graph_module(x)
    assert isinstance(gm, torch.fx.GraphModule)
    assert "relu" in a.program(x).code()
    plan = a.plan(x)
    assert plan.coverage == 1.0 and "aten.linear.default" in str(plan)
    assert a.stats["traces"] == 1  # introspection reuses the cached program
    report = a.report()
    assert report.model == "Sequential" and report.coverage == 1.0
    assert report.as_dict()["nodes"] == report.nodes > 0


def test_inputs_the_model_rejects_are_named_as_such() -> None:
    model = relu_net()  # expects 6 features
    with pytest.raises(
        lrpc.LRPCError, match=r"Sequential fails on the given inputs \(input \(3, 4\) float32\)"
    ) as info:
        compile_eager(model)(torch.randn(3, 4))
    assert not isinstance(info.value, lrpc.TraceError)


class FailsOnRealValues(nn.Module):
    """Traces (fake values carry no numbers) but fails when run: the float64 ``finfo.min`` does not fit the
    float32 tensor ``torch.full`` makes without a dtype (as transformers' BART does under tracing)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        floor = torch.full((x.shape[0], 3), torch.finfo(torch.float64).min)
        return self.fc(x) + 0 * floor.to(x.dtype)


@pytest.mark.parametrize("backend", ["eager", "inductor"])
def test_a_program_failing_at_run_time_names_the_node(backend: str) -> None:
    """The error names the node, its op and module and the model's source line, on a compiled backend too;
    and, since this model fails eagerly too, says so first."""
    with pytest.raises(
        lrpc.LRPCError,
        match=r"FailsOnRealValues's relevance program failed at run time at node 'full' \(aten\.full\.default, "
        r"module '', File .*test_api\.py\", line \d+, in forward\): RuntimeError: value cannot be converted",
    ) as info:
        lrpc.compile(FailsOnRealValues().eval(), backend=backend)(torch.randn(2, 4))
    assert str(info.value).startswith("FailsOnRealValues fails on the given inputs (x (2, 4) float32): RuntimeError")


# --- backends ----------------------------------------------------------------------------------------------


class NormalizedOverTime(nn.Module):
    """Batch norm over the features of a (B, T, F) series, through a transpose (PatchTST's default)."""

    def __init__(self) -> None:
        super().__init__()
        self.bn, self.lin = nn.BatchNorm1d(8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(self.bn(x.transpose(1, 2)).transpose(1, 2)).mean(1)


def test_eager_backend_takes_the_strides_kernels_return() -> None:
    """CPU batch norm returns a transposed input's result contiguous where its fake kernel keeps the input's
    strides: the program's later ``view`` failed at run time on the eager backend (not under Inductor)."""
    torch.manual_seed(23)
    model = NormalizedOverTime().double().eval()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    eager = compile_eager(model)(x)
    interp = lrpc.compile(model, backend="interpret")(x)
    torch.testing.assert_close(eager.output, model(x))
    torch.testing.assert_close(eager.relevance, nonzero(interp.relevance), rtol=1e-12, atol=1e-14)


def test_interpret_backend_matches_eager() -> None:
    model = conv_net(nn.MaxPool2d(2), features=4 * 4 * 4)
    x = torch.randn(3, 3, 8, 8)
    eager = compile_eager(model)(x)
    interp = lrpc.compile(model, backend="interpret")(x)
    torch.testing.assert_close(interp.relevance, nonzero(eager.relevance))


def test_interpret_backend_runs_the_custom_op_fallback() -> None:
    model = WithOp(torch.ops.lrpctest.weird).eval()
    x = torch.randn(2, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        eager = compile_eager(model, on_unsupported="warn")(x)
        interp = lrpc.compile(model, backend="interpret", on_unsupported="warn")(x)
    torch.testing.assert_close(interp.relevance, nonzero(eager.relevance))


def _failing_compiler(gm):
    """A backend that builds, but whose compiled program fails on its first call (as a compile error does)."""

    def run(*args):
        raise RuntimeError("simulated compile failure\nsecond line")

    return run


def _failing_build(gm):
    raise RuntimeError("simulated build failure")


@pytest.mark.parametrize("broken", [_failing_compiler, _failing_build], ids=["first-call", "build"])
def test_auto_backend_falls_back_to_eager_with_a_warning(monkeypatch, broken) -> None:
    from lrpc import backends

    model = relu_net(bias=True)
    x = torch.randn(3, 6)
    reference = compile_eager(model)(x)
    monkeypatch.setitem(backends._BACKENDS, "inductor", broken)
    a = lrpc.compile(model)  # auto: Inductor on CPU
    with pytest.warns(
        UserWarning,
        match=r"'inductor' backend could not compile .*simulated .* failure\); running it with the eager",
    ):
        res = a(x)
    torch.testing.assert_close(res.relevance, nonzero(reference.relevance))
    assert a.report().backend == "eager"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(a(x).relevance, reference.relevance)  # warned once, then eager
    # asked for by name, the backend's own error surfaces
    with pytest.raises(RuntimeError, match="simulated"):
        lrpc.compile(model, backend="inductor")(x)
    # the fallback is the eager backend's program (views run as reshape: batch norm through a transpose)
    series, xs = NormalizedOverTime().eval(), torch.randn(2, 5, 8)
    with pytest.warns(UserWarning, match="running it with the eager"):
        fallen = lrpc.compile(series)(xs)
    torch.testing.assert_close(fallen.relevance, nonzero(compile_eager(series)(xs).relevance))


def test_auto_backend_picks_inductor(monkeypatch) -> None:
    """Inductor on every device: on CUDA as fast as the fused-kernel backend (an H200), on CPU faster per
    call than the eager program on the CNNs and the transformers (BENCHMARKS.md)."""
    from lrpc import backends

    assert backends.choose("auto") == "inductor"
    assert backends.choose("eager") == "eager"
    assert backends.choose("triton") == "triton"
    calls = []
    monkeypatch.setitem(backends._BACKENDS, "inductor", lambda gm: calls.append(gm) or gm)
    cnn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)).eval()
    for model, x in ((relu_net(bias=True), torch.randn(2, 6)), (cnn, torch.randn(2, 3, 8, 8))):
        a = lrpc.compile(model)
        a(x)
        assert a.report().backend == "inductor"
    assert len(calls) == 2


def test_inductor_keeps_the_programs_layouts_off_cuda(monkeypatch) -> None:
    """On CPU Inductor's layout optimization copies every convolution weight and activation into
    channels-last on every call (the weights are program inputs, not frozen constants): 1.40x -> 1.03x
    gradient x input on ResNet-50 with it off. It stays on for CUDA programs."""
    from lrpc import backends

    seen = []
    monkeypatch.setattr(torch._inductor, "compile", lambda gm, args, options: seen.append(options) or gm)
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: seen.append(kw["options"]) or fn)
    cnn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)).eval()
    a = lrpc.compile(cnn, backend="inductor")
    a(torch.randn(2, 3, 8, 8))
    a(torch.randn(3, 3, 8, 8))  # the dynamic program, through torch.compile
    assert seen == [{"layout_optimization": False}] * 2
    monkeypatch.setattr(backends, "devices", lambda gm: {"cuda"})
    lrpc.compile(cnn, backend="inductor")(torch.randn(2, 3, 8, 8))
    assert seen[-1] == {}


def test_inductor_backend_matches_eager_and_reuses_programs() -> None:
    from torch._dynamo.utils import counters

    model = relu_net(bias=True)
    a = lrpc.compile(model, backend="inductor")
    torch._dynamo.reset()
    counters.clear()
    for batch in (2, 5, 9):
        x = torch.randn(batch, 6)
        torch.testing.assert_close(a(x).relevance, nonzero(compile_eager(model)(x).relevance))
    assert a.stats["traces"] == 2
    assert a.report().backend == "inductor"
    # the first batch's program goes to Inductor directly; the dynamic one through Dynamo, compiled once
    # for every size after
    assert counters["stats"]["unique_graphs"] == 1


@pytest.mark.parametrize("backend", ["eager", "inductor"])
def test_cached_programs_do_not_keep_the_inputs_alive(backend: str) -> None:
    """A program is cached for the attributor's lifetime; the input it was traced and compiled on (a
    batch of images can be tens of MB) must be freed with the user's last reference to it."""
    import gc
    import weakref

    a = lrpc.compile(relu_net(bias=True), backend=backend)
    x = torch.randn(4, 6)
    alive = weakref.ref(x)
    res = a(x)
    del x, res
    gc.collect()
    assert alive() is None
    a(torch.randn(4, 6))  # and the cached program still runs
    assert a.stats["traces"] == 1


def test_static_inductor_program_takes_any_strides() -> None:
    """The first program of a signature runs Inductor's code without Dynamo's guards: inputs laid out in
    any way (transposed, broadcast, sliced, overlapping; the attributor makes them contiguous) give the
    eager program's relevance, from one program."""
    from torch._dynamo.utils import counters

    model = relu_net(bias=True)
    reference = compile_eager(model)
    torch._dynamo.reset()
    counters.clear()
    a = lrpc.compile(model, backend="inductor")
    base = torch.randn(6, 4)
    for x in (base.t(), torch.randn(4, 6), torch.randn(1, 6).expand(4, 6), torch.randn(4, 12)[:, ::2]):
        torch.testing.assert_close(a(x).relevance, nonzero(reference(x).relevance))
    for first in (torch.randn(1, 6).expand(4, 6), torch.randn(9).as_strided((4, 6), (1, 1))):  # overlapping
        b = lrpc.compile(model, backend="inductor")
        for x in (first, torch.randn(4, 6), base.t()):
            torch.testing.assert_close(b(x).relevance, nonzero(reference(x).relevance))
        assert b.stats["traces"] == 1
    assert a.stats["traces"] == 1
    assert counters["stats"]["unique_graphs"] == 0


def test_static_inductor_backend_copies_arguments_into_the_compiled_strides(monkeypatch) -> None:
    """At the backend seam (where the parameters and the index tensor arrive as they are): an argument
    whose strides differ from the compiled ones is copied into them, without a new compile; a broadcast or
    overlapping first argument is compiled as contiguous; another dtype compiles again."""
    from lrpc import backends

    compiles = []
    real = torch._inductor.compile
    monkeypatch.setattr(torch._inductor, "compile", lambda *a, **k: compiles.append(1) or real(*a, **k))
    model, x = relu_net(bias=True), torch.randn(4, 6)
    program = compile_eager(model).program(x, target=1)
    args = [*program.traced.state, x, torch.full((4,), 1)]
    weight = args[0]
    assert weight.dim() == 2
    variants = [
        args,
        [weight.t().contiguous().t(), *args[1:]],  # a parameter stored transposed
        [*args[:-1], torch.tensor([1]).expand(4)],  # a broadcast index
        [*args[:-2], torch.randn(9).as_strided((4, 6), (1, 1)), args[-1]],  # overlapping
    ]
    for first in (variants[0], variants[2], variants[3]):
        run = backends.get("inductor")(program.graph_module)
        before = len(compiles)
        for call in (first, *variants):
            expected = program.graph_module(*call)[3]
            assert expected.abs().max() > 0
            torch.testing.assert_close(run(*call)[3], expected)
        assert len(compiles) == before + 1
    double = [t.double() if t.is_floating_point() else t for t in args]
    torch.testing.assert_close(run(*double)[3], program.graph_module(*double)[3])
    assert run(*double)[3].dtype == torch.float64 and len(compiles) == before + 2


@pytest.mark.parametrize("backend", ["eager", "inductor"])
def test_a_model_cast_after_compiling_is_traced_again(backend: str) -> None:
    """Token ids keep the call's signature when the model is cast (or moved) after its first call: the
    cached program must not run what was traced for float32 parameters on float64 ones (the eager program
    failed inside a matmul). The model's dtype and device are part of the signature."""
    model = BagOfEmbeddings().eval()
    ids = torch.randint(0, 50, (3, 7))
    a = lrpc.compile(model, rules="lrp0", backend=backend)
    assert a(ids).relevance.dtype == torch.float32
    model.double()
    res = a(ids)
    assert res.relevance.dtype == torch.float64 and a.stats["traces"] == 2
    torch.testing.assert_close(res.relevance, nonzero(compile_eager(model, rules="lrp0")(ids).relevance))


@pytest.mark.parametrize(
    "change",
    ["submodule", "parameter", "load_state_dict(assign=True)", "deleted submodule", "bias = None", "unrelated"],
)
def test_replaced_members_drop_the_cached_programs(change: str) -> None:
    """Programs read the parameter objects they were traced with: a replaced submodule or parameter was
    silently explained as it was (outputs 0.5-0.8 off), and so were a deleted submodule and a bias set to
    None, which fire none of PyTorch's registration hooks. A module created elsewhere changes nothing."""
    torch.manual_seed(0)
    model, x = relu_net(bias=True), torch.randn(3, 6)
    a = compile_eager(model)
    a(x)
    a(x)  # the first call's own module creations (its program's) are behind it
    if change == "deleted submodule":
        del model[1]  # the first ReLU
    elif change == "bias = None":
        model[0].bias = None
    else:  # a module created here, after the removals (its registration once hid them from an older check)
        fresh = relu_net(bias=True)
        with torch.no_grad():  # other weights, the same shapes
            for p in fresh.parameters():
                p.mul_(-1.5)
        if change == "submodule":
            model[2] = fresh[2]
        elif change == "parameter":
            model[0].weight = fresh[0].weight
        elif change == "load_state_dict(assign=True)":
            model.load_state_dict(fresh.state_dict(), assign=True)
    res = a(x)
    torch.testing.assert_close(res.output, model(x).detach(), rtol=0, atol=0)
    assert a.stats["traces"] == (1 if change == "unrelated" else 2)
    torch.testing.assert_close(res.relevance, compile_eager(model)(x).relevance, rtol=0, atol=0)


def test_static_inductor_programs_are_cached_on_disk_across_attributors(monkeypatch, tmp_path) -> None:
    """Inductor's on-disk caches (compiled graph and AOTAutograd) serve a later process, or attributor, that
    compiles the same program: ResNet-50's first call in a new process went from 39 to 5 s. They skip a
    graph compiled outside Dynamo unless it comes with a tracing context. The weights are program inputs,
    so a model with other weights reuses the compiled code and gets its own relevance."""
    from torch._dynamo.utils import counters

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    x = torch.randn(4, 6)
    seen = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        model = relu_net(bias=True)
        counters.clear()
        res = lrpc.compile(model, backend="inductor")(x, target=1)
        torch.testing.assert_close(res.relevance, nonzero(compile_eager(model)(x, target=1).relevance))
        seen.append({k: v for k, v in counters["inductor"].items() if k.startswith("fxgraph_cache")})
        assert counters["aot_autograd"]["autograd_cache_bypass"] == 0
    assert seen == [{"fxgraph_cache_miss": 1}, {"fxgraph_cache_hit": 1}, {"fxgraph_cache_hit": 1}]


class Head(nn.Module):
    """A feature extractor and a large classification head, on (B, d) or (B, T, d) inputs."""

    def __init__(self, classes: int = 50, bias: bool = True) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 8), nn.ReLU())
        self.head = nn.Linear(8, classes, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def _relevance_matmuls(gm, classes: int) -> int:
    """Matmuls that read a tensor with a dimension of size ``classes``: the head's forward, and its
    relevance unless the head was cut down to the explained class."""
    mms = (torch.ops.aten.mm.default, torch.ops.aten.bmm.default, torch.ops.aten.addmm.default)
    return sum(
        1
        for n in gm.graph.nodes
        if n.target in mms and any(classes in tuple(a.meta["val"].shape) for a in n.all_input_nodes)
    )


@pytest.mark.parametrize("build", [_gpt2, _llama], ids=["gpt2", "llama"])
def test_language_model_head_is_explained_one_class_at_a_time(build, monkeypatch) -> None:
    """The seed is one class at the last position: the head's relevance is W[c] per sample, not a matmul
    over the vocabulary; the relevance is the full layer's exactly (same divisions, one product each)."""
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    model = build()[0].eval()
    ids = torch.randint(3, 100, (2, 7))
    a = compile_eager(model)
    res = a(input_ids=ids, target=torch.tensor([5, 9]))
    monkeypatch.setattr(lrpc.codegen, "_one_class", lambda *args: None)
    full = compile_eager(model)
    ref = full(input_ids=ids, target=torch.tensor([5, 9]))
    assert torch.equal(res.relevance, ref.relevance) and torch.equal(res.output, ref.output)
    assert _relevance_matmuls(a.graph_module(input_ids=ids, target=1), 100) == 1
    assert _relevance_matmuls(full.graph_module(input_ids=ids, target=1), 100) == 2


@pytest.mark.parametrize("shape", [(4, 6), (3, 5, 6)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rule", ["epsilon", "zplus", "gamma", "alpha-beta", "flat", "w-square", "z-box"])
def test_one_class_head_matches_the_full_layer(shape, bias: bool, rule: str, monkeypatch) -> None:
    torch.manual_seed(1)
    model = Head(bias=bias).eval()
    chosen = {
        "epsilon": lrpc.rules.Epsilon(0.1),
        "zplus": lrpc.rules.ZPlus(),
        "gamma": lrpc.rules.Gamma(0.25),
        "alpha-beta": lrpc.rules.AlphaBeta(),
        "flat": lrpc.rules.Flat(),
        "w-square": lrpc.rules.WSquare(),
        "z-box": lrpc.rules.ZBox(low=-3.0, high=3.0),
    }[rule]
    preset = lrpc.composite("epsilon", {"head": chosen})
    x = torch.randn(*shape)
    target = torch.tensor([3, 7, 0, 49][: shape[0]])
    cut = lrpc.compile(model, rules=preset, backend="eager")
    res = cut(x, target=target)
    monkeypatch.setattr(lrpc.codegen, "_one_class", lambda *args: None)
    ref = lrpc.compile(model, rules=preset, backend="eager")(x, target=target)
    # ε reads z off the forward: equal; the others recompute z with modified weights, one row at a time
    torch.testing.assert_close(res.relevance, ref.relevance, rtol=1e-5, atol=1e-6)
    if rule == "epsilon":
        assert torch.equal(res.relevance, ref.relevance)
    assert _relevance_matmuls(cut.graph_module(x, target=target), 50) == 1  # the forward's


@pytest.mark.parametrize("first", ["contiguous", "channels_last"])
def test_inputs_in_other_memory_formats(first: str) -> None:
    """A program is traced on contiguous inputs and called on them: a channels-last image (whichever call
    comes first) must neither break the views after a convolution (Flatten) nor change the relevance."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).eval()
    x = torch.randn(2, 3, 6, 6)
    layouts = [x, x.to(memory_format=torch.channels_last)]
    if first == "channels_last":
        layouts.reverse()
    a = compile_eager(model, rules="lrp0")
    results = [a(t, target=1).relevance for t in layouts]
    assert a.stats["traces"] == 1
    torch.testing.assert_close(results[0], results[1])
    torch.testing.assert_close(results[0], nonzero(grad_x_input(model, x, torch.tensor([1, 1]))), rtol=1e-5, atol=1e-6)
