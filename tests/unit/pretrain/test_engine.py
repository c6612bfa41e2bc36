"""The DeepSpeed engine: LR schedule, weight-decay groups, and ZeRO 0/1 against torch AdamW.

Single process. The first DeepSpeed engine of a machine JIT-builds DeepSpeed's shm
communication op (~30-50 s, cached afterwards under TORCH_EXTENSIONS_DIR).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from pretrain.config import OptimConfig
from pretrain.engine import build_engine, default_no_decay, lr_at_step, param_groups
from tests.support.models import gpt_batch, tiny_gpt
from tests.unit.pretrain.conftest import GRAD_ACCUM, plan

STEPS = 4
OPTIM = dict(lr=1e-3, min_lr=1e-4, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)
SCHEDULE = dict(lr=1e-3, min_lr=1e-4, warmup_steps=2, total_steps=STEPS)
GRAD_CLIP = 0.5  # below the tiny model's gradient norm (~1.7-2.4): clipping is active every step
# The same optimizer as a run config section: warmup 0.5 x 4 steps = SCHEDULE's 2.
OPTIM_CONFIG = OptimConfig(lr=1e-3, min_lr=1e-4, weight_decay=0.1, beta1=0.9, beta2=0.95, eps=1e-8,
                           grad_clip=GRAD_CLIP, warmup_fraction=0.5)



def test_lr_schedule_warmup_then_cosine_to_min_lr():
    peak, floor, total = 3e-4, 3e-5, 1000  # the paper: 1% warmup, decay to 10% of peak
    warmup = total // 100
    lrs = [lr_at_step(s, lr=peak, min_lr=floor, warmup_steps=warmup, total_steps=total) for s in range(total)]
    # Linear warmup: the first update is already non-zero, update `warmup` is the peak.
    for s in range(warmup):
        assert lrs[s] == pytest.approx(peak * (s + 1) / warmup, rel=1e-12)
    assert lrs[warmup - 1] == pytest.approx(peak)
    # Cosine: strictly decreasing, half-way at the midpoint, exactly min_lr at the last update.
    decay = lrs[warmup - 1 :]
    assert all(a > b for a, b in zip(decay, decay[1:]))
    mid = warmup - 1 + (total - warmup) // 2
    assert lrs[mid] == pytest.approx((peak + floor) / 2, rel=1e-9)
    assert lrs[-1] == pytest.approx(floor, rel=1e-12)
    # Past the end it stays at the floor.
    assert lr_at_step(total + 50, lr=peak, min_lr=floor, warmup_steps=warmup, total_steps=total) == pytest.approx(floor)
    # The formula at one point of the decay.
    s = 700
    progress = (s + 1 - warmup) / (total - warmup)
    assert lrs[s] == pytest.approx(floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress)))
    # No warmup: starts at the peak.
    assert lr_at_step(0, lr=peak, min_lr=floor, warmup_steps=0, total_steps=total) == pytest.approx(peak, rel=1e-5)


def test_weight_decay_groups_exempt_biases_and_norms(dist_ctx):
    model = tiny_gpt()
    groups = param_groups(model, weight_decay=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in groups[0]["params"]}
    exempt = {names[id(p)] for p in groups[1]["params"]}
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    assert "embedding.word_embeddings.weight" in decayed
    assert "decoder.layers.0.self_attention.linear_qkv.weight" in decayed
    assert "decoder.layers.0.input_layernorm.weight" in exempt
    assert "decoder.final_layernorm.bias" in exempt
    assert "decoder.layers.0.mlp.linear_fc1.bias" in exempt
    assert all(default_no_decay(n, p) == (n in exempt) for n, p in model.named_parameters())
    assert len(decayed) + len(exempt) == len(list(model.parameters()))


# ---------------------------------------------------------------- engine vs plain PyTorch
def _reference_training(model, batches):
    """Plain PyTorch: AdamW with the same groups and schedule, mean loss over micro-batches."""
    optimizer = torch.optim.AdamW(
        param_groups(model, OPTIM["weight_decay"]), lr=OPTIM["lr"], betas=OPTIM["betas"], eps=OPTIM["eps"]
    )
    losses, norms = [], []
    for step in range(STEPS):
        for group in optimizer.param_groups:
            group["lr"] = lr_at_step(step, **SCHEDULE)
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for micro in range(GRAD_ACCUM):
            tokens, positions, labels = batches[step][micro]
            loss = model(tokens, positions, None, labels=labels).mean()
            (loss / GRAD_ACCUM).backward()
            total += loss.item()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)))
        optimizer.step()
        losses.append(total / GRAD_ACCUM)
    return losses, norms


def _engine_training(engine, batches):
    losses, norms, lrs = [], [], []
    for step in range(STEPS):
        lrs.append(engine.get_lr()[0])  # the LR this optimizer step will use
        total = 0.0
        for micro in range(GRAD_ACCUM):
            tokens, positions, labels = batches[step][micro]
            loss = engine(tokens, positions, None, labels=labels).mean()
            engine.backward(loss)  # DeepSpeed divides by GRAD_ACCUM
            engine.step()  # optimizer only at the accumulation boundary
            total += loss.item()
        losses.append(total / GRAD_ACCUM)
        norms.append(float(engine.get_global_grad_norm()))
    return losses, norms, lrs


@pytest.mark.parametrize("zero_stage", [0, 1])
def test_engine_matches_plain_pytorch_adamw(dist_ctx, zero_stage):
    model = tiny_gpt()
    # GPTModel holds process groups, which copy.deepcopy cannot copy: a second
    # instance gets a deep copy of the first one's weights instead.
    reference = tiny_gpt()
    reference.load_state_dict(copy.deepcopy(model.state_dict()))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), reference.parameters()))
    batches = [[gpt_batch(100 * step + micro) for micro in range(GRAD_ACCUM)] for step in range(STEPS)]

    engine, scheduler = build_engine(
        model, plan=plan(zero_stage=zero_stage), groups=dist_ctx.groups, optim=OPTIM_CONFIG, total_steps=STEPS,
        bf16=False,
    )
    assert engine.gradient_accumulation_steps() == GRAD_ACCUM
    if zero_stage:
        # The reduction bucket holds at most the rank's gradients (DeepSpeed's default 5e8
        # elements would stage 2 GB of fp32 at every backward for this model's few thousand).
        assert engine.optimizer.reduce_bucket_size == sum(p.numel() for p in model.parameters()) < 5e8
    ds_losses, ds_norms, ds_lrs = _engine_training(engine, batches)
    ref_losses, ref_norms = _reference_training(reference, batches)

    assert min(ref_norms) > GRAD_CLIP  # clipping was active in every step
    assert ds_lrs == pytest.approx([lr_at_step(s, **SCHEDULE) for s in range(STEPS)], rel=1e-12)
    assert scheduler.get_last_lr()[0] == pytest.approx(SCHEDULE["min_lr"])  # stepped once per optimizer step
    assert ds_losses == pytest.approx(ref_losses, rel=1e-5)
    assert ds_norms == pytest.approx(ref_norms, rel=1e-5)
    assert ref_losses[-1] < ref_losses[0]
    trained = torch.cat([p.detach().flatten() for p in engine.module.parameters()])
    expected = torch.cat([q.detach().flatten() for q in reference.parameters()])
    assert ((trained - expected).norm() / expected.norm()).item() < 1e-5
    # Element-wise: 1e-5 relative, plus an absolute floor of 1e-6 (0.1% of one
    # update at lr=1e-3) for the attention key biases. Softmax is invariant to
    # them, so their gradient is pure round-off and Adam turns it into values of
    # ~5e-7 that differ between any two float implementations (measured: up to
    # 2.5e-7 apart here; every other parameter agrees to ~1e-7 relative).
    for (name, p), (_, q) in zip(engine.module.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
