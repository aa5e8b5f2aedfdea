"""token_logprobs: Triton (interpreter) and torch paths against an fp64 log_softmax reference, fwd and bwd."""
import os
import subprocess
import sys

import pytest
import torch

from srpo_fast.kernels import token_logprobs


@pytest.fixture(params=["torch", "triton"])
def backend(request, monkeypatch):
    monkeypatch.setenv("SRPO_FAST_KERNELS", request.param)
    return request.param


def reference(logits: torch.Tensor, targets: torch.Tensor, temperature: float):
    """fp64 log_softmax + gather + entropy on the full logits, differentiated by autograd."""
    log_p = torch.log_softmax(logits.double() / temperature, dim=-1)
    p = log_p.exp()
    entropy = -torch.where(p > 0, p * log_p, torch.zeros_like(p)).sum(-1)
    return log_p.gather(-1, targets[:, None]).squeeze(-1), entropy


def run_both(logits, targets, temperature, seed=0):
    """Forward + backward of ours and of the reference under the same random upstream gradients."""
    gen = torch.Generator().manual_seed(seed)
    g_logp, g_ent = torch.randn(2, logits.shape[0], generator=gen, dtype=torch.float64)
    x = logits.detach().clone().requires_grad_()
    logp, ent = token_logprobs(x, targets, temperature)
    (logp.double() @ g_logp + ent.double() @ g_ent).backward()
    xr = logits.detach().double().requires_grad_()
    ref_logp, ref_ent = reference(xr, targets, temperature)
    (ref_logp @ g_logp + ref_ent @ g_ent).backward()
    return (logp, ent, x.grad), (ref_logp, ref_ent, xr.grad)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()


def targets_with_ends(n: int, vocab: int, gen: torch.Generator) -> torch.Tensor:
    targets = torch.randint(0, vocab, (n,), generator=gen)
    targets[0] = vocab - 1
    if n > 1:
        targets[1] = 0
    return targets


@pytest.mark.parametrize("n,vocab,temperature,seed", [(1, 7, 1.0, 0), (13, 1000, 0.7, 1), (6, 1537, 1.3, 2),
                                                      (9, 300, 1.0, 3)])
def test_fp32_matches_fp64_reference(backend, n, vocab, temperature, seed):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, vocab, generator=gen) * 4
    targets = targets_with_ends(n, vocab, gen)
    (logp, ent, grad), (ref_logp, ref_ent, ref_grad) = run_both(logits, targets, temperature, seed)
    assert logp.dtype == ent.dtype == torch.float32 and logp.shape == ent.shape == (n,)
    assert rel_err(logp, ref_logp) < 1e-5
    assert rel_err(ent, ref_ent) < 1e-5
    assert grad.dtype == torch.float32
    assert rel_err(grad, ref_grad) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_math_in_fp32(backend, dtype):
    gen = torch.Generator().manual_seed(5)
    logits = (torch.randn(11, 777, generator=gen) * 3).to(dtype)
    targets = targets_with_ends(11, 777, gen)
    (logp, ent, grad), (ref_logp, ref_ent, ref_grad) = run_both(logits, targets, 0.9)
    # the forward sees the same half-precision values as the reference, in fp32: fp32-level agreement
    assert logp.dtype == torch.float32 and rel_err(logp, ref_logp) < 1e-5 and rel_err(ent, ref_ent) < 1e-5
    # the gradient is stored in the input dtype: one rounding of that dtype
    assert grad.dtype == dtype
    assert rel_err(grad, ref_grad) < 1e-2


def test_peaked_rows_and_masked_vocab(backend):
    """-inf logits (a masked vocabulary) and near-one-hot rows: finite results, zero gradient on masked
    columns, and tiny entropies kept to a few % (lse - sum(p*z) in fp32 would give noise ~1e-6).
    Reference: the same rows without the masked columns."""
    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(5, 600, generator=gen)
    logits[:, 500:] = float("-inf")
    logits[0, 3] = 40.0  # almost one-hot: entropy ~1e-13, lost to cancellation if computed as lse - sum(p*z)
    targets = torch.tensor([3, 0, 499, 17, 250])
    x = logits.clone().requires_grad_()
    logp, ent = token_logprobs(x, targets)
    (logp.sum() + ent.sum()).backward()
    xr = logits[:, :500].double().requires_grad_()
    ref_logp, ref_ent = reference(xr, targets, 1.0)
    (ref_logp.sum() + ref_ent.sum()).backward()
    assert torch.isfinite(x.grad).all() and (x.grad[:, 500:] == 0).all()
    assert rel_err(logp, ref_logp) < 1e-5 and rel_err(ent, ref_ent) < 1e-5
    assert 0 < ref_ent[0] < 1e-10 and abs(ent[0].item() - ref_ent[0].item()) <= 5e-2 * ref_ent[0].item()
    assert rel_err(x.grad[:, :500], xr.grad) < 1e-5


