"""MeSH buffer equations on hand-made tensors, and the paper's generalisation property."""

from __future__ import annotations

import math

import pytest
import torch

from mesh_model.config import ModelConfig
from mesh_model.recurrence import FixedRecurrence, MeshRecurrence
from tests.support.models import causal_inputs, tiny_model_config

HIDDEN = 8


def hand_config(loops: int = 2, slots: int = 3) -> ModelConfig:
    return ModelConfig(
        hidden_size=HIDDEN, num_attention_heads=1, vocab_size=16, seq_length=4,
        layer_split=f"0+1R{loops}+0", variant="mesh", buffer_slots=slots,
    )


def softmax(logits: list[float]) -> list[float]:
    exps = [math.exp(v) for v in logits]
    return [e / sum(exps) for e in exps]


def test_buffer_follows_the_equations_with_constant_routers():
    """Routers with zero weights: fixed, known weights; buffer checked slot by slot.

    Tolerance 1e-6: the router softmax runs in fp32 by design, the rest in fp64.
    """
    recurrence = MeshRecurrence(hand_config(loops=2, slots=3))
    biases = {  # (step, "write"/"read") -> logits over the 3 slots
        (0, "write"): [0.0, 2.0, -1.0], (0, "read"): [1.0, 1.0, 0.0],
        (1, "write"): [-1.0, 0.5, 3.0], (1, "read"): [0.0, 0.0, 2.0],
        (2, "write"): [2.0, 0.0, 0.0], (2, "read"): [0.5, -0.5, 1.5],
    }
    with torch.no_grad():
        for (step, kind), logits in biases.items():
            router = getattr(recurrence.routers, kind)[str(step)]
            router.weight.zero_()
            router.bias.copy_(torch.tensor(logits))

    s, b = 3, 2
    emb = torch.arange(s * b * HIDDEN, dtype=torch.float64).reshape(s, b, HIDDEN) / 10
    prelude = torch.cos(emb)
    core = lambda h: 2.0 * h + 1.0  # noqa: E731  a hand-checkable "core block"
    recurrence.double()
    trace: list = []
    out = recurrence(prelude, emb, core, trace=trace)

    # Hand computation, slot by slot, with python floats for the weights.
    buffer = [emb.clone(), torch.zeros_like(emb), torch.zeros_like(emb)]
    w = softmax(biases[(0, "write")])
    buffer = [buffer[k] + prelude * w[k] for k in range(3)]
    r = softmax(biases[(0, "read")])
    h = sum(buffer[k] * r[k] for k in range(3))
    expected = [(list(buffer), h)]
    for step in (1, 2):
        hm = core(h)
        w = softmax(biases[(step, "write")])
        buffer = [buffer[k] + hm * w[k] for k in range(3)]
        r = softmax(biases[(step, "read")])
        h = sum(buffer[k] * r[k] for k in range(3))
        expected.append((list(buffer), h))

    assert len(trace) == 3
    for record, (exp_buffer, exp_h) in zip(trace, expected):
        for k in range(3):
            torch.testing.assert_close(record["buffer"][k], exp_buffer[k], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(record["hidden"], exp_h, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out, expected[-1][1], rtol=1e-6, atol=1e-6)


def test_routers_are_queried_per_token_with_the_core_input():
    """Input-dependent routers: per-token softmax of Linear(h), queried with h(t), not hm."""
    torch.manual_seed(0)
    recurrence = MeshRecurrence(hand_config(loops=1, slots=4)).double()
    s, b = 2, 3
    emb = torch.randn(s, b, HIDDEN, dtype=torch.float64)
    prelude = torch.randn(s, b, HIDDEN, dtype=torch.float64)
    core = torch.tanh
    trace: list = []
    recurrence(prelude, emb, core, trace=trace)

    @torch.no_grad()
    def weights(router, query):
        out = torch.empty(s, b, 4, dtype=torch.float64)
        for i in range(s):
            for j in range(b):
                logits = [float(router.weight[k] @ query[i, j] + router.bias[k]) for k in range(4)]
                out[i, j] = torch.tensor(softmax(logits), dtype=torch.float64)
        return out

    routers = recurrence.routers
    w0, r0 = weights(routers.write["0"], prelude), weights(routers.read["0"], prelude)
    buffer0 = torch.stack([emb, torch.zeros_like(emb), torch.zeros_like(emb), torch.zeros_like(emb)])
    buffer0 = buffer0 + w0.permute(2, 0, 1)[..., None] * prelude
    h0 = (buffer0 * r0.permute(2, 0, 1)[..., None]).sum(0)
    w1, r1 = weights(routers.write["1"], h0), weights(routers.read["1"], h0)
    buffer1 = buffer0 + w1.permute(2, 0, 1)[..., None] * core(h0)
    h1 = (buffer1 * r1.permute(2, 0, 1)[..., None]).sum(0)

    torch.testing.assert_close(trace[0]["write"], w0)
    torch.testing.assert_close(trace[1]["read"], r1)
    torch.testing.assert_close(trace[1]["buffer"], buffer1)
    torch.testing.assert_close(trace[1]["hidden"], h1)
    # Writes are additive: the embedding slot keeps h_emb plus exactly what was written to it.
    torch.testing.assert_close(
        trace[1]["buffer"][0], emb + w0[..., 0:1] * prelude + w1[..., 0:1] * core(h0)
    )


def test_update_identity_of_appendix_d():
    """h(t+1) = sum_b M_b(t) r_b + (sum_b w_b r_b) * hm for arbitrary soft weights."""
    torch.manual_seed(1)
    slots, s, b = 5, 3, 2
    buffer = torch.randn(slots, s, b, HIDDEN, dtype=torch.float64)
    hm = torch.randn(s, b, HIDDEN, dtype=torch.float64)
    w = torch.softmax(torch.randn(s, b, slots, dtype=torch.float64), -1)
    r = torch.softmax(torch.randn(s, b, slots, dtype=torch.float64), -1)
    lhs = MeshRecurrence.read(MeshRecurrence.write(buffer, hm, w), r)
    rhs = MeshRecurrence.read(buffer, r) + (w * r).sum(-1, keepdim=True) * hm
    torch.testing.assert_close(lhs, rhs)


# --------------------------------------------------------------------------- one-hot routers

BIG = 1e4  # softmax(+-1e4) is exactly one-hot in fp32


def force_one_hot(recurrence: MeshRecurrence, choices: dict[tuple[int, str], int]) -> None:
    """Router logits forced to one-hot: zero weights, +BIG bias on the chosen slot."""
    with torch.no_grad():
        for (step, kind), slot in choices.items():
            router = getattr(recurrence.routers, kind)[str(step)]
            router.weight.zero_()
            router.bias.fill_(-BIG)
            router.bias[slot] = BIG


def one_hot_schedule(variant: str, loops: int) -> dict[tuple[int, str], int]:
    """Slot choices that turn MeSH into a fixed recurrence (derivation in the README)."""
    # Transitional cycle: store p in slot 1 and read it back, so h(0) = p.
    choices = {(0, "write"): 1, (0, "read"): 1}
    for t in range(1, loops + 1):
        if variant == "residual":  # accumulate every core output on top of p in slot 1
            choices[(t, "write")], choices[(t, "read")] = 1, 1
        elif variant == "base":  # each core output to a fresh slot, read it alone
            choices[(t, "write")], choices[(t, "read")] = t + 1, t + 1
        elif variant == "anchor":  # slot 1 holds p: write hm there, read p + hm
            choices[(t, "write")], choices[(t, "read")] = 1, 1
        elif variant == "anchor_emb":  # slot 0 holds h_emb: write hm there, read h_emb + hm
            choices[(t, "write")], choices[(t, "read")] = 0, 0
    return choices


def copy_shared_weights(source, target) -> None:
    """Every parameter of `target` except the routers, copied from `source`."""
    source_state = source.state_dict()
    target_state = target.state_dict()
    for name in target_state:
        if "routers" not in name and name in source_state:
            target_state[name] = source_state[name]
    target.load_state_dict(target_state)


@pytest.mark.parametrize(
    "variant,loops",
    [("residual", 2), ("residual", 3), ("base", 2), ("base", 3), ("anchor", 1), ("anchor_emb", 1)],
)
def test_one_hot_mesh_reproduces_fixed_recurrences(model_parallel, variant, loops):
    """Paper App. D: with one-hot routers, MeSH on the same weights *is* the fixed scheme.

    Exact for residual and base at any depth. For anchor/anchor*, one-hot (convex)
    routers can keep h0 (or h_emb) un-accumulated in a slot for one loop only, so the
    exact full-model equality is checked at N_loop = 1 and the single-step identity
    (test_anchor_step_is_a_one_hot_mesh_step) covers every step.
    """
    from mesh_model.model import build_model

    split = f"1+2R{loops}+1"
    mesh_config = tiny_model_config(layer_split=split, variant="mesh")
    fixed_config = tiny_model_config(layer_split=split, variant=variant)
    torch.manual_seed(0)
    fixed = build_model(fixed_config)
    mesh = build_model(mesh_config)
    copy_shared_weights(fixed, mesh)
    force_one_hot(mesh.recurrence, one_hot_schedule(variant, loops))

    tokens, positions, mask = causal_inputs(2, 16, 96)
    fixed.eval(), mesh.eval()
    with torch.no_grad():
        expected = fixed(tokens, positions, mask)
        got = mesh(tokens, positions, mask)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    # And the routing really was one-hot (not a coincidence of near-uniform weights).
    trace: list = []
    with torch.no_grad():
        mesh(tokens, positions, mask, trace=trace)
    for record in trace:
        assert torch.all(record["read"].max(-1).values == 1.0)


def test_soft_routing_differs_from_every_fixed_scheme(model_parallel):
    """Guard against a vacuous equality: learned (non one-hot) routers give other outputs."""
    from mesh_model.model import build_model

    torch.manual_seed(0)
    fixed = build_model(tiny_model_config(variant="residual"))
    mesh = build_model(tiny_model_config(variant="mesh"))
    copy_shared_weights(fixed, mesh)
    tokens, positions, mask = causal_inputs(2, 16, 96)
    with torch.no_grad():
        assert not torch.allclose(fixed(tokens, positions, mask), mesh(tokens, positions, mask), atol=1e-3)


@pytest.mark.parametrize("variant", ["anchor", "anchor_emb"])
def test_anchor_step_is_a_one_hot_mesh_step(variant):
    """Any loop step of anchor/anchor* equals a MeSH step reading and writing the slot
    that holds the anchor (h0 = p, or h_emb)."""
    torch.manual_seed(2)
    s, b, slots = 3, 2, 5
    h_emb = torch.randn(s, b, HIDDEN, dtype=torch.float64)
    p = torch.randn(s, b, HIDDEN, dtype=torch.float64)
    h_t = torch.randn(s, b, HIDDEN, dtype=torch.float64)
    core = torch.sin
    fixed = FixedRecurrence(variant, 1)
    expected = core(h_t) + fixed.supplement(h_t, p, h_emb)

    anchor_slot = 1 if variant == "anchor" else 0
    buffer = torch.zeros(slots, s, b, HIDDEN, dtype=torch.float64)
    buffer[0], buffer[1] = h_emb, p
    one_hot = torch.zeros(s, b, slots, dtype=torch.float64)
    one_hot[..., anchor_slot] = 1.0
    got = MeshRecurrence.read(MeshRecurrence.write(buffer, core(h_t), one_hot), one_hot)
    torch.testing.assert_close(got, expected)
