"""models/attention.py + models/forward.py: varlen attention vs SDPA, and packed rows vs each sequence alone
(transformers' own SDPA path) for Qwen2, Qwen2.5-VL and Qwen2-VL — logits, log-probs, entropies and gradients of
every parameter; no [L, L] mask and no [L, V] logits for a packed row; the vision sync and dummy micro-batches."""
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from srpo_fast.data.packing import MRopeIndexer, Sample, dummy_batch, pack_samples
from srpo_fast.models import (load_policy, output_head, packed_hidden_states, packed_token_logprobs,
                              register_varlen_attention, varlen_backend)
from srpo_fast.models.attention import cu_seqlens_from_position_ids, varlen_attention_forward

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from largest_tensor import LargestTensor  # noqa: E402
from test_loading import build_tiny_qwen2_vl, synthetic_vl_sample  # noqa: E402

# fp64 runs must agree to rounding (observed <= 3e-13): the packed path is exact. fp32 runs: log-probs, entropies
# and logits to 1e-5 relative to their magnitude (packed and single-sequence matmuls have different shapes, so their
# rounding differs by a few ulps; observed <= 7.5e-6); gradients, sums over all tokens/patches with cancellation,
# to 5e-5 in relative L2 norm (observed up to 1.9e-5 on the std-0.3 random VL models).
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
GRAD_TOL_FP32 = 5e-5


def close(actual, expected, dtype, what, norm=False, tol=None):
    """max |diff| <= tol (fp64) or <= tol * max(1, max |expected|) (fp32); norm=True (fp32 gradients, sums over
    many tokens and patches): ||diff|| <= tol * ||expected||."""
    diff = actual.double() - expected.double()
    if dtype == torch.float32 and norm:
        err, scale = diff.norm().item(), expected.double().norm().item()
    else:
        err = diff.abs().max().item()
        scale = 1.0 if dtype == torch.float64 else max(1.0, expected.abs().max().item())
    tol = TOL[dtype] if tol is None else tol
    assert err <= tol * scale, f"{what}: |diff| {err:.3e} (scale {scale:.2f})"


class Module(torch.nn.Module):
    """Stands in for a transformers attention module: the attributes attention functions read."""
    is_causal = True
    num_key_value_groups = 2


def sdpa_alone(q, k, v, causal):
    rep = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1),
                                          is_causal=causal)


@pytest.mark.parametrize("causal", [True, False])
def test_varlen_attention_equals_sdpa_per_sequence(causal):
    gen = torch.Generator().manual_seed(0)
    lens = [5, 1, 9, 3]
    total = sum(lens)
    q, k, v = (torch.randn(1, h, total, 8, generator=gen, dtype=torch.float64, requires_grad=True)
               for h in (4, 2, 2))
    cu = torch.tensor([0, 5, 6, 15, 18], dtype=torch.int32)
    module = Module()
    out, _ = varlen_attention_forward(module, q, k, v, None, scaling=8 ** -0.5, is_causal=causal, cu_seq_lens_q=cu,
                                      cu_seq_lens_k=cu, max_length_q=9, max_length_k=9)
    assert out.shape == (1, total, 4, 8)
    g = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    grads = torch.autograd.grad(out, (q, k, v), g)
    qr, kr, vr = (t.detach().clone().requires_grad_() for t in (q, k, v))
    ref = torch.cat([sdpa_alone(qr[:, :, s:e], kr[:, :, s:e], vr[:, :, s:e], causal)
                     for s, e in zip(cu[:-1].tolist(), cu[1:].tolist())], dim=2).transpose(1, 2)
    ref_grads = torch.autograd.grad(ref, (qr, kr, vr), g)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    # the same boundaries read from restarting position ids, when no cu_seq_lens is passed
    pos = torch.cat([torch.arange(n) for n in lens])[None]
    assert torch.equal(cu_seqlens_from_position_ids(pos), cu)
    from_pos, _ = varlen_attention_forward(module, q, k, v, None, is_causal=causal, position_ids=pos)
    torch.testing.assert_close(from_pos, ref, rtol=0, atol=1e-12)