@pytest.mark.parametrize("vocab", [512, 771])  # whole 256-wide blocks only / two blocks and a ragged tail
@pytest.mark.parametrize("grads", ["logp", "entropy", "both"])
def test_masked_blocks_temperature_and_partial_gradients(backend, vocab, grads):
    """-inf logits across a whole leading block, inside blocks and in the tail, temperature != 1, and gradients
    through one output or both: fwd and bwd match fp64 on the unmasked columns, masked ones get exactly 0."""
    gen = torch.Generator().manual_seed(vocab)
    logits = torch.randn(7, vocab, generator=gen) * 5
    masked = torch.zeros(7, vocab, dtype=torch.bool)
    masked[0, :300] = True  # row 0: the first block entirely -inf (the running max starts there)
    masked[1:, 256:263] = True
    masked[2, -5:] = True
    masked[3, ::3] = True
    logits[masked] = float("-inf")
    targets = torch.tensor([300, 0, vocab - 6, 1, 299, vocab - 1, 17])
    g_logp, g_ent = torch.randn(2, 7, generator=gen, dtype=torch.float64)
    x = logits.clone().requires_grad_()
    logp, ent = token_logprobs(x, targets, 0.6)
    # fp64 reference, its gradient written out (autograd through p log p gives nan at the -inf columns)
    log_p = torch.log_softmax(logits.double() / 0.6, dim=-1)
    p = log_p.exp()
    plogp = torch.where(masked, 0.0, p * log_p)
    ref_ent = -plogp.sum(-1)
    ref_logp = log_p.gather(-1, targets[:, None]).squeeze(-1)
    g_logp = g_logp if grads != "entropy" else torch.zeros_like(g_logp)
    g_ent = g_ent if grads != "logp" else torch.zeros_like(g_ent)
    onehot = torch.nn.functional.one_hot(targets, vocab).double()
    ref_grad = (g_logp[:, None] * (onehot - p) - g_ent[:, None] * (plogp + p * ref_ent[:, None])) / 0.6
    loss = {"logp": lambda: logp.double() @ g_logp, "entropy": lambda: ent.double() @ g_ent,
            "both": lambda: logp.double() @ g_logp + ent.double() @ g_ent}[grads]
    loss().backward()
    assert torch.isfinite(logp).all() and torch.isfinite(ent).all() and torch.isfinite(x.grad).all()
    assert rel_err(logp, ref_logp) < 1e-5 and rel_err(ent, ref_ent) < 1e-5
    assert (x.grad[masked] == 0).all()
    assert rel_err(x.grad, ref_grad) < 1e-5


