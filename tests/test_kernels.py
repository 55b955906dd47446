"""The Triton rule kernels (``lrpc.kernels``) and the fusion pass that swaps them into relevance programs.

* each kernel against its plain-torch ``*_reference``: float32 at 1e-5 relative, random inputs with odd
  sizes that are not multiples of the block sizes (several tiles and reduction steps), batch dims, ``z``
  with exact zeros (the ``sign(0) = +1`` convention, and ``eps = 0``'s ``R/0 = 0``), masked softmax rows,
  rows longer than one block; float16 / bfloat16 at their precision; the argument checks;
* each reference against lrpc's own rules on a one-layer model (``lrpc.compile(..., backend="eager")``
  with the seed chosen by the test), in float64, so that a reference that drifted from lrpc fails;
* the fusion pass on small relevance programs: which patterns it replaces (counted), which it must leave
  alone (convolutions, ``x @ W``), and the fused program against the unfused one;
* the ``"triton"`` backend: a clear error without CUDA; on a CUDA machine, against ``"eager"``.

Where they run is settled per process, because Triton settles it when it is first imported (its library
functions are jitted for the interpreter or for the compiler then, and the other mode fails on them): on a
machine without CUDA, ``tests/conftest.py`` sets ``TRITON_INTERPRET=1`` before anything imports triton, and
the tests take CPU tensors through Triton's interpreter; on a GPU machine the variable stays unset and the
same tests (the ``device`` fixture) take the same data, moved to the GPU, through the compiled kernels.
"""

import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.fx.experimental.proxy_tensor import make_fx

import lrpc
from lrpc import presets, rules

pytest.importorskip("triton", reason="triton is not installed: the kernels cannot run (not even interpreted)")

from lrpc.kernels import _common, fusion, linear

from lrpc import kernels

CUDA = torch.cuda.is_available()
INTERPRET = kernels.interpreting()  # this process's Triton mode (see the module docstring)
COMPILED = CUDA and not INTERPRET
needs_interpreter = pytest.mark.skipif(
    not INTERPRET,
    reason="CPU tensors need Triton's interpreter (TRITON_INTERPRET=1 before triton is imported)",
)
needs_gpu = pytest.mark.skipif(
    not COMPILED, reason="needs a CUDA device and compiled (not interpreted) Triton"
)


@pytest.fixture(params=[pytest.param("cpu", marks=needs_interpreter), pytest.param("cuda", marks=needs_gpu)])
def device(request: pytest.FixtureRequest) -> str:
    """Where a kernel test runs: CPU tensors through the interpreter, or on a GPU machine the same data
    (made on the CPU, then moved) through the compiled kernels."""
    return request.param


# --- helpers -------------------------------------------------------------------------------------------
def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|; refuses an all-zero or non-finite reference."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    expected, actual = expected.double(), actual.double()
    assert torch.isfinite(expected).all(), "the reference is not finite"
    scale = expected.abs().max().item()
    assert scale > 0, "the reference is all zero: the comparison would be vacuous"
    return (actual - expected).abs().max().item() / scale


