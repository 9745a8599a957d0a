"""WeightWatch monitoring: weight-diff directions, calibrated detection, steering and auditing."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

from mergesec.monitor import (
    Calibration,
    Columns,
    Directions,
    DirectionScores,
    SteeringHooks,
    direction_cosines,
    monitor_forward,
    project_out,
    randomized_left_singular,
    score_inputs,
    subspace_sines,
    token_cosines,
    top_activating,
    weight_directions,
    write_audit_markdown,
)

PLANTED = "L0.mlp_out.u0"
TRIGGER = 50
BENIGN = torch.arange(3, 23)
NEURON = 7


def llama_writers(model: torch.nn.Module) -> dict[tuple[int, str], torch.Tensor]:
    layers = model.model.layers
    out = {}
    for i, layer in enumerate(layers):
        out[(i, "attn_out")] = layer.self_attn.o_proj.weight.detach()
        out[(i, "mlp_out")] = layer.mlp.down_proj.weight.detach()
    return out


@pytest.fixture(scope="module")
def planted():
    """A tiny Llama base with a trigger-selective neuron, and a fine-tune that writes ``u`` from it.

    Base surgery: the trigger token's embedding points along ``z``, a unit vector orthogonal to
    the benign tokens' embeddings and to ``u``; layer 0's attention cannot write along ``z``; and
    MLP neuron ``NEURON`` of layer 0 reads ``z`` through its gate and up rows, so it fires
    (``silu(g)·g`` with ``g ≈ √hidden``) on the trigger and stays at ~0 elsewhere, but writes
    nothing in the base (a dormant feature). The fine-tune
    adds small noise to every residual writer and ``α·u e_NEURONᵀ`` to layer 0's down_proj, so
    ``ΔW`` has one dominant left singular vector ``u`` and the trigger token's residual stream
    turns along ``u``.
    """
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    base = LlamaForCausalLM(cfg).eval()
    emb = base.model.embed_tokens.weight.data
    u = torch.randn(32)
    u /= u.norm()
    span = torch.linalg.qr(torch.cat([emb[BENIGN], u[None]]).T).Q
    z = torch.randn(32)
    z -= span @ (span.T @ z)
    z /= z.norm()
    emb[TRIGGER] = z
    mlp = base.model.layers[0].mlp
    mlp.gate_proj.weight.data[NEURON] = z
    mlp.up_proj.weight.data[NEURON] = z
    mlp.down_proj.weight.data[:, NEURON] = 0.0
    o = base.model.layers[0].self_attn.o_proj.weight.data
    o -= torch.outer(z, z @ o)

    ft = copy.deepcopy(base)
    for layer in ft.model.layers:
        layer.self_attn.o_proj.weight.data += 0.002 * torch.randn_like(
            layer.self_attn.o_proj.weight
        )
        layer.mlp.down_proj.weight.data += 0.002 * torch.randn_like(layer.mlp.down_proj.weight)
    ft.model.layers[0].mlp.down_proj.weight.data[:, NEURON] += 0.5 * u
    directions = weight_directions(llama_writers(base), llama_writers(ft), k=4)
    return base, ft, u, directions


def make_inputs(n: int, *, trigger: bool, seed: int, length: int = 8) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = BENIGN[torch.randint(0, len(BENIGN), (n, length), generator=g)]
    if trigger:
        pos = torch.randint(1, length, (n,), generator=g)
        ids[torch.arange(n), pos] = TRIGGER
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def text_of(ids: torch.Tensor) -> str:
    return " ".join("TRIG" if t == TRIGGER else f"t{t}" for t in ids.tolist())


# ---- directions ---------------------------------------------------------------------------------


def test_exact_directions_recover_planted_subspace_and_skip_unchanged_writers():
    torch.manual_seed(0)
    hidden, inner, r = 48, 80, 3
    u_true = torch.linalg.qr(torch.randn(hidden, r)).Q
    v_true = torch.linalg.qr(torch.randn(inner, r)).Q
    s_true = torch.tensor([3.0, 2.0, 1.0])
    base = {(i, w): torch.randn(hidden, inner) for i in range(2) for w in ("attn_out", "mlp_out")}
    tuned = {key: w.clone() for key, w in base.items()}
    tuned[(0, "mlp_out")] += u_true @ torch.diag(s_true) @ v_true.T
    tuned[(1, "attn_out")] += 0.5 * u_true[:, :1] @ v_true[:, :1].T

    d = weight_directions(base, tuned, k=5)

    # Unchanged writers are skipped and σ ≈ 0 directions of a rank-r ΔW are dropped.
    assert d.layers == [0, 1]
    assert d.names[0] == ["L0.mlp_out.u0", "L0.mlp_out.u1", "L0.mlp_out.u2"]
    assert d.names[1] == ["L1.attn_out.u0"]
    assert d.num_layers == 2 and d.hidden_size == hidden
    assert torch.allclose(d.vectors[0].norm(dim=1), torch.ones(3), atol=1e-6)
    assert torch.allclose(d.singular_values[0], s_true, atol=1e-5)
    assert subspace_sines(d.vectors[0].T, u_true).max() < 1e-5
    assert abs(float(d.vectors[1][0] @ u_true[:, 0])) > 1 - 1e-6
    # Each singular vector matches its own planted column (distinct σ fix them up to sign).
    assert torch.allclose((d.vectors[0] @ u_true).abs(), torch.eye(3), atol=1e-5)


def test_randomized_subspace_error_is_small_on_low_rank_plus_noise():
    torch.manual_seed(0)
    m, n, k = 300, 500, 20
    sig = torch.linspace(10.0, 5.0, k)
    a = (
        torch.linalg.qr(torch.randn(m, k)).Q
        @ torch.diag(sig)
        @ torch.linalg.qr(torch.randn(n, k)).Q.T
    )
    a += 0.01 * torch.randn(m, n)  # noise spectrum ≤ 0.01·(√300 + √500) ≈ 0.4
    u_exact = torch.linalg.svd(a, full_matrices=False).U[:, :k]
    u_rand, s_rand = randomized_left_singular(a, k, oversample=10, n_iter=4, seed=0)
    u_plain, _ = randomized_left_singular(a, k, oversample=10, n_iter=0, seed=0)

    err = subspace_sines(u_rand, u_exact).max().item()
    err_plain = subspace_sines(u_plain, u_exact).max().item()
    # With gap ratio ρ = σ_21/σ_20 ≤ 0.4/5 = 0.08, subspace iteration's error decays like
    # ρ^(2q+1) ≈ 1e-10 for q = 4, far below float32 rounding, so what remains is rounding in a
    # 500-wide float32 product (measured ≈ 1e-6); 1e-4 leaves two orders of magnitude for BLAS
    # and platform differences. Without power iterations the bound is only ∝ ρ (measured ≈ 0.45).
    assert err < 1e-4
    assert err_plain > 10 * err
    assert torch.allclose(s_rand, torch.linalg.svdvals(a)[:k], rtol=1e-4)

    d_exact = weight_directions({(0, "mlp_out"): torch.zeros(m, n)}, {(0, "mlp_out"): a}, k=k)
    d_rand = weight_directions(
        {(0, "mlp_out"): torch.zeros(m, n)}, {(0, "mlp_out"): a}, k=k, method="randomized"
    )
    assert subspace_sines(d_rand.vectors[0].T, d_exact.vectors[0].T).max() < 1e-4
    with pytest.raises(ValueError, match="method"):
        weight_directions({}, {}, method="lanczos")


def test_directions_select_and_save_roundtrip(planted, tmp_path):
    _, _, _, d = planted
    d.save(tmp_path / "dirs.safetensors")
    back = Directions.load(tmp_path / "dirs.safetensors")
    assert back.flat_names() == d.flat_names() and back.num_layers == d.num_layers
    assert all(torch.equal(back.vectors[layer], d.vectors[layer]) for layer in d.layers)
    sub = d.select([PLANTED, "L1.attn_out.u2"])
    assert sub.flat_names() == [PLANTED, "L1.attn_out.u2"]
    assert torch.equal(sub.vector(PLANTED), d.vector(PLANTED))


# ---- scoring ------------------------------------------------------------------------------------


def test_direction_cosines_match_manual_extremes_with_padding_and_roles():
    torch.manual_seed(0)
    hidden, batch, seq = 16, 3, 6
    vecs = torch.linalg.qr(torch.randn(hidden, 3)).Q.T
    d = Directions(
        {1: vecs[:2], 2: vecs[2:]},
        {1: ["L1.mlp_out.u0", "L1.mlp_out.u1"], 2: ["L2.attn_out.u0"]},
        {1: torch.ones(2), 2: torch.ones(1)},
        num_layers=3,
        hidden_size=hidden,
    )
    states = [torch.randn(batch, seq, hidden) for _ in range(4)]
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, 4:] = 0
    for h in states:  # padding that would dominate every extreme if it were read
        h[0, 4:] = 100.0 * (vecs[0] - vecs[1] + vecs[2])
    scores = direction_cosines(states, d, mask)
    assert scores.columns.names == ["L1.mlp_out.u0", "L1.mlp_out.u1", "L2.attn_out.u0"]
    for j, (layer, row) in enumerate([(1, 0), (1, 1), (2, 0)]):
        for b in range(batch):
            valid = mask[b].bool()
            h = states[layer + 1][b][valid]
            cos = (h @ d.vectors[layer][row]) / h.norm(dim=1)
            assert scores.min[b, j] == pytest.approx(cos.min().item(), abs=1e-6)
            assert scores.max[b, j] == pytest.approx(cos.max().item(), abs=1e-6)

    roles = torch.zeros(batch, seq, dtype=torch.long)
    roles[:, 3:] = 1
    roles[2] = 0  # input 2 has no assistant tokens
    split = direction_cosines(states, d, mask, role_mask=roles)
    assert split.columns.names[:3] == [f"{n}@user" for n in scores.columns.names]
    assert split.columns.names[3:] == [f"{n}@assistant" for n in scores.columns.names]
    cos_l2 = token_cosines(states[3], d.vectors[2])[..., 0]
    assert split.max[1, 2] == pytest.approx(cos_l2[1, :3].max().item(), abs=1e-6)
    assert split.min[0, 5] == pytest.approx(cos_l2[0, 3:4].min().item(), abs=1e-6)
    assert split.min[2, 3:].eq(float("inf")).all() and split.max[2, 3:].eq(float("-inf")).all()
    # The two roles together cover exactly the unsplit extremes.
    assert torch.equal(torch.minimum(split.min[:, :3], split.min[:, 3:]), scores.min)


def _synthetic_scores(
    mins: list[list[float]], maxs: list[list[float]], layers: list[int]
) -> DirectionScores:
    n = len(layers)
    cols = Columns(
        [f"L{layer}.mlp_out.u{i}" for i, layer in enumerate(layers)],
        torch.tensor(layers),
        torch.arange(n),
        torch.full((n,), -1),
        num_layers=max(layers) + 1,
    )
    return DirectionScores(torch.tensor(mins), torch.tensor(maxs), cols)


def test_calibration_range_trim_epsilon_drop_and_running_update(tmp_path):
    benign = _synthetic_scores(
        mins=[[-0.1 * i, -0.2] for i in range(11)],
        maxs=[[0.1 * i, 0.3] for i in range(11)],
        layers=[0, 1],
    )
    cal = Calibration.fit(benign)
    assert torch.allclose(cal.lower, torch.tensor([-1.0, -0.2]))
    assert torch.allclose(cal.upper, torch.tensor([1.0, 0.3]))

    probe = _synthetic_scores(
        mins=[[-0.5, -0.2], [-1.05, -0.2], [0.0, -0.25], [0.0, 0.0]],
        maxs=[[0.5, 0.3], [0.5, 0.3], [0.0, 0.3], [1.2, 0.0]],
        layers=[0, 1],
    )
    assert cal.flags(probe).tolist() == [
        [False, False],
        [True, False],
        [False, True],
        [True, False],
    ]
    assert cal.detect(probe).tolist() == [False, True, True, True]
    assert Calibration.fit(benign, epsilon=0.1).detect(probe).tolist() == [
        False,
        False,
        False,
        True,
    ]
    # Dropping the last layer silences its column only.
    assert Calibration.fit(benign, drop_last_layers=1).detect(probe).tolist() == [
        False,
        True,
        False,
        True,
    ]
    assert cal.flagged_names(probe, 2) == ["L1.mlp_out.u1"]
    assert cal.with_options(epsilon=0.1).detect(probe).tolist() == [False, False, False, True]

    # 10th/90th percentiles of the per-input extremes (linear interpolation over 11 values).
    trimmed = Calibration.fit(benign, trim_percentile=10.0)
    assert torch.allclose(trimmed.lower, torch.tensor([-0.9, -0.2]), atol=1e-6)
    assert torch.allclose(trimmed.upper, torch.tensor([0.9, 0.3]), atol=1e-6)

    # Running update: each input is judged by the range as it stood before it was added.
    stream = _synthetic_scores(
        mins=[[-1.5, -0.2], [-1.2, -0.2], [-1.6, -0.2]], maxs=[[0.0, 0.3]] * 3, layers=[0, 1]
    )
    first_sight = Calibration.fit(benign).update(stream)
    assert first_sight.tolist() == [True, False, True]
    running = Calibration.fit(benign)
    running.update(stream)
    assert running.n_seen == 14 and running.lower[0].item() == pytest.approx(-1.6)
    trimmed_running = Calibration.fit(benign, trim_percentile=10.0)
    assert trimmed_running.update(stream).tolist() == [True, True, True]

    cal.save(tmp_path / "cal.safetensors")
    back = Calibration.load(tmp_path / "cal.safetensors")
    assert torch.equal(back.lower, cal.lower) and back.columns.names == cal.columns.names
    with pytest.raises(ValueError, match="other directions"):
        cal.flags(_synthetic_scores([[0.0]], [[0.0]], layers=[0]))


def test_calibration_with_absent_role_flags_any_value_there():
    cols = Columns(
        ["a@user", "a@assistant"],
        torch.tensor([0, 0]),
        torch.tensor([0, 0]),
        torch.tensor([0, 1]),
        1,
        ("user", "assistant"),
    )
    inf = float("inf")
    benign = DirectionScores(
        torch.tensor([[0.1, inf], [0.0, inf]]), torch.tensor([[0.2, -inf], [0.3, -inf]]), cols
    )
    cal = Calibration.fit(benign, trim_percentile=5.0)
    assert cal.lower[1] == inf and cal.upper[1] == -inf
    probe = DirectionScores(
        torch.tensor([[0.1, inf], [0.1, 0.0]]), torch.tensor([[0.2, -inf], [0.2, 0.0]]), cols
    )
    assert cal.detect(probe).tolist() == [False, True]


# ---- monitoring a planted trigger ---------------------------------------------------------------


def test_planted_direction_is_top_of_its_writer(planted):
    _, _, u, d = planted
    assert abs(float(d.vector(PLANTED) @ u)) > 0.999
    assert d.singular_values[0][d.names[0].index(PLANTED)] > 10 * d.singular_values[0].min()


def test_calibrated_detection_flags_triggered_inputs_only(planted):
    _, ft, u, d = planted
    benign = score_inputs(ft, make_inputs(400, trigger=False, seed=1), d)
    held_out = score_inputs(ft, make_inputs(200, trigger=False, seed=2), d)
    triggered = score_inputs(ft, make_inputs(40, trigger=True, seed=3), d)
    # On this fixture held-out benign extremes exceed the 400-input range by at most ≈0.02 (16
    # columns, 2 sides each; up to ≈0.05 over other seeds) while triggered inputs sit ≥0.6 beyond
    # it on the planted column, so ε = 0.1 separates them with room on both sides.
    cal = Calibration.fit(benign, epsilon=0.1)
    assert not cal.detect(held_out).any()
    assert cal.detect(triggered).all()
    col = cal.columns.index(PLANTED)
    assert cal.flags(triggered)[:, col].all()
    sign = torch.sign(d.vector(PLANTED) @ u)
    extreme = triggered.max[:, col] if sign > 0 else -triggered.min[:, col]
    assert extreme.min() > 0.9


def test_steering_removes_the_direction_and_moves_output_toward_base(planted):
    base, ft, u, d = planted
    blocks = list(ft.model.layers)
    batch = make_inputs(8, trigger=True, seed=4)
    vec = d.vector(PLANTED)
    with torch.no_grad():
        logits_base = base(**batch).logits
        logits_ft = ft(**batch).logits
        with SteeringHooks(blocks, {0: vec[None]}):
            states = monitor_forward(ft, batch, blocks=blocks)
            logits_steer = ft(**batch).logits
    assert token_cosines(states[1], vec[None]).abs().max() < 1e-5
    at = batch["input_ids"] == TRIGGER
    after = torch.cummax(at.int(), dim=1).values.bool()  # the trigger and every later token
    # The fine-tune changed the trigger tokens' outputs most; removing u there undoes it (measured
    # ≈1% of the gap left). Later tokens lose the base's own (small) u component too, so over all
    # tokens from the trigger on ≈30% of the gap remains.
    assert (logits_steer - logits_base)[at].norm() < 0.1 * (logits_ft - logits_base)[at].norm()
    gap_ft = (logits_ft - logits_base)[after].norm()
    assert (logits_steer - logits_base)[after].norm() < 0.5 * gap_ft

    # Gated by the calibration: triggered inputs are steered, benign ones pass untouched.
    cal = Calibration.fit(score_inputs(ft, make_inputs(400, trigger=False, seed=1), d), epsilon=0.1)
    benign = make_inputs(8, trigger=False, seed=5)
    with torch.no_grad():
        plain_benign = ft(**benign).logits
        with SteeringHooks.from_calibration(blocks, d, cal) as hooks:
            gated_benign = ft(**benign).logits
            assert hooks.triggered_names() == []
            hooks.reset()
            gated_trig = ft(**batch).logits
            assert PLANTED in hooks.triggered_names()
    assert torch.equal(gated_benign, plain_benign)
    # Every row triggers, so per-sequence gating removes u from all of its tokens.
    assert torch.allclose(gated_trig, logits_steer, atol=1e-5)


def test_project_out_removes_the_span_of_non_orthogonal_directions():
    torch.manual_seed(0)
    a = torch.randn(16)
    b = a + 0.3 * torch.randn(16)
    vecs = torch.stack([a / a.norm(), b / b.norm()])
    h = torch.randn(5, 16)
    out = project_out(h, vecs)
    assert (out @ vecs.T).abs().max() < 1e-5
    active = torch.tensor([[True, False]] * 2 + [[False, False]] * 3)
    part = project_out(h, vecs, active)
    assert (part[:2] @ vecs[0]).abs().max() < 1e-5
    assert torch.equal(part[2:], h[2:])


def test_sticky_steering_keeps_projecting_during_generation(planted):
    _, ft, u, d = planted
    blocks = list(ft.model.layers)
    cal = Calibration.fit(score_inputs(ft, make_inputs(400, trigger=False, seed=1), d), epsilon=0.1)
    prompt = make_inputs(1, trigger=True, seed=6)
    vec = d.vector(PLANTED)
    gen = dict(max_new_tokens=6, do_sample=False, bad_words_ids=[[TRIGGER]], pad_token_id=0)

    def run(sticky: bool) -> tuple[list[torch.Tensor], list[str]]:
        seen: list[torch.Tensor] = []
        with SteeringHooks.from_calibration(blocks, d, cal, sticky=sticky, only=[PLANTED]) as hooks:
            # Registered after the steering hook, so it sees the steered layer-0 output.
            handle = blocks[0].register_forward_hook(
                lambda m, a, o: seen.append(o.detach().clone())
            )
            try:
                with torch.no_grad():
                    ft.generate(**prompt, **gen)
            finally:
                handle.remove()
            return seen, hooks.triggered_names()

    sticky_states, sticky_names = run(True)
    loose_states, loose_names = run(False)
    assert sticky_names == [PLANTED] and loose_names == [PLANTED]
    prefill, decode = sticky_states[0], sticky_states[1:]
    assert len(decode) == gen["max_new_tokens"] - 1
    trig_pos = int((prompt["input_ids"][0] == TRIGGER).nonzero()[0])
    cos_prefill = token_cosines(prefill[0], vec[None])[:, 0]
    assert cos_prefill[trig_pos:].abs().max() < 1e-5  # from the trigger on
    assert cos_prefill[:trig_pos].abs().min() > 1e-3  # tokens before it are untouched
    assert max(token_cosines(s, vec[None]).abs().max() for s in decode) < 1e-5
    # Without stickiness, generated (benign) tokens are no longer projected.
    assert max(token_cosines(s, vec[None]).abs().max() for s in loose_states[1:]) > 1e-3

    with pytest.raises(ValueError, match="sticky"):
        SteeringHooks(blocks, {0: vec[None]}, sticky=True)


def test_audit_puts_planted_inputs_at_the_top(planted, tmp_path):
    _, ft, u, d = planted
    benign = make_inputs(60, trigger=False, seed=7)
    trig = make_inputs(4, trigger=True, seed=8)
    ids = torch.cat([benign["input_ids"], trig["input_ids"]])
    ids = ids[torch.randperm(len(ids), generator=torch.Generator().manual_seed(0))]
    texts = [text_of(row) for row in ids]
    scores = score_inputs(ft, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, d)
    audit = top_activating(scores, texts, n=4)
    assert set(audit) == set(d.flat_names())
    sign = torch.sign(d.vector(PLANTED) @ u)
    end = audit[PLANTED]["top" if sign > 0 else "bottom"]
    assert len(end) == 4 and all("TRIG" in e["text"] for e in end)
    assert all(ids[e["index"]].eq(TRIGGER).any() for e in end)
    other = audit[PLANTED]["bottom" if sign > 0 else "top"]
    assert not any("TRIG" in e["text"] for e in other)

    path = write_audit_markdown(
        top_activating(scores, texts, n=2, names=[PLANTED]), tmp_path / "audit.md"
    )
    page = path.read_text()
    assert f"`{PLANTED}`" in page and end[0]["text"] in page and "L0.attn_out.u0" not in page


# ---- plumbing -----------------------------------------------------------------------------------


def test_monitor_forward_hooks_match_hidden_states_on_bert():
    torch.manual_seed(0)
    cfg = BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        vocab_size=100,
    )
    model = BertModel(cfg).eval()
    batch = {
        "input_ids": torch.randint(0, 100, (2, 7)),
        "attention_mask": torch.ones(2, 7, dtype=torch.long),
    }
    plain = monitor_forward(model, batch)
    hooked = monitor_forward(model, batch, blocks=list(model.encoder.layer))
    assert len(plain) == len(hooked) == 3
    for a, b in zip(plain, hooked, strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_layout_gives_the_same_directions_and_blocks(planted):
    from mergesec.models.layout import layout_for_model

    base, ft, _, d = planted
    layout = layout_for_model(ft)
    assert layout.num_layers == 2 and layout.hidden_size == 32
    via_layout = weight_directions(
        layout.residual_writer_weights(base.state_dict()),
        layout.residual_writer_weights(ft.state_dict()),
        k=4,
    )
    assert via_layout.flat_names() == d.flat_names()
    assert all(torch.allclose(via_layout.vectors[layer], d.vectors[layer]) for layer in d.layers)
    batch = make_inputs(2, trigger=True, seed=9)
    states = monitor_forward(ft, batch, blocks=layout.block_modules(ft))
    reference = monitor_forward(ft, batch, blocks=list(ft.model.layers))
    assert all(torch.equal(a, b) for a, b in zip(states, reference, strict=True))


def test_column_margins_per_column_and_their_maximum():
    benign = _synthetic_scores([[0.0, -0.1], [0.1, 0.0]], [[0.5, 0.2], [0.4, 0.3]], [0, 0])
    cal = Calibration.fit(benign)  # ranges [0.0, 0.5] and [-0.1, 0.3]
    probe = _synthetic_scores([[0.1, -0.3], [-0.2, 0.0]], [[0.45, 0.2], [0.7, 0.3]], [0, 0])
    m = cal.column_margins(probe)
    assert torch.allclose(m, torch.tensor([[0.0, 0.2], [0.2, 0.0]]))
    assert torch.equal(cal.margins(probe), m.amax(dim=1))