@pytest.mark.parametrize("output", ["logp", "entropy", "sum"])
def test_gradcheck_fp64(backend, output):
    gen = torch.Generator().manual_seed(11)
    logits = torch.randn(3, 37, generator=gen, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([0, 36, 5])

    def fn(x):
        logp, ent = token_logprobs(x, targets, 0.7)
        return {"logp": logp, "entropy": ent, "sum": logp + ent}[output]

    assert fn(logits).dtype == torch.float64
    # fast mode checks random projections of the Jacobian (a wrong gradient still fails) with a few evaluations:
    # the interpreter runs one program per row, so the full Jacobian would cost seconds per row
    assert torch.autograd.gradcheck(fn, (logits,), eps=1e-6, atol=1e-6, fast_mode=True)


def test_return_entropy_false_returns_tensor(backend):
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(4, 300, generator=gen, requires_grad=True)
    targets = torch.tensor([1, 2, 299, 0])
    logp = token_logprobs(logits, targets.int(), 1.0, return_entropy=False)  # int32 targets are accepted too
    assert isinstance(logp, torch.Tensor) and logp.shape == (4,)
    logp.sum().backward()
    xr = logits.detach().double().requires_grad_()
    ref_logp, _ = reference(xr, targets, 1.0)
    ref_logp.sum().backward()
    assert rel_err(logp, ref_logp) < 1e-5 and rel_err(logits.grad, xr.grad) < 1e-5


def test_strided_inputs(backend):
    """A row-strided view is read in place; a view with a non-unit last stride is copied first."""
    gen = torch.Generator().manual_seed(3)
    wide = torch.randn(6, 520, generator=gen)
    targets = torch.tensor([0, 499, 7, 8, 9, 10])
    row_strided = wide[:, :500]
    transposed = wide[:, :500].t().contiguous().t()
    assert transposed.stride(-1) != 1
    ref_logp, ref_ent = reference(wide[:, :500], targets, 1.0)
    for view in (row_strided, transposed):
        logp, ent = token_logprobs(view, targets)
        assert rel_err(logp, ref_logp) < 1e-5 and rel_err(ent, ref_ent) < 1e-5


def test_bad_inputs_raise_clear_errors(backend):
    logits = torch.randn(4, 10)
    targets = torch.tensor([0, 1, 2, 3])
    with pytest.raises(ValueError, match="logits must be 2-D"):
        token_logprobs(logits[None], targets)
    with pytest.raises(ValueError, match="targets must be 1-D"):
        token_logprobs(logits, targets[None])
    with pytest.raises(TypeError, match="logits must be a floating-point"):
        token_logprobs(logits.long(), targets)
    with pytest.raises(TypeError, match="targets must be an int32 or int64"):
        token_logprobs(logits, targets.float())
    with pytest.raises(ValueError, match="targets has 3 rows"):
        token_logprobs(logits, targets[:3])
    with pytest.raises(ValueError, match="non-empty"):
        token_logprobs(logits[:0], targets[:0])
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 10\); found 10"):
        token_logprobs(logits, torch.tensor([0, 1, 10, 3]))
    with pytest.raises(ValueError, match="found -1"):
        token_logprobs(logits, torch.tensor([0, -1, 2, 3]))
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(logits, targets, temperature=0.0)
    with pytest.raises(ValueError, match="targets is on meta"):
        token_logprobs(logits, targets.to("meta"))


def test_backend_argument_and_env(monkeypatch):
    """backend= beats SRPO_FAST_KERNELS; a bad name is a clear error; Triton forced on CPU without the
    interpreter says what is missing (the full rule table: test_kernels_dispatch.py)."""
    logits, targets = torch.randn(2, 5), torch.tensor([0, 1])
    monkeypatch.setenv("SRPO_FAST_KERNELS", "cuda-please")
    with pytest.raises(ValueError, match="SRPO_FAST_KERNELS"):
        token_logprobs(logits, targets)
    assert torch.isfinite(token_logprobs(logits, targets, backend="torch")[0]).all()
    with pytest.raises(ValueError, match="backend must be one of"):
        token_logprobs(logits, targets, backend="cuda")
    monkeypatch.setenv("SRPO_FAST_KERNELS", "torch")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        token_logprobs(logits, targets, backend="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_reference(dtype):
    gen = torch.Generator().manual_seed(0)
    n, vocab = 37, 152_064
    logits = (torch.randn(n, vocab, generator=gen) * 3).to(dtype)
    targets = targets_with_ends(n, vocab, gen)
    (logp, ent, grad), (ref_logp, ref_ent, ref_grad) = run_both(logits.cuda(), targets.cuda(), 0.8)
    assert rel_err(logp.cpu(), ref_logp.cpu()) < 1e-5 and rel_err(ent.cpu(), ref_ent.cpu()) < 1e-5
    assert rel_err(grad.cpu(), ref_grad.cpu()) < (1e-5 if dtype == torch.float32 else 1e-2)


def test_import_and_run_without_triton():
    """`import srpo_fast.kernels` must work where triton is missing; every op then runs its torch path."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from srpo_fast.kernels import token_logprobs, linear_token_logprobs, grpo_loss\n"
        "from srpo_fast.kernels._dispatch import HAS_TRITON\n"
        "assert not HAS_TRITON\n"
        "lp, ent = token_logprobs(torch.randn(3, 11), torch.tensor([0, 5, 10]))\n"
        "lp2, _ = linear_token_logprobs(torch.randn(3, 4), torch.randn(11, 4), torch.tensor([0, 5, 10]))\n"
        "loss, m = grpo_loss(lp, lp.detach(), torch.ones(1), torch.ones(3), torch.tensor([0, 3]))\n"
        "print('ok', torch.isfinite(lp2).all().item(), float(loss))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "SRPO_FAST_KERNELS": ""})
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok True")