def test_varlen_attention_single_sequences_and_fallbacks():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    gen = torch.Generator().manual_seed(1)
    module = Module()
    q, k, v = (torch.randn(3, h, 7, 8, generator=gen, dtype=torch.float64) for h in (4, 2, 2))
    ours, _ = varlen_attention_forward(module, q, k, v, None, scaling=0.3)  # 3 rows, one sequence each
    ref, _ = sdpa_attention_forward(module, q, k, v, None, scaling=0.3)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)
    # a padding mask or a KV cache (fewer queries than keys) goes to transformers' SDPA path unchanged
    mask = torch.ones(3, 1, 7, 7, dtype=torch.bool).tril()
    mask[1, :, :, :2] = False
    ours, _ = varlen_attention_forward(module, q, k, v, mask)
    ref, _ = sdpa_attention_forward(module, q, k, v, mask)
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    ours, _ = varlen_attention_forward(module, q[:, :, -1:], k, v, None)
    ref, _ = sdpa_attention_forward(module, q[:, :, -1:], k, v, None)
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    with pytest.raises(ValueError, match="sliding"):
        varlen_attention_forward(module, q, k, v, None, sliding_window=4)
    with pytest.raises(ValueError, match="one packed row"):
        varlen_attention_forward(module, q, k, v, None, cu_seq_lens_q=torch.tensor([0, 7], dtype=torch.int32))


def test_backend_choice(monkeypatch):
    assert varlen_backend(torch.device("cpu"), torch.float32) == "sdpa_segments"
    assert varlen_backend(torch.device("cpu"), torch.bfloat16) == "sdpa_segments"
    monkeypatch.setenv("SRPO_FAST_ATTN", "flash_attn")
    with pytest.raises(RuntimeError, match="CUDA"):
        varlen_backend(torch.device("cpu"), torch.bfloat16)
    monkeypatch.setenv("SRPO_FAST_ATTN", "magic")
    with pytest.raises(ValueError, match="SRPO_FAST_ATTN"):
        varlen_backend(torch.device("cpu"), torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["flash_attn", "torch_varlen"])
def test_cuda_varlen_backends_match_segments(backend, monkeypatch):
    from srpo_fast.models.attention import has_flash_attn

    if backend == "flash_attn" and not has_flash_attn():
        pytest.skip("flash-attn 2 not installed")
    gen = torch.Generator(device="cuda").manual_seed(0)
    lens = [300, 17, 1, 700]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    q, k, v = (torch.randn(1, h, sum(lens), 128, generator=gen, device="cuda", dtype=torch.bfloat16,
                           requires_grad=True) for h in (16, 2, 2))
    outs = []
    for name in (backend, "sdpa_segments"):
        monkeypatch.setenv("SRPO_FAST_ATTN", name)
        out, _ = varlen_attention_forward(Module(), q, k, v, None, scaling=128 ** -0.5, cu_seq_lens_q=cu,
                                          cu_seq_lens_k=cu, max_length_q=700, max_length_k=700)
        outs.append((out.float(), *torch.autograd.grad(out.float().square().sum(), (q, k, v))))
    for a, b in zip(*outs):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)