def integers(*shape: int, low: int = -2, high: int = 3, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Small integers: sums of their products are exact in any order, so z hits 0 exactly."""
    return torch.randint(low, high, shape).to(dtype)


def seed_with(R: torch.Tensor):
    """A ``target=`` callable that puts exactly ``R`` in at the output."""

    def target(output: torch.Tensor) -> torch.Tensor:
        return R.to(output.dtype) + 0 * output

    return target


# Sizes: rows 70 > 64, inputs 75 > 64, outputs 45 > 32 (linear.LAUNCH's tile caps): several tiles in every
# direction and more than one reduction step, none of them a multiple of a block size.
ROWS, IN, OUT = 70, 75, 45
LEADING = [(ROWS,), (2, 5, 7)]  # plain rows, and batch dims flattened by the wrappers


def layer_data(
    leading: tuple[int, ...], bias: bool = True, dtype: torch.dtype = torch.float32, device: str = "cpu"
) -> tuple:
    x = torch.randn(*leading, IN, dtype=dtype)
    W = torch.randn(OUT, IN, dtype=dtype) / IN**0.5
    b = torch.randn(OUT, dtype=dtype) if bias else None
    z = F.linear(x, W, b)
    return to(device, x, W, b, z, torch.randn_like(z))


def to(device: str, *tensors: torch.Tensor | None) -> tuple:
    return tuple(None if t is None else t.to(device) for t in tensors)


# --- the interpreter switch ----------------------------------------------------------------------------
def test_kernels_are_jitted_in_the_mode_of_their_first_launch(device: str) -> None:
    """Kernels are not jitted at import: ``triton.jit`` runs at the first launch, in the mode then in force."""
    kernel = linear._epsilon_kernel
    assert isinstance(kernel, _common.jit)
    x, W, _, z, R = layer_data((3,), device=device)
    kernels.linear_epsilon(x, R, z, W)
    jitted = type(kernel._by_mode[INTERPRET]).__name__
    assert jitted == ("InterpretedFunction" if INTERPRET else "JITFunction")
    assert kernels.available() == CUDA


def test_cpu_tensors_need_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x, W, _, z, R = layer_data((3,))
    with pytest.raises(ValueError, match="CUDA tensors"):
        kernels.linear_epsilon(x, R, z, W)


# --- kernels against their references ------------------------------------------------------------------
@pytest.mark.parametrize("leading", LEADING)
@pytest.mark.parametrize("eps", [0.0, 1e-6, 0.25])
def test_linear_epsilon(leading: tuple[int, ...], eps: float, device: str) -> None:
    torch.manual_seed(1)
    x, W, _, z, R = layer_data(leading, device=device)
    out = kernels.linear_epsilon(x, R, z, W, eps)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert rel_err(out, kernels.linear_epsilon_reference(x, R, z, W, eps)) < 1e-5


@pytest.mark.parametrize("eps", [0.0, 0.5])
def test_linear_epsilon_sign_of_zero(eps: float, device: str) -> None:
    """Integer data: many z are exactly 0; stab(0) = +eps (and R/0 = 0 for eps = 0)."""
    torch.manual_seed(2)
    x, W, b = integers(ROWS, IN), integers(OUT, IN), integers(OUT, low=-1, high=2)
    x[:, 1::2] = 0  # sparser rows: more exact zeros in z
    z = F.linear(x, W, b)
    assert (z == 0).sum() >= 20
    x, W, z, R = to(device, x, W, z, torch.randn_like(z))
    expected = kernels.linear_epsilon_reference(x, R, z, W, eps)
    sign = torch.where(z >= 0, 1.0, -1.0)
    by_hand = (
        x * (torch.where(z == 0, 0.0, R / (z + eps * sign)) @ W)
        if eps == 0
        else x * ((R / (z + eps * sign)) @ W)
    )
    assert rel_err(expected, by_hand) < 1e-6
    assert rel_err(kernels.linear_epsilon(x, R, z, W, eps), expected) < 1e-5
    if eps > 0:  # the data does tell sign(0) = +1 from sign(0) = -1
        other = x * ((R / (z + eps * torch.where(z > 0, 1.0, -1.0))) @ W)
        assert rel_err(other, expected) > 1e-2


def test_linear_epsilon_transposed_weight(device: str) -> None:
    """Any weight strides (the program passes ``t(t(W))``-style views)."""
    torch.manual_seed(3)
    x, W, _, z, R = layer_data((ROWS,), device=device)
    Wt = W.T.contiguous().T
    assert not Wt.is_contiguous()
    assert rel_err(kernels.linear_epsilon(x, R, z, Wt), kernels.linear_epsilon_reference(x, R, z, W)) < 1e-5


SIGNED = {
    "zplus": lambda x, R, z, W, b, s: (
        kernels.linear_zplus(x, R, W, b, s),
        kernels.linear_zplus_reference(x, R, W, b, s),
    ),
    "alpha_beta": lambda x, R, z, W, b, s: (
        kernels.linear_alpha_beta(x, R, W, b, 2.0, 1.0, s),
        kernels.linear_alpha_beta_reference(x, R, W, b, 2.0, 1.0, s),
    ),
    "alpha_beta_1_0": lambda x, R, z, W, b, s: (
        kernels.linear_alpha_beta(x, R, W, b, 1.0, 0.0, s),
        kernels.linear_alpha_beta_reference(x, R, W, b, 1.0, 0.0, s),
    ),
    "gamma": lambda x, R, z, W, b, s: (
        kernels.linear_gamma(x, R, z, W, b, 0.25, s),
        kernels.linear_gamma_reference(x, R, z, W, b, 0.25, s),
    ),
    "gamma_0": lambda x, R, z, W, b, s: (
        kernels.linear_gamma(x, R, z, W, b, 0.0, s),
        kernels.linear_gamma_reference(x, R, z, W, b, 0.0, s),
    ),
}


@pytest.mark.parametrize("rule", sorted(SIGNED))
@pytest.mark.parametrize("leading", LEADING)
@pytest.mark.parametrize("bias", [True, False])
def test_linear_sign_split(rule: str, leading: tuple[int, ...], bias: bool, device: str) -> None:
    torch.manual_seed(4)
    x, W, b, z, R = layer_data(leading, bias, device=device)
    # γ = 0 is ε: outputs near 0 would amplify the summation-order differences of the recomputed z
    out, expected = SIGNED[rule](x, R, z, W, b, 0.1 if rule == "gamma_0" else 1e-6)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert rel_err(out, expected) < 1e-5


def test_matmul_kernels_compile_without_register_spills() -> None:
    """The matmul kernels as ptxas compiles them for an H100 / H200, in float32 (IEEE and TF32) and
    bfloat16: the float32 sign-split kernels, with Triton's default launch, spilled up to 42 KB per thread
    and ran at ~1 TFLOP/s there. ``bench/registers.py`` compiles each wrapper's launches as Triton's JIT
    would (no GPU needed) and fails on a spill."""
    import subprocess
    import sys
    from pathlib import Path

    import triton

    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("this Triton ships no ptxas")
    script = Path(__file__).resolve().parent.parent / "bench" / "registers.py"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compiled, not interpreted
    done = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True, env=env, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert [done.stdout.count(f"| {mode} |") for mode in ("float32 IEEE", "float32 TF32", "bfloat16")] == [7] * 3


@pytest.mark.parametrize("rule", ["zplus", "alpha_beta", "gamma"])
def test_linear_sign_split_stabilizer_zero(rule: str, device: str) -> None:
    """Integer data with all-zero rows of x: the split pre-activations are exactly 0 there (R/0 = 0)."""
    torch.manual_seed(5)
    x, W, b = integers(ROWS, IN), integers(OUT, IN), integers(OUT, low=0, high=1)  # b = 0
    x[::3] = 0
    z = F.linear(x, W, b)
    x, W, b, z, R = to(device, x, W, b, z, torch.randn_like(z))
    out, expected = SIGNED[rule](x, R, z, W, b, 0.0)
    assert rel_err(out, expected) < 1e-5


LOW_PRECISION = {torch.float16: 5e-3, torch.bfloat16: 4e-2}


@pytest.mark.parametrize("dtype", sorted(LOW_PRECISION, key=str))
def test_linear_low_precision(dtype: torch.dtype, device: str) -> None:
    """16-bit storage, float32 accumulation: against the float32 reference on the same rounded values."""
    torch.manual_seed(6)
    x, W, b, z, R = layer_data((2, 17), dtype=dtype, device=device)
    f = [t.float() for t in (x, W, b, z, R)]
    tol = LOW_PRECISION[dtype]
    eps = kernels.linear_epsilon(x, R, z, W, 0.1)
    assert eps.dtype == dtype
    assert rel_err(eps.float(), kernels.linear_epsilon_reference(f[0], f[4], f[3], f[1], 0.1)) < tol
    gamma = kernels.linear_gamma(x, R, z, W, b)
    assert rel_err(gamma.float(), kernels.linear_gamma_reference(f[0], f[4], f[3], f[1], f[2])) < tol
    ab = kernels.linear_alpha_beta(x, R, W, b)
    assert rel_err(ab.float(), kernels.linear_alpha_beta_reference(f[0], f[4], f[1], f[2])) < tol


@pytest.mark.parametrize(
    "shape,dim", [((3, 5, 7), -1), ((3, 5, 7), 1), ((9, 4), 0), ((2, 3, 5000), -1), ((1, 37), -1)]
)
def test_softmax_relevance(shape: tuple[int, ...], dim: int, device: str) -> None:
    """Short rows several per program, a middle dim, and rows longer than one block (5000 > 4096)."""
    torch.manual_seed(7)
    x = torch.randn(shape) * 3
    x, s, R = to(device, x, torch.softmax(x, dim), torch.randn(shape))
    out = kernels.softmax_relevance(x, s, R, dim)
    assert out.shape == x.shape and out.is_contiguous()
    assert rel_err(out, kernels.softmax_relevance_reference(x, s, R, dim)) < 1e-5


def test_softmax_relevance_masked(device: str) -> None:
    """x = -inf (s = 0) gets exactly 0, not nan; the rest of the row is unaffected."""
    torch.manual_seed(8)
    x = torch.randn(4, 6, 11)
    x[:, :, 7:] = -torch.inf
    x[1, 2, :3] = -torch.inf
    x, s, R = to(device, x, torch.softmax(x, -1), torch.randn(4, 6, 11))
    out = kernels.softmax_relevance(x, s, R)
    expected = kernels.softmax_relevance_reference(x, s, R)
    assert torch.isfinite(out).all()
    assert (out[:, :, 7:] == 0).all() and (out[1, 2, :3] == 0).all()
    assert rel_err(out, expected) < 1e-5


@pytest.mark.parametrize("dtype", sorted(LOW_PRECISION, key=str))
def test_softmax_relevance_low_precision(dtype: torch.dtype, device: str) -> None:
    torch.manual_seed(9)
    x = torch.randn(5, 33, dtype=dtype)
    x, s, R = to(device, x, torch.softmax(x, -1), torch.randn(5, 33, dtype=dtype))
    out = kernels.softmax_relevance(x, s, R)
    expected = kernels.softmax_relevance_reference(x.float(), s.float(), R.float())
    assert rel_err(out.float(), expected) < LOW_PRECISION[dtype]


@pytest.mark.parametrize("eps", [0.0, 1e-6, 0.5])
def test_uniform_product(eps: float, device: str) -> None:
    """Exact zeros in a and b (z = 0) and a size that is not a multiple of the block (1024)."""
    torch.manual_seed(10)
    a, b, R = torch.randn(3, 7, 101), torch.randn(3, 7, 101), torch.randn(3, 7, 101)
    a[0, :, :9] = 0
    b[1, 2:4] = 0
    a, b, R = to(device, a, b, R)
    ra, rb = kernels.uniform_product(a, b, R, eps)
    xa, xb = kernels.uniform_product_reference(a, b, R, eps)
    assert rel_err(ra, xa) < 1e-6 and rel_err(rb, xb) < 1e-6
    if eps == 0:  # each operand gets half of R (none where z = 0)
        half = torch.where(a * b == 0, 0.0, R / 2)
        assert rel_err(ra, half) < 1e-6 and rel_err(rb, half) < 1e-6


@pytest.mark.parametrize("dtype", sorted(LOW_PRECISION, key=str))
def test_uniform_product_low_precision(dtype: torch.dtype, device: str) -> None:
    torch.manual_seed(11)
    a, b, R = to(device, *(torch.randn(4, 50, dtype=dtype) for _ in range(3)))
    ra, rb = kernels.uniform_product(a, b, R, 0.1)
    xa, xb = kernels.uniform_product_reference(a.float(), b.float(), R.float(), 0.1)
    assert ra.dtype == dtype
    assert rel_err(ra.float(), xa) < LOW_PRECISION[dtype] and rel_err(rb.float(), xb) < LOW_PRECISION[dtype]


def test_empty_inputs(device: str) -> None:
    x, W, b, z, R = layer_data((0,), device=device)
    assert kernels.linear_epsilon(x, R, z, W).shape == (0, IN)
    assert kernels.linear_gamma(x, R, z, W, b).shape == (0, IN)
    e = torch.empty(0, 5, device=device)
    assert kernels.softmax_relevance(e, e, e).shape == (0, 5)
    assert kernels.uniform_product(e, e, e)[0].shape == (0, 5)


def test_argument_checks(device: str) -> None:
    x, W, b, z, R = layer_data((4,), device=device)
    with pytest.raises(ValueError, match="x .* does not match weight"):
        kernels.linear_epsilon(x[:, :-1], R, z, W)
    with pytest.raises(ValueError, match="R must have shape"):
        kernels.linear_epsilon(x, R[:, :-1], z, W)
    with pytest.raises(ValueError, match="z must have R's shape"):
        kernels.linear_epsilon(x, R, z[:2], W)
    with pytest.raises(ValueError, match="weight must have 2 dims"):
        kernels.linear_epsilon(x, R, z, W[None])
    with pytest.raises(TypeError, match="share one dtype"):
        kernels.linear_epsilon(x, R.double(), z, W)
    with pytest.raises(TypeError, match="not supported"):
        kernels.linear_epsilon(x.double(), R.double(), z.double(), W.double())
    with pytest.raises(ValueError, match=">= 0"):
        kernels.linear_epsilon(x, R, z, W, -1.0)
    with pytest.raises(ValueError, match="bias must have shape"):
        kernels.linear_zplus(x, R, W, b[:-1])
    with pytest.raises(ValueError, match="gamma must be >= 0"):
        kernels.linear_gamma(x, R, z, W, b, -0.5)
    with pytest.raises(ValueError, match="one shape"):
        kernels.softmax_relevance(x, x, R)
    with pytest.raises(ValueError, match="dim 2 out of range"):
        kernels.softmax_relevance(x, x, x, 2)
    with pytest.raises(ValueError, match="no broadcasting"):
        kernels.uniform_product(x, x[:1], x)
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        kernels.uniform_product(x, x.cpu().numpy(), x)


# --- references against lrpc's rules --------------------------------------------------------------------
DTYPE = torch.float64


def explain_linear(rule: rules.Rule | lrpc.Preset, x: torch.Tensor, bias: bool = True, integer: bool = False):
    """lrpc's relevance for one nn.Linear(7, 5) with a random seed R: (relevance, R, z, W, b). A ``rule``
    is put on the layer as an override (of the "epsilon" preset, whose first-layer rule is none)."""
    layer = nn.Linear(x.shape[-1], 5, bias=bias).to(DTYPE).eval()
    if integer:
        with torch.no_grad():
            layer.weight.copy_(integers(*layer.weight.shape, dtype=DTYPE))
            if bias:
                layer.bias.copy_(integers(5, low=-1, high=2, dtype=DTYPE))
    z = layer(x).detach()
    R = torch.randn_like(z)
    preset = rule if isinstance(rule, lrpc.Preset) else lrpc.composite("epsilon", {"0": rule})
    attributor = lrpc.compile(nn.Sequential(layer).eval(), rules=preset, backend="eager")
    res = attributor(x, target=seed_with(R))
    (step,) = [s for s in attributor.plan(x, target=seed_with(R)).steps if s.family == "linear"]
    assert step.rule == (preset.rule_for(lrpc.ops.Family.LINEAR) if isinstance(rule, lrpc.Preset) else rule)
    b = layer.bias.detach() if bias else None
    return res.relevance, R, z, layer.weight.detach(), b


@pytest.mark.parametrize("eps", [0.0, 0.5])
@pytest.mark.parametrize("shape", [(16, 7), (2, 8, 7)])
def test_epsilon_reference_is_lrpc(eps: float, shape: tuple[int, ...]) -> None:
    torch.manual_seed(20)
    x = integers(*shape, low=-1, high=2, dtype=DTYPE)  # small integer weights and inputs: some z are 0
    relevance, R, z, W, _ = explain_linear(presets.epsilon(eps=eps), x, integer=True)
    assert (z == 0).any()
    assert rel_err(linear.linear_epsilon_reference(x, R, z, W, eps), relevance) < 1e-12


@pytest.mark.parametrize(
    "rule,call,bias",
    [
        (rules.ZPlus(), lambda x, R, z, W, b: linear.linear_zplus_reference(x, R, W, b, 1e-6), True),
        (rules.ZPlus(), lambda x, R, z, W, b: linear.linear_zplus_reference(x, R, W, b, 1e-6), False),
        (
            rules.ZPlus(stabilizer=0.0),
            lambda x, R, z, W, b: linear.linear_zplus_reference(x, R, W, b, 0.0),
            True,
        ),
        (
            rules.AlphaBeta(),
            lambda x, R, z, W, b: linear.linear_alpha_beta_reference(x, R, W, b, 2.0, 1.0, 1e-6),
            True,
        ),
        (
            rules.AlphaBeta(3.0, 2.0, 0.1),
            lambda x, R, z, W, b: linear.linear_alpha_beta_reference(x, R, W, b, 3.0, 2.0, 0.1),
            True,
        ),
        (rules.Gamma(), lambda x, R, z, W, b: linear.linear_gamma_reference(x, R, z, W, b, 0.25, 1e-6), True),
        (
            rules.Gamma(),
            lambda x, R, z, W, b: linear.linear_gamma_reference(x, R, z, W, b, 0.25, 1e-6),
            False,
        ),
        (
            rules.Gamma(1.5, 0.1),
            lambda x, R, z, W, b: linear.linear_gamma_reference(x, R, z, W, b, 1.5, 0.1),
            True,
        ),
    ],
    ids=[
        "zplus",
        "zplus-nobias",
        "zplus-s0",
        "alpha2beta1",
        "alpha3beta2",
        "gamma",
        "gamma-nobias",
        "gamma1.5",
    ],
)
def test_sign_split_references_are_lrpc(rule: rules.Rule, call, bias: bool) -> None:
    torch.manual_seed(21)
    x = torch.randn(2, 6, 7, dtype=DTYPE)
    relevance, R, z, W, b = explain_linear(rule, x, bias=bias)
    assert rel_err(call(x, R, z, W, b), relevance) < 1e-12


@pytest.mark.parametrize("dim", [-1, 1])
def test_softmax_reference_is_lrpc(dim: int) -> None:
    torch.manual_seed(22)
    x = torch.randn(2, 4, 6, dtype=DTYPE)
    x[0, 1, 5] = x[1, 3, 0] = -torch.inf  # masked: s = 0 there, relevance 0
    s = torch.softmax(x, dim)
    R = torch.randn_like(s)
    res = lrpc.compile(nn.Softmax(dim=dim).eval(), rules="epsilon", backend="eager")(x, target=seed_with(R))
    expected = kernels.softmax_relevance_reference(x, s, R, dim)
    assert expected[0, 1, 5] == 0 and expected[1, 3, 0] == 0
    assert rel_err(expected, res.relevance) < 1e-12


class Product(nn.Module):
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a * b


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_product_reference_is_lrpc(eps: float) -> None:
    torch.manual_seed(23)
    a, b = torch.randn(3, 8, dtype=DTYPE), torch.randn(3, 8, dtype=DTYPE)
    a[0, :3] = 0
    R = torch.randn(3, 8, dtype=DTYPE)
    res = lrpc.compile(Product().eval(), rules=presets.epsilon(eps=eps), backend="eager")(
        a, b, target=seed_with(R)
    )
    ra, rb = kernels.uniform_product_reference(a, b, R, eps)
    assert rel_err(ra, res.inputs["a"]) < 1e-12 and rel_err(rb, res.inputs["b"]) < 1e-12


# --- the fusion pass -------------------------------------------------------------------------------------
class Gate(nn.Module):
    """softmax(a(x)) * b(x) -> out: a softmax and a product of two activations, three linear layers."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.out = nn.Linear(6, 9), nn.Linear(6, 9), nn.Linear(9, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.softmax(self.a(x), -1) * self.b(x))


class SmallCNN(nn.Module):
    """conv (the first layer: Flat in epsilon-plus-flat), conv (z⁺), dense (ε)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(2, 3, 3), nn.Conv2d(3, 3, 3)
        self.fc = nn.Linear(3 * 2 * 2, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(F.relu(self.conv2(F.relu(self.conv1(x)))), 1))


class RightMatmul(nn.Module):
    """``x @ W`` with a square parameter: a linear op whose weight is not in ``x Wᵀ`` orientation."""

    def __init__(self) -> None:
        super().__init__()
        self.W = nn.Parameter(torch.randn(6, 6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.W


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 5))


def fused_program(
    model: nn.Module, *inputs: torch.Tensor, rules: str | lrpc.Preset = "epsilon", device: str = "cpu"
):
    """(unfused program, fused program, program arguments), the model and inputs moved to ``device``."""
    torch.manual_seed(30)
    model = model.eval().to(device)
    inputs = to(device, *inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # every output relevant (a class target would cut the explained layer down to one row per sample,
        # codegen._one_class, leaving no matmul to fuse there)
        program = lrpc.compile(model, rules=rules, backend="eager").program(*inputs, target=lambda out: out)
    gm = program.graph_module
    return gm, fusion.fuse(gm), [*program.traced.state, *inputs]


def assert_same_outputs(gm, fused, args, tol: float = 1e-5) -> None:
    with torch.no_grad():
        expected, actual = gm(*args), fused(*args)
    assert len(expected) == len(actual)
    for e, a in zip(expected, actual):
        if isinstance(e, torch.Tensor) and e.is_floating_point():
            assert rel_err(a, e) < tol
        else:
            assert torch.equal(a, e) if isinstance(e, torch.Tensor) else a == e


def aten_targets(gm) -> list:
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


@pytest.mark.parametrize("eps", [0.0, 1e-6])
@pytest.mark.parametrize("shape", [(7, 10), (2, 3, 10)])
def test_fuse_mlp_epsilon(eps: float, shape: tuple[int, ...], device: str) -> None:
    """Each linear layer's ε step becomes one kernel call; its division, matmul and product are gone."""
    torch.manual_seed(31)
    gm, fused, args = fused_program(mlp(), torch.randn(*shape), rules=presets.epsilon(eps=eps), device=device)
    before = aten_targets(gm)
    assert fused.meta[fusion.FUSED_META]["linear_epsilon"] == 3
    assert fusion.fused_counts(fused) == {"linear_epsilon": 3}
    after = aten_targets(fused)
    aten = torch.ops.aten
    assert before.count(aten.mm.default) == 3 and after.count(aten.mm.default) == 0  # the relevance matmuls
    assert after.count(aten.div.Tensor) == 0 and after.count(aten.addmm.default) == 3  # forward kept
    assert len(after) < len(before) - 3 * 5
    assert aten_targets(gm) == before  # the input program is left as it was
    assert_same_outputs(gm, fused, args)


def test_fuse_sign_split_regions(device: str) -> None:
    """z⁺, αβ and γ (with and without stabilizer) on linear layers: one kernel call per layer."""
    preset = lrpc.composite(
        "epsilon", {"0": rules.Gamma(0.25), "2": rules.AlphaBeta(), "4": rules.ZPlus(stabilizer=0.0)}
    )
    torch.manual_seed(32)
    gm, fused, args = fused_program(mlp(), torch.randn(2, 3, 10), rules=preset, device=device)
    # layers "2" and "4" read ReLU outputs (x >= 0), so planning drops their x⁻ terms: αβ still fuses as
    # a sign-split kernel; z⁺ becomes LRP-0 over (W⁺, b⁺), which the epsilon kernel serves
    assert fused.meta[fusion.FUSED_META]["signed_linear"] == 2
    assert fusion.fused_counts(fused) == {"linear_gamma": 1, "linear_alpha_beta": 1, "linear_epsilon": 1}
    assert aten_targets(fused).count(torch.ops.aten.mm.default) == 1  # z⁺'s z = x W⁺ᵀ, which the kernel reads
    assert_same_outputs(gm, fused, args)


def test_fuse_softmax_and_product(device: str) -> None:
    torch.manual_seed(33)
    gm, fused, args = fused_program(Gate(), torch.randn(2, 5, 6), device=device)
    # the relevance pass rebuilds the softmax (lrpc.memory.rematerialize): the product's halves read the
    # copy, the product itself the forward value, and the match must see them as one factor
    assert sum(n.target is torch.ops.aten._softmax.default for n in gm.graph.nodes) > 1
    assert fusion.fused_counts(fused) == {"linear_epsilon": 3, "softmax_relevance": 1, "uniform_product": 1}
    assert_same_outputs(gm, fused, args)


def _product_halves(factor, first: str):
    """A uniform product's two halves as :class:`lrpc.rules.UniformProduct` traces them, reading copies of
    ``z``'s first factor made by ``factor`` (a rebuilt copy of a pure op is the same value; a second random
    draw is not), the half of factor ``first`` (``"a"`` or ``"b"``) first in the graph."""

    def fn(x, y, R):
        a = factor(x)
        z = a * y
        q = rules.divide(R, z, 0.1)
        halves = {}
        for which in (first, "b" if first == "a" else "a"):
            copy = factor(x)
            halves[which] = (copy * 0.5) * (q * y) if which == "a" else (y * 0.5) * (q * copy)
        return z.sum(), halves["a"], halves["b"]

    return fn


@pytest.mark.parametrize("first", ["a", "b"])
def test_fuse_product_of_rebuilt_factors(first: str, device: str) -> None:
    x, y, R = torch.randn(3, 4, 6, device=device)
    gm = make_fx(_product_halves(torch.exp, first))(x, y, R)
    fused = fusion.fuse(gm, patterns=["uniform_product"])
    fused.graph.lint()  # the fused call's operands are defined before it
    assert fusion.fused_counts(fused) == {"uniform_product": 1}
    assert_same_outputs(gm, fused, [x, y, R])


def test_fuse_product_does_not_take_another_random_draw_for_a_factor() -> None:
    gm = make_fx(_product_halves(lambda x: x + torch.randn_like(x), "a"))(*torch.randn(3, 4, 6))
    assert fusion.fused_counts(fusion.fuse(gm, patterns=["uniform_product"])) == {}


def test_fuse_patterns_argument(device: str) -> None:
    torch.manual_seed(34)
    gm, _, args = fused_program(Gate(), torch.randn(2, 5, 6), device=device)
    only = fusion.fuse(gm, patterns=["softmax"])
    assert fusion.fused_counts(only) == {"softmax_relevance": 1}
    assert_same_outputs(gm, only, args)
    with pytest.raises(ValueError, match="unknown patterns"):
        fusion.fuse(gm, patterns=["conv"])


def test_fuse_leaves_other_layers_alone(device: str) -> None:
    """Convolutions keep their rules (Flat and z⁺ here: no region is fused, only the dense layer's ε step);
    ``x @ W`` with a square weight is not mistaken for ``x Wᵀ`` by the γ region matcher."""
    torch.manual_seed(35)
    gm, fused, args = fused_program(
        SmallCNN(), torch.randn(2, 2, 6, 6), rules="epsilon-plus-flat", device=device
    )
    assert any("ZPlus" in (n.meta.get("custom") or {}).get("lrpc_rule", "") for n in gm.graph.nodes)
    assert fused.meta[fusion.FUSED_META]["signed_linear"] == 0
    assert fusion.fused_counts(fused) == {"linear_epsilon": 1}
    assert_same_outputs(gm, fused, args)
    model = nn.Sequential(RightMatmul())
    gm, fused, args = fused_program(
        model, torch.randn(3, 6), rules=lrpc.composite("epsilon", {"0": rules.Gamma()}), device=device
    )
    assert any("Gamma" in (n.meta.get("custom") or {}).get("lrpc_rule", "") for n in gm.graph.nodes)
    assert fusion.fused_counts(fused) == {}
    assert_same_outputs(gm, fused, args)


# --- the backend -----------------------------------------------------------------------------------------
@pytest.mark.skipif(CUDA, reason="checks the CPU-only error")
def test_triton_backend_needs_cuda() -> None:
    attributor = lrpc.compile(mlp().eval(), backend="triton")
    with pytest.raises(lrpc.LRPCError, match="needs a CUDA device"):
        attributor(torch.randn(2, 10))


@pytest.mark.slow
@needs_interpreter
def test_fused_program_under_inductor() -> None:
    """The fused program compiled as the triton backend compiles it (on CPU; the kernel ops stay opaque
    calls) equals eager."""
    from lrpc import backends

    torch.manual_seed(36)
    gm, fused, args = fused_program(Gate(), torch.randn(2, 5, 6))
    assert_same_outputs(gm, backends._compiled(fused), args)


@pytest.mark.slow
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_backend_matches_eager_on_cuda(dtype: torch.dtype) -> None:
    torch.manual_seed(37)
    model = Gate().to("cuda", dtype).eval()
    x = torch.randn(4, 7, 6, device="cuda", dtype=dtype)
    expected = lrpc.compile(model, backend="eager")(x).relevance
    actual = lrpc.compile(model, backend="triton")(x).relevance
    assert rel_err(actual.float(), expected.float()) < (1e-4 if dtype == torch.float32 else 5e-2)
