"""The backend rules as a pure function (dtype, device type, requested backend, fp32 matmul precision,
interpreter), and what the live wrappers do with them: one warning per fallback, the torch path taken."""
import warnings

import pytest
import torch

from srpo_fast.kernels import _dispatch, linear_token_logprobs
from srpo_fast.kernels._dispatch import Choice, decide

BF16, F16, F32, F64 = torch.bfloat16, torch.float16, torch.float32, torch.float64
OPS = ("token_logprobs", "linear_token_logprobs", "grpo_loss")


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", [BF16, F16])
def test_half_precision_on_cuda_runs_triton(op, dtype):
    assert decide(op, dtype, "cuda") == Choice("triton")
    assert decide(op, dtype, "cpu") == Choice("torch")  # auto on CPU: the reference
    assert decide(op, dtype, "cuda", backend="torch") == Choice("torch")


@pytest.mark.parametrize("precision,expected", [
    ("highest", Choice("torch", fallback="x")), ("high", Choice("triton", "tf32")),
    ("medium", Choice("triton", "tf32")),
])
def test_fp32_gemm_uses_tf32_only_when_torch_allows_it(precision, expected):
    got = decide("linear_token_logprobs", F32, "cuda", fp32_precision=precision)
    assert (got.backend, got.precision) == (expected.backend, expected.precision)
    if expected.backend == "torch":
        assert "get_float32_matmul_precision() == 'highest'" in got.fallback
        # forcing Triton does not force FMA-only GEMMs: the same clear fallback
        assert decide("linear_token_logprobs", F32, "cuda", backend="triton").fallback == got.fallback
    # the streaming ops have no GEMM: fp32 runs Triton whatever the matmul precision
    for op in ("token_logprobs", "grpo_loss"):
        assert decide(op, F32, "cuda", fp32_precision=precision) == Choice("triton")


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("requested", [None, "triton"])
def test_fp64_and_exotic_dtypes_on_cuda_run_the_reference(op, requested):
    got = decide(op, F64, "cuda", backend=requested)
    assert got.backend == "torch" and "fp64" in got.fallback
    got = decide(op, torch.float8_e4m3fn, "cuda", backend=requested)
    assert got.backend == "torch" and "float8_e4m3fn" in got.fallback


def test_gemm_needs_an_arch_where_a_tile_fits():
    """fp32 (tf32) GEMM tiles need sm_90's shared memory; half-precision ones run from sm_80; older GPUs and
    the streaming ops' rules are unaffected."""
    high = dict(fp32_precision="high")
    assert decide("linear_token_logprobs", F32, "cuda", capability=(9, 0), **high) == Choice("triton", "tf32")
    got = decide("linear_token_logprobs", F32, "cuda", capability=(8, 0), backend="triton", **high)
    assert got.backend == "torch" and "sm_80" in got.fallback and "sm_90" in got.fallback
    assert decide("linear_token_logprobs", BF16, "cuda", capability=(8, 0)) == Choice("triton")
    assert decide("linear_token_logprobs", F16, "cuda", capability=(7, 5)).backend == "torch"
    assert decide("token_logprobs", F32, "cuda", capability=(8, 0)) == Choice("triton")


def test_interpreter_runs_every_dtype_in_triton_with_exact_dots():
    for dtype in (BF16, F16, F32, F64):
        got = decide("linear_token_logprobs", dtype, "cpu", env="triton", interpret=True)
        assert got == Choice("triton", "ieee" if dtype == F32 else None)
        assert decide("token_logprobs", dtype, "cpu", backend="triton", interpret=True) == Choice("triton")
    # interpreter on but nothing asked for Triton: CPU tensors keep the torch reference
    assert decide("token_logprobs", F32, "cpu", interpret=True) == Choice("torch")


def test_argument_beats_env_and_names_are_checked():
    assert decide("grpo_loss", F32, "cuda", backend="torch", env="triton") == Choice("torch")
    assert decide("grpo_loss", F32, "cuda", backend="auto", env="torch") == Choice("torch")
    assert decide("grpo_loss", F32, "cuda", backend="triton", env="torch") == Choice("triton")
    assert decide("grpo_loss", F32, "cuda", env=" Triton ") == Choice("triton")
    with pytest.raises(ValueError, match="backend must be one of"):
        decide("grpo_loss", F32, "cuda", backend="cuda")
    with pytest.raises(ValueError, match="SRPO_FAST_KERNELS must be one of"):
        decide("grpo_loss", F32, "cuda", env="fast")


def test_forced_triton_where_it_cannot_run_is_a_clear_error():
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1 for cpu tensors"):
        decide("token_logprobs", F32, "cpu", backend="triton")
    with pytest.raises(RuntimeError, match="triton is not installed"):
        decide("token_logprobs", BF16, "cuda", env="triton", has_triton=False)
    assert decide("token_logprobs", BF16, "cuda", has_triton=False) == Choice("torch")


def test_live_choice_warns_once_per_reason(monkeypatch):
    """choose() reads the live precision and env; the fp32-GEMM fallback warns once, then stays quiet."""
    monkeypatch.setattr(_dispatch, "_WARNED", set())
    monkeypatch.delenv("SRPO_FAST_KERNELS", raising=False)
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "highest")
    meta_tensor = torch.empty(0, device="meta")  # decide() sees only dtype and device type
    monkeypatch.setattr(_dispatch, "decide", lambda op, dtype, device_type, **kw: decide(
        op, dtype, "cuda", **{**kw, "has_triton": True}))
    with pytest.warns(RuntimeWarning, match="highest"):
        assert _dispatch.choose("linear_token_logprobs", meta_tensor).backend == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _dispatch.choose("linear_token_logprobs", meta_tensor).backend == "torch"


def test_public_ops_take_a_backend_argument():
    gen = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(5, 16, generator=gen), torch.randn(40, 16, generator=gen)
    targets = torch.randint(0, 40, (5,), generator=gen)
    ref = torch.log_softmax(hidden.double() @ weight.double().T, -1).gather(1, targets[:, None]).squeeze(1)
    logp = linear_token_logprobs(hidden, weight, targets, return_entropy=False, backend="torch")
    assert torch.allclose(logp.double(), ref, atol=1e-5)


def test_gemm_kernel_precision_agrees_with_the_decision(monkeypatch):
    """The GEMM launcher reads its fp32 dot precision from dot_precision(): the same as decide() chose."""
    for interpret, device in (("1", "cpu"), ("0", "cuda")):
        monkeypatch.setenv("TRITON_INTERPRET", interpret)
        for dtype in (BF16, F16, F32):
            chosen = decide("linear_token_logprobs", dtype, device, backend="triton", fp32_precision="high",
                            interpret=interpret == "1", capability=(9, 0) if device == "cuda" else None)
            assert chosen.backend == "triton" and _dispatch.dot_precision(dtype) == chosen.precision


def test_choose_backend_without_a_dtype(monkeypatch):
    monkeypatch.delenv("SRPO_FAST_KERNELS", raising=False)
    assert _dispatch.choose_backend(torch.device("cpu")) == "torch"
    assert _dispatch.choose_backend(torch.device("cpu"), backend="triton") == "triton"  # conftest: interpreter on