def reference_logprobs(model, sample: Sample, temperature=1.0):
    """Transformers' unpacked forward of one sample (attention mask-free, B=1): fp64 log-probs/entropy of its
    response tokens and the logits that produced them."""
    ids = torch.cat([sample.prompt_ids, sample.response_ids])[None]
    extra = {}
    if sample.has_images:
        mm = torch.cat([sample.mm_token_type_ids, torch.zeros(sample.response_ids.numel(), dtype=torch.long)])
        extra = dict(pixel_values=sample.pixel_values, image_grid_thw=sample.image_grid_thw,
                     mm_token_type_ids=mm[None])
    logits = model(input_ids=ids, use_cache=False, **extra).logits[0]
    p = sample.prompt_ids.numel()
    scored = logits[p - 1:-1]
    log_p = torch.log_softmax(scored.double() / temperature, -1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    return log_p.gather(-1, sample.response_ids[:, None])[:, 0], entropy, logits


def text_samples(gen):
    return [Sample(torch.randint(10, 1000, (n,), generator=gen), torch.randint(10, 1100, (m,), generator=gen))
            for n, m in [(6, 5), (1, 9), (12, 3), (4, 1), (8, 7)]]


def vl_samples(config, gen):
    specs = [([(1, 4, 6)], 3, 2, 5), ([], 5, 0, 4), ([(1, 4, 4), (1, 6, 4)], 2, 3, 6), ([(1, 2, 2)], 0, 4, 3),
             ([], 2, 0, 2)]
    return [synthetic_vl_sample(config, gen, grids, before, after, resp) for grids, before, after, resp in specs]


@pytest.fixture(scope="module")
def model_dirs(tiny_kit, tmp_path_factory):
    return {"qwen2": tiny_kit["text"], "qwen2_5_vl": tiny_kit["vl"],
            "qwen2_vl": build_tiny_qwen2_vl(tmp_path_factory.mktemp("qwen2_vl_fwd"), tiny_kit["vl"])}


@pytest.mark.parametrize("kind", ["qwen2", "qwen2_5_vl", "qwen2_vl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_packed_equals_one_by_one(model_dirs, kind, dtype):
    packed_model = load_policy(model_dirs[kind], dtype=dtype, freeze_vision=False)
    ref_model = load_policy(model_dirs[kind], dtype=dtype, freeze_vision=False, attn_implementation="sdpa")
    gen = torch.Generator().manual_seed(3)
    vl = kind != "qwen2"
    samples = vl_samples(packed_model.config, gen) if vl else text_samples(gen)
    if vl:
        assert sum(s.has_images for s in samples) >= 3
        samples = [Sample(s.prompt_ids, s.response_ids, pixel_values=s.pixel_values.to(dtype),
                          image_grid_thw=s.image_grid_thw, mm_token_type_ids=s.mm_token_type_ids)
                   if s.has_images else s for s in samples]
    batch = pack_samples(samples, rope_index=MRopeIndexer(packed_model) if vl else None)
    temperature = 0.7
    logp, entropy = packed_token_logprobs(packed_model, batch, temperature=temperature, return_entropy=True)
    assert logp.shape == entropy.shape == (batch.num_response_tokens,)
    weights = torch.randn(batch.num_response_tokens, generator=gen, dtype=torch.float64)
    ((logp.double() * weights).sum() + 0.3 * entropy.double().sum()).backward()

    refs = [reference_logprobs(ref_model, s, temperature) for s in samples]
    ref_logp = torch.cat([r[0] for r in refs])
    ref_entropy = torch.cat([r[1] for r in refs])
    ((ref_logp * weights).sum() + 0.3 * ref_entropy.sum()).backward()
    close(logp, ref_logp, dtype, "log-probs")
    close(entropy, ref_entropy, dtype, "entropies")
    with torch.no_grad():  # the full per-token logits of the packed row, sequence by sequence
        hidden = packed_hidden_states(packed_model, batch)
        logits = hidden @ output_head(packed_model)[0].T
    close(logits, torch.cat([r[2] for r in refs]).detach(), dtype, "logits")
    ref_params = dict(ref_model.named_parameters())
    compared = 0
    for name, param in packed_model.named_parameters():
        assert (param.grad is None) == (ref_params[name].grad is None), name
        if param.grad is not None:
            close(param.grad, ref_params[name].grad, dtype, f"grad {name}", norm=True,
                  tol=GRAD_TOL_FP32 if dtype == torch.float32 else None)
            compared += 1
    assert compared == sum(1 for _ in packed_model.parameters())  # every parameter, vision tower included


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["qwen2", "qwen2_5_vl"])
def test_packed_equals_one_by_one_cuda_bf16(model_dirs, kind):
    """The CUDA varlen kernels in the real model (bf16): leaking attention across sequences would move log-probs by
    nats; kernel-to-kernel bf16 rounding moves them by a few hundredths."""
    device = torch.device("cuda")
    packed_model = load_policy(model_dirs[kind], dtype=torch.bfloat16).to(device)
    ref_model = load_policy(model_dirs[kind], dtype=torch.bfloat16, attn_implementation="sdpa").to(device)
    gen = torch.Generator().manual_seed(3)
    samples = vl_samples(packed_model.config, gen) if kind != "qwen2" else text_samples(gen)
    batch = pack_samples(samples, rope_index=MRopeIndexer(packed_model) if kind != "qwen2" else None).to(device)
    with torch.no_grad():
        logp = packed_token_logprobs(packed_model, batch)
        refs = []
        for s in samples:
            ids = torch.cat([s.prompt_ids, s.response_ids])[None].to(device)
            extra = {}
            if s.has_images:
                mm = torch.cat([s.mm_token_type_ids, torch.zeros(s.response_ids.numel(), dtype=torch.long)])
                extra = dict(pixel_values=s.pixel_values.to(device, torch.bfloat16),
                             image_grid_thw=s.image_grid_thw.to(device), mm_token_type_ids=mm[None].to(device))
            logits = ref_model(input_ids=ids, use_cache=False, **extra).logits[0].float()
            p = s.prompt_ids.numel()
            refs.append(torch.log_softmax(logits[p - 1:-1], -1).gather(-1, s.response_ids[:, None].to(device))[:, 0])
    ref = torch.cat(refs)
    assert (logp - ref).abs().max().item() <= 0.02 * max(1.0, ref.abs().max().item())


def test_packed_row_builds_no_square_mask_and_no_logits(tiny_kit):
    model = load_policy(tiny_kit["text"])
    gen = torch.Generator().manual_seed(5)
    samples = [Sample(torch.randint(10, 1000, (60,), generator=gen), torch.randint(10, 1000, (20,), generator=gen))
               for _ in range(12)]
    batch = pack_samples(samples)
    length, responses, vocab = batch.num_tokens, batch.num_response_tokens, 1152
    with LargestTensor() as spy:
        packed_hidden_states(model, batch).square().sum().backward()
    # the largest legitimate tensor is an MLP activation [L, 256]; an [L, L] mask or [L, V] logits are larger
    assert spy.numel <= length * 256 < length * length
    with LargestTensor() as spy:
        packed_token_logprobs(model, batch).sum().backward()
    # log-probs add the kernel's [R, chunk] logit blocks (chunk <= V) over response rows only, never [L, V]
    assert spy.numel <= max(length * 256, responses * vocab) < length * vocab
    with LargestTensor() as spy_sdpa:  # transformers' own SDPA path on the same row does build the square mask
        sdpa = load_policy(tiny_kit["text"], attn_implementation="sdpa")
        packed_hidden_states(sdpa, batch)
    assert spy_sdpa.numel >= length * length


@pytest.mark.parametrize("kind", ["qwen2_5_vl", "qwen2_vl"])
def test_vision_sync_adds_nothing_but_reaches_the_tower(model_dirs, kind):
    model = load_policy(model_dirs[kind])  # tower frozen, projector trainable
    gen = torch.Generator().manual_seed(7)
    batch = pack_samples(text_samples(gen)[:3], rope_index=MRopeIndexer(model))
    plain = packed_token_logprobs(model, batch, sync_vision=False)
    plain.sum().backward()
    assert all(p.grad is None for p in model.model.visual.parameters())
    model.zero_grad(set_to_none=True)
    synced = packed_token_logprobs(model, batch, sync_vision=True)
    torch.testing.assert_close(synced, plain, rtol=0, atol=0)
    synced.sum().backward()
    merger = list(model.model.visual.merger.parameters())
    assert merger and all(p.grad is not None and not p.grad.any() for p in merger)


@pytest.mark.parametrize("kind", ["text", "vl"])
def test_dummy_microbatch_runs_with_zero_loss(tiny_kit, kind):
    model = load_policy(tiny_kit[kind], freeze_vision=False)
    batch = dummy_batch(vision_language=kind == "vl")
    logp = packed_token_logprobs(model, batch, sync_vision=True)
    ((logp * batch.loss_mask).sum()).backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and not g.any() for g in grads[:3])
    assert all(g is None or not g.any() for g in grads)


def test_model_batch_mismatch_errors(tiny_kit):
    text_model = load_policy(tiny_kit["text"])
    with pytest.raises(ValueError, match="text model needs"):
        packed_token_logprobs(text_model, dummy_batch(vision_language=True))
    vl_model = load_policy(tiny_kit["vl"])
    with pytest.raises(ValueError, match="MRopeIndexer"):
        packed_token_logprobs(vl_model, dummy_batch(vision_language=False))


@pytest.mark.parametrize("q_len", [7, 1])
def test_masked_gqa_path_equals_transformers_sdpa(q_len):
    """Padded batches and cache steps on CPU: SDPA runs the grouped heads itself (no K/V copy per group) and gives
    transformers' SDPA result (which repeats K/V) for a left-padded prefill (q_len 7) and a decode step (q_len 1)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, q_len, 8, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(2, 2, 7, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    mask = torch.ones(2, 1, q_len, 7, dtype=torch.bool).tril(7 - q_len)
    mask[1, :, :, :3] = False  # row 1 left-padded by 3
    mask[1, :, :, 3] = True  # (its padded query positions attend to the first real token, as transformers does)
    ours, _ = varlen_attention_forward(Module().eval(), q, k, v, mask, scaling=0.3)
    ref, _ = sdpa_attention_forward(Module().eval(), q, k, v, mask, scaling=0.3)
    close(ours, ref, torch.float64, "masked GQA attention")


def test_padded_generation_with_varlen_model_matches_sdpa(tiny_kit):
    """The policy can also serve HF generate (left padding, KV cache): those calls take the masked SDPA path."""
    register_varlen_attention()
    gen = torch.Generator().manual_seed(11)
    ids = torch.randint(10, 1000, (2, 7), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    outs = []
    for attn in ("srpo_varlen", "sdpa"):
        model = load_policy(tiny_kit["text"], attn_implementation=attn).eval()
        outs.append(model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False,
                                   use_cache=True))
    assert torch.equal(outs[0], outs[1])


FSDP_WORKER = '''
import json, sys
import torch
import torch.distributed as dist
sys.path.insert(0, sys.argv[2])
from test_loading import synthetic_vl_sample
from srpo_fast.data.packing import MRopeIndexer, dummy_batch, pack_samples
from srpo_fast.models import load_policy, packed_hidden_states, packed_token_logprobs, shard_model
from srpo_fast.utils.distributed import init_distributed

init_distributed()
rank = dist.get_rank()
model = load_policy(sys.argv[1], freeze_vision=True, freeze_projector=False, gradient_checkpointing=True)
gen = torch.Generator().manual_seed(0)
samples = [synthetic_vl_sample(model.config, gen, grids, 3, 2, n)
           for grids, n in [([(1, 4, 4)], 6), ([], 5), ([], 4)]]
indexer = MRopeIndexer(model)
batches = [pack_samples(samples[:1], rope_index=indexer), pack_samples(samples[1:], rope_index=indexer)]
total = sum(b.num_response_tokens for b in batches)

def reference(parts):
    model.zero_grad(set_to_none=True)
    for b in parts:
        (packed_token_logprobs(model, b, sync_vision=False).sum() / total).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

ref_both, ref_first = reference(batches), reference(batches[:1])
model.zero_grad(set_to_none=True)
shard_model(model)
result = {}
# rank 0: a micro-batch with an image; rank 1: text only (the vision tower must still run there) or a dummy
for phase, mine, ref in [("text_only", batches[rank], ref_both),
                         ("dummy", batches[0] if rank == 0 else dummy_batch(vision_language=True), ref_first)]:
    logp = packed_token_logprobs(model, mine)
    ((logp * mine.loss_mask).sum() / total).backward()
    diffs, names = [], set()
    for n, p in model.named_parameters():
        if p.grad is not None:
            names.add(n)
            diffs.append((p.grad.full_tensor() - ref[n]).abs().max().item())
    result[phase] = {"max_diff": max(diffs), "names_equal": names == set(ref),
                     "merger_grads": any("merger" in n for n in names)}
    model.zero_grad(set_to_none=True)
hidden = packed_hidden_states(model, batches[rank])
hidden.float().square().mean().backward()
result["hidden_backward_ok"] = all(p.grad is not None for n, p in model.named_parameters()
                                   if p.requires_grad and "lm_head" not in n)
if rank == 0:
    with open(sys.argv[3], "w") as f:
        json.dump(result, f)
dist.destroy_process_group()
'''


@pytest.mark.dist
def test_packed_forward_under_fsdp2_two_ranks(tiny_kit, tmp_path):
    """FSDP2 over 2 ranks (gloo): log-prob gradients equal one process holding both micro-batches, with the LM head
    used inside the root's forward; a rank without images (or with a dummy micro-batch) keeps the vision tower's
    collectives in step, so nothing hangs and the projector's gradients are reduced everywhere."""
    import json

    from dist.launch import torchrun

    script, out = tmp_path / "worker.py", tmp_path / "result.json"
    script.write_text(FSDP_WORKER)
    proc = torchrun(script, [str(tiny_kit["vl"]), str(Path(__file__).resolve().parent), str(out)], timeout_s=240)
    assert proc.returncode == 0 and out.exists(), proc.stdout[-2000:] + proc.stderr[-4000:]
    result = json.loads(out.read_text())
    for phase in ("text_only", "dummy"):
        assert result[phase]["names_equal"] and result[phase]["merger_grads"], result
        assert result[phase]["max_diff"] <= 1e-6, result
    assert result["hidden_backward_ok"]


@pytest.mark.gpu
def test_vision_sync_on_a_text_batch_under_cpu_offload_cuda(model_dirs):
    """FSDP2 CPU offload keeps the vision tower's sharded parameters on the CPU while it runs on the GPU: the dummy
    image must be built on the embeddings' device, or a text-only micro-batch of a VL run fails with a device
    mismatch."""
    import torch.distributed as dist

    from srpo_fast.models import shard_model
    from srpo_fast.utils import distributed as du

    created = not dist.is_initialized()
    du.init_distributed()
    try:
        model = shard_model(load_policy(model_dirs["qwen2_5_vl"], dtype=torch.float32, freeze_vision=False),
                            param_dtype=torch.bfloat16, cpu_offload=True)
        assert model.model.visual.patch_embed.proj.weight.device.type == "cpu"
        batch = pack_samples(text_samples(torch.Generator().manual_seed(0)),
                             rope_index=MRopeIndexer(model)).to(torch.device("cuda"))
        logp = packed_token_logprobs(model, batch, sync_vision=True)
        logp.sum().backward()
        assert logp.device.type == "cuda" and torch.isfinite(logp).all()
        grad = model.model.visual.patch_embed.proj.weight.grad
        assert grad is not None and grad.to_local().abs().max().item() == 0.0  # reached, with zero gradient
    finally:
        if created:
            du.cleanup()


def test_flash_attn_detection_ignores_the_flash_attn_4_package(tmp_path, monkeypatch):
    """flash-attn-4 installs only the namespace package flash_attn.cute (another API): find_spec("flash_attn")
    finds it, but the packed path must not pick flash_attn for it."""
    import importlib.util

    from srpo_fast.models.attention import has_flash_attn

    (tmp_path / "flash_attn" / "cute").mkdir(parents=True)  # the layout flash-attn-4's wheel installs
    (tmp_path / "flash_attn" / "cute" / "__init__.py").write_text("def flash_attn_varlen_func(*a, **k):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [m for m in sys.modules if m == "flash_attn" or m.startswith("flash_attn.")]:
        monkeypatch.delitem(sys.modules, name)
    has_flash_attn.cache_clear()
    try:
        assert importlib.util.find_spec("flash_attn") is not None
        assert not has_flash_attn()
        assert varlen_backend(torch.device("cpu"), torch.bfloat16) == "sdpa_segments"
    finally:
        has_flash_attn.cache_clear()
        for name in [m for m in sys.modules if m == "flash_attn" or m.startswith("flash_attn.")]:
            sys.modules.pop(name)


def test_vision_tower_varlen_attention_equals_sdpa(model_dirs, monkeypatch):
    """use_varlen_vision_attention: the tower's attention gets each layer's cu_seqlens in one call (windows and
    images as segments) instead of transformers' per-window split, with the same output."""
    from srpo_fast.models import attention
    from srpo_fast.models.attention import use_varlen_vision_attention

    varlen = load_policy(model_dirs["qwen2_5_vl"], dtype=torch.float64)
    sdpa = load_policy(model_dirs["qwen2_5_vl"], dtype=torch.float64)
    assert use_varlen_vision_attention(varlen) and not use_varlen_vision_attention(
        load_policy(model_dirs["qwen2"], dtype=torch.float64))
    segments = []
    real = attention._segments_sdpa
    monkeypatch.setattr(attention, "_segments_sdpa", lambda q, k, v, cu, *a: segments.append(cu.numel() - 1) or
                        real(q, k, v, cu, *a))
    grid = torch.tensor([[1, 8, 12], [1, 4, 4]])
    proj = varlen.model.visual.patch_embed.proj
    pixels = torch.randn(int(grid.prod(-1).sum()), proj.in_channels * math.prod(proj.kernel_size),
                         generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    outs = []
    for model in (varlen, sdpa):
        out = model.model.visual(pixels, grid_thw=grid)
        outs.append(getattr(out, "pooler_output", out))
    assert len(segments) == varlen.config.vision_config.depth  # one call per block, not one per window
    assert max(segments) > 2  # the windowed block saw its windows as segments
    close(outs[0], outs[1], torch.float64, "vision tower output")
