# Tests of train_cllm.py: the losses and their pieces against hand-worked examples, batched
# trajectory collection, packing (one forward equals the reference's many), gradient
# accumulation, the quality guard (also on resume), and distillation that measurably raises
# tokens per forward while Jacobi stays exactly greedy.
# Run: python -m pytest -q tests/test_cllm.py
import copy
import json
import re
import os
import shutil
import signal

import pytest
import torch

import train_cllm
from extras.configurator import configure
from conftest import make_model, settings, signal_at_step
from extras.quality import stop_line
from jacobi import collect_trajectories, greedy_decode, jacobi_decode
from extras.jacobi_forcing import noise_ratio, noisy_streams
from train_cllm import (CLLMConfig, ar_labels, ar_loss, choose_states, collate, consistency_loss,
                        consistency_mask, consistency_pair, consistency_target, distillation_loss,
                        distillation_loss_reference, guard, pack_row)


# ----------------------------------------------------------------------------------------------
# the losses, on hand-made tensors

def test_consistency_loss_is_zero_at_the_fixed_point_and_positive_elsewhere():
    logits = torch.randn(5, 11)
    assert consistency_loss(logits, logits.clone()).item() == pytest.approx(0.0, abs=1e-6)
    assert consistency_loss(torch.randn(5, 11), logits).item() > 0
    assert consistency_loss(torch.zeros(0, 11), torch.zeros(0, 11)).item() == 0.0


def test_no_gradient_flows_through_the_teacher():
    student = torch.randn(4, 7, requires_grad=True)
    teacher = torch.randn(4, 7, requires_grad=True)
    consistency_loss(student, teacher).backward()
    assert teacher.grad is None and student.grad.abs().sum() > 0


def test_consistency_loss_is_the_mean_kl():
    s, t = torch.randn(3, 5), torch.randn(3, 5)
    p = t.softmax(-1)
    kl = (p * (p.log() - s.log_softmax(-1))).sum(-1).mean()
    torch.testing.assert_close(consistency_loss(s, t), kl)


def test_mask_excludes_positions_before_the_first_wrong_token():
    fixed = torch.tensor([1, 2, 3, 4, 5])
    # logit i predicts token i+1 from tokens 0..i: identical while the inputs are identical
    assert consistency_mask(torch.tensor([1, 2, 9, 4, 5]), fixed).tolist() == [False, False, True, True]
    assert consistency_mask(torch.tensor([9, 2, 3, 4, 5]), fixed).tolist() == [True] * 4
    assert consistency_mask(fixed.clone(), fixed).tolist() == [False] * 4
    # a difference in the last token changes no input of this block
    assert consistency_mask(torch.tensor([1, 2, 3, 4, 9]), fixed).tolist() == [False] * 4


def test_horizon_keeps_the_first_logits_from_the_first_wrong_token():
    fixed = torch.tensor([1, 2, 3, 4, 5, 6])
    state = torch.tensor([1, 9, 9, 4, 9, 6])
    assert consistency_mask(state, fixed, horizon=2).tolist() == [False, True, True, False, False]
    assert consistency_mask(state, fixed, horizon=9).tolist() == consistency_mask(state, fixed).tolist()
    assert consistency_mask(fixed.clone(), fixed, horizon=2).tolist() == [False] * 5


def test_jacobi_forcings_mask_counts_each_block_from_its_own_first_wrong_token():
    """A noisy stream of three blocks of 3: the first wrong at its 2nd token, the second right,
    the third wrong at its 2nd token. Per block (Jacobi Forcing): logits 1, 2 of the first block
    (the last one predicts the second block's first token), none of the right block, logits 1, 2
    of the third; over the whole stream (the CLLM's mask) every logit from the first wrong token
    on would count."""
    fixed = torch.tensor([1, 2, 3, 4, 5, 6, 7, 8, 9])
    state = torch.tensor([1, 0, 3, 4, 5, 6, 7, 0, 0])
    per_block = consistency_mask(state, fixed, lengths=[3, 3, 3]).long().tolist()
    assert per_block == [0, 1, 1, 0, 0, 0, 0, 1, 1]
    assert consistency_mask(state, fixed).long().tolist() == [0, 1, 1, 1, 1, 1, 1, 1]
    assert consistency_mask(state, fixed, horizon=1, lengths=[3, 3, 3]).long().tolist() == [0, 1, 0, 0, 0, 0, 0, 1, 0]
    assert not consistency_mask(fixed, fixed, lengths=[4, 5]).any()


def smoothed_cross_entropy(logits, labels, eps):
    """Label smoothing by hand, position by position: the label gets 1 - eps of the target
    distribution and every token of the vocabulary eps / V, so the loss at a position is
    (1 - eps) * -log p(label) + eps * mean over v of -log p(v); averaged over the labelled
    positions (label -1: none)."""
    losses = []
    for row, label in zip(logits.reshape(-1, logits.size(-1)), labels.reshape(-1).tolist()):
        if label != -1:
            logp = row.double().log_softmax(-1)
            losses.append(-(1 - eps) * logp[label] - eps * logp.mean())
    return torch.stack(losses).mean()


def test_label_smoothing_of_the_ar_loss():
    """ar_loss with smoothing is the smoothed cross-entropy, on hand-made logits and on the
    packed batch (its AR term equals the smoothed loss of a plain forward of prompt + answer)."""
    g = torch.Generator().manual_seed(8)
    logits, labels = torch.randn(2, 5, 11, generator=g), torch.randint(11, (2, 5), generator=g)
    labels[0, :2] = -1
    for eps in (0.0, 0.1, 0.3):
        torch.testing.assert_close(ar_loss(logits, labels, eps).double(),
                                   smoothed_cross_entropy(logits, labels, eps))
    cfg = CLLMConfig(label_smoothing=0.1, ar_target="ground_truth")
    records = [fake_record(g), fake_record(g, blocks=((4, 2),), prompt_len=3, answer_len=4)]
    model = make_model(seed=5)
    by_hand_logits, by_hand_labels = [], []
    for r in records:  # the AR term's forward: prompt + answer, logits from the last prompt token on
        out, _ = model(torch.cat([r["prompt"], r["answer"][:-1]])[None])
        by_hand_logits.append(out[0, len(r["prompt"]) - 1:])
        by_hand_labels.append(r["answer"])
    rows = [pack_row(r, [(0, [0])], cfg, 64) for r in records]
    _, _, l_ar = distillation_loss(model, collate(rows, "cpu"), cfg)
    torch.testing.assert_close(l_ar.double(), smoothed_cross_entropy(
        torch.cat(by_hand_logits), torch.cat(by_hand_labels), 0.1), atol=1e-5, rtol=1e-5)


def test_local_and_global_targets():
    states = torch.tensor([[5, 5, 5], [1, 5, 5], [1, 2, 5], [1, 2, 3]])
    assert consistency_target(states, 0, "global") == 3
    assert consistency_target(states, 1, "global") == 3
    assert consistency_target(states, 0, "local") == 1
    assert consistency_target(states, 2, "local") == 3
    with pytest.raises(ValueError, match="global' or 'local"):
        consistency_target(states, 0, "both")


# A record worked by hand: prompt 1 2 3; block 0 went 5 5 -> 10 11, block 1 went 7 7 -> 12 7 ->
# 12 13; the dataset's answer is 10 11 12 14 and EOS (49), where the target said 13.
HAND = dict(prompt=torch.tensor([1, 2, 3]), answer=torch.tensor([10, 11, 12, 14, 49]),
            states=[torch.tensor([[5, 5], [10, 11]]), torch.tensor([[7, 7], [12, 7], [12, 13]])])


def test_consistency_pairs_worked_by_hand():
    """(prefix, y, yhat) of a choice: the CLLM recipe's one state after the clean prefix, and a
    Jacobi Forcing stream, a state of every block after the prompt; with their masks."""
    pair = lambda choice, kind: [t.tolist() for t in consistency_pair(HAND, choice, kind)]
    assert pair((1, [0]), "global") == [[1, 2, 3, 10, 11], [7, 7], [12, 13]]
    assert pair((1, [0]), "local") == [[1, 2, 3, 10, 11], [7, 7], [12, 7]]
    assert pair((1, [1]), "local") == [[1, 2, 3, 10, 11], [12, 7], [12, 13]]
    assert pair((0, [0]), "local") == [[1, 2, 3], [5, 5], [10, 11]]
    assert pair((0, [0, 1]), "global") == [[1, 2, 3], [5, 5, 12, 7], [10, 11, 12, 13]]
    assert pair((0, [1, 0]), "local") == [[1, 2, 3], [10, 11, 7, 7], [10, 11, 12, 7]]
    # which logits count: 12 7 vs 12 13 have the same inputs (the last token is no input)
    assert consistency_mask(torch.tensor([12, 7]), torch.tensor([12, 13])).tolist() == [False]
    # a clean block 0 and then a wrong one: the logits from the first 7 on
    mask = consistency_mask(torch.tensor([10, 11, 7, 7]), torch.tensor([10, 11, 12, 7]))
    assert mask.tolist() == [False, False, True]


def test_ar_labels_worked_by_hand():
    """The AR labels: the dataset's answer with its EOS, cut where the context ends, or the
    target's own output y* (the fixed points one after the other)."""
    assert ar_labels(HAND, "ground_truth", 64).tolist() == [10, 11, 12, 14, 49]
    assert ar_labels(HAND, "ground_truth", 6).tolist() == [10, 11, 12]  # 3 prompt tokens + 3
    assert ar_labels(HAND, "fixed_point", 64).tolist() == [10, 11, 12, 13]


# ----------------------------------------------------------------------------------------------
# trajectories

@pytest.mark.parametrize("n", [1, 3, 8, 16])
def test_batched_collection_equals_jacobi_decode(n):
    model = make_model(seed=21, scale=4.0)  # block_size 64
    g = torch.Generator().manual_seed(n)
    prompts = [torch.randint(50, (L,), generator=g) for L in (1, 5, 9, 30, 60, 17)]
    eos_id = int(greedy_decode(model, prompts[2], 40)[-7])  # a token the model does emit
    assert any(eos_id in greedy_decode(model, p, 40).tolist() for p in prompts)
    trajs = collect_trajectories(model, prompts, n, 40, eos_id, seeds=list(range(len(prompts))))
    for i, (prompt, blocks) in enumerate(zip(prompts, trajs)):
        tokens, stats = jacobi_decode(model, prompt, 40, n, eos_id, seed=i)
        assert len(blocks) == len(stats.trajectory)
        for a, b in zip(blocks, stats.trajectory):
            assert torch.equal(a.prefix, b.prefix) and torch.equal(a.states, b.states)
        out = torch.cat([b.fixed_point for b in blocks]) if blocks else tokens[:0]
        assert torch.equal(out, greedy_decode(model, prompt, 40, eos_id))


# ----------------------------------------------------------------------------------------------
# packing: one forward of a packed batch == the reference loss with separate forwards

def fake_record(g, blocks=((5, 1), (5, 3), (3, 2)), prompt_len=6, answer_len=9, vocab=50):
    """A record of random states: per block (b, S), S random states and then a fixed point."""
    return dict(prompt=torch.randint(vocab, (prompt_len,), generator=g),
                answer=torch.randint(vocab, (answer_len,), generator=g),
                states=[torch.randint(vocab, (S + 1, b), generator=g) for b, S in blocks])


def fake_batch(g, recipe, cfg, model):
    """Records and the choices a step trains on. CLLM: random states and hand-picked choices
    (an empty one, a block whose first guess was its fixed point). Jacobi Forcing: real
    trajectories of the model, whose states are partly right, and the streams the training loop
    draws (choose_states -> extras.jacobi_forcing.noisy_streams)."""
    if recipe == "cllm":
        records = [fake_record(g), fake_record(g, blocks=((4, 2), (2, 1)), prompt_len=3, answer_len=4),
                   fake_record(g, blocks=((5, 0),))]  # a block whose first guess was its fixed point
        return records, [[(0, [0]), (1, [2]), (1, [0]), (2, [1])], [(0, [1]), (1, [0])], []]
    prompts = [torch.randint(50, (L,), generator=g) for L in (6, 3, 9)]
    trajs = collect_trajectories(model.eval(), prompts, 5, 13, seeds=[0, 1, 2])
    records = [dict(prompt=p, answer=torch.randint(50, (9,), generator=g), states=[b.states for b in t])
               for p, t in zip(prompts, trajs)]
    choices = choose_states(records, cfg, g)
    # streams that mix clean and noisy blocks, and noisy blocks after the first
    assert any(0 < j < len(r["states"][b]) - 1 for r, c in zip(records, choices)
               for _, js in c for b, j in enumerate(js) if b > 0)
    return records, choices


def test_collection_drops_a_prompt_whose_output_repeats_a_token():
    """repeat_limit: a prompt whose output (the fixed points, i.e. greedy's output) repeats one
    token that many times in a row gets None instead of its trajectory; 0 drops nothing. The runs
    are counted here by hand on greedy_decode's outputs."""
    from test_jacobi import constant_model
    model, prompts = constant_model(), [torch.tensor([1, 2, 4, 5]), torch.tensor([3, 3])]
    assert all(t is None for t in collect_trajectories(model, prompts, 4, 12, repeat_limit=12))
    assert all(t for t in collect_trajectories(model, prompts, 4, 12, repeat_limit=13))  # 3 x 12: a run of 12
    model = make_model(seed=0).eval()
    prompts = [torch.randint(50, (5,), generator=torch.Generator().manual_seed(s)) for s in range(8)]
    runs = []
    for p in prompts:
        out, run, longest = greedy_decode(model, p, 12).tolist(), 1, 1
        for a, b in zip(out, out[1:]):
            run = run + 1 if a == b else 1
            longest = max(longest, run)
        runs.append(longest)
    limit = sorted(runs)[len(runs) // 2]
    assert min(runs) < limit  # (prompts on both sides of the limit)
    kept = collect_trajectories(model, prompts, 4, 12, seeds=list(range(8)), repeat_limit=limit)
    assert [t is None for t in kept] == [r >= limit for r in runs]
    assert all(t is not None for t in collect_trajectories(model, prompts, 4, 12, repeat_limit=0))


def test_the_evaluations_and_the_table_decode_with_decode_n(tiny_target, tmp_path):
    """--n=4 --decode_n=2: the trajectories have blocks of 4, the target's evaluation (the first
    point of the curve) has the tokens per forward of Jacobi decoding at n = 2 (counted here with
    jacobi_decode on the same val prompts), and the table's rows are at n = 2."""
    from common import encode_prompts, load_checkpoint
    from data.common import load_encoding, load_records
    data, target = tiny_target
    out = str(tmp_path / "cllm")
    results = train_cllm.main(cllm_args(data, target, out, decode_n=2, max_iters=2, val_prompts=3))
    assert torch.load(os.path.join(out, "trajectories.pt"), weights_only=False)["meta"]["n"] == 4
    assert "Jacobi n=2" in results["CLLM"] and "Jacobi n=4" not in results["CLLM"]
    model, _ = load_checkpoint(os.path.join(target, "ckpt.pt"))
    enc = load_encoding(data)
    prompts = encode_prompts(enc, load_records(data, "val")[:3], model, 16, "cpu", "val prompts")
    stats = [jacobi_decode(model, p, 16, 2, enc.eot_token)[1] for p in prompts]
    curve = json.load(open(os.path.join(out, "results.json")))["curve"]
    assert curve[0]["tokens_per_forward"] == pytest.approx(sum(s.tokens for s in stats) / sum(s.forwards for s in stats))


@pytest.mark.parametrize("recipe,kind,ar_target,horizon", [
    ("cllm", "global", "fixed_point", 0), ("cllm", "local", "fixed_point", 0),
    ("cllm", "global", "ground_truth", 0), ("cllm", "local", "ground_truth", 0),
    ("cllm", "global", "ground_truth", 2), ("jacobi_forcing", "global", "ground_truth", 0),
    ("jacobi_forcing", "global", "fixed_point", 0), ("jacobi_forcing", "local", "ground_truth", 0),
    ("jacobi_forcing", "global", "ground_truth", 2)])
def test_packed_loss_and_gradients_equal_the_reference(recipe, kind, ar_target, horizon):
    g = torch.Generator().manual_seed(3)
    cfg = CLLMConfig(recipe=recipe, consistency=kind, ar_target=ar_target, ar_weight=3.0,
                     horizon=horizon, states_per_block=2)
    model = make_model(seed=5)  # block_size 64
    records, choices = fake_batch(g, recipe, cfg, model)
    model.train()
    ref = distillation_loss_reference(model, records, choices, cfg)
    ref[0].backward()
    ref_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    rows = [pack_row(r, c, cfg, context=64) for r, c in zip(records, choices)]
    packed = distillation_loss(model, collate(rows, "cpu"), cfg)
    packed[0].backward()
    assert ref[1] > 0 and ref[2] > 0
    for a, b in zip(packed, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    for p, ref_grad in zip(model.parameters(), ref_grads):
        torch.testing.assert_close(p.grad, ref_grad, atol=1e-5, rtol=1e-4)


def test_states_per_block_0_is_the_ar_loss_alone():
    """The AR-only control (--states_per_block=0): no state is drawn, and a step's loss and
    gradients are ar_weight times the mean cross-entropy of the data's answers after their
    prompts, computed here with one plain forward per record. The command line takes 0, and the
    draws use the random stream as a CLLM run's do, so the two runs see the same batches."""
    cfg = configure(CLLMConfig(), ["--states_per_block=0", "--ar_weight=3.0", "--ar_target=ground_truth"])
    with pytest.raises(ValueError, match="states_per_block"):
        configure(CLLMConfig(), ["--states_per_block=-1"])
    g = torch.Generator().manual_seed(3)
    model = make_model(seed=5).train()  # block_size 64
    records = [fake_record(g), fake_record(g, blocks=((4, 2), (2, 1)), prompt_len=3, answer_len=4)]
    g_cllm = torch.Generator().set_state(g.get_state())
    choices = choose_states(records, cfg, g)
    assert choices == [[], []]
    choose_states(records, CLLMConfig(states_per_block=3), g_cllm)
    assert torch.equal(g.get_state(), g_cllm.get_state())
    total, l_c, _ = distillation_loss(model, collate([pack_row(r, c, cfg, 64) for r, c in
                                                     zip(records, choices)], "cpu"), cfg)
    total.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    logits, targets = [], []
    for r in records:
        out, _ = model(torch.cat([r["prompt"], r["answer"][:-1]])[None])
        logits.append(out[0, len(r["prompt"]) - 1:])
        targets.append(r["answer"])
    expected = 3.0 * torch.nn.functional.cross_entropy(torch.cat(logits), torch.cat(targets))
    expected.backward()
    assert l_c == 0
    torch.testing.assert_close(total, expected, atol=1e-5, rtol=1e-5)
    for p, grad in zip(model.parameters(), grads):
        torch.testing.assert_close(grad, p.grad, atol=1e-5, rtol=1e-4)


def test_packed_row_segments(tiny):
    """The first segment is prompt + fixed points, causal, with the AR labels; a Jacobi Forcing
    stream is one segment that sees the prompt only (its blocks see the earlier noisy blocks)."""
    g = torch.Generator().manual_seed(4)
    record = fake_record(g)
    fixed = torch.cat([s[-1] for s in record["states"]])
    row = pack_row(record, [(0, [0, 1, 0])], CLLMConfig(ar_target="fixed_point"), 64)
    P, K = len(record["prompt"]), len(fixed)
    assert torch.equal(row.tokens[:P + K], torch.cat([record["prompt"], fixed]))
    assert torch.equal(row.labels[P - 1:P + K - 1], fixed) and (row.labels[P + K - 1:] == -1).all()
    stream = row.tokens[P + K:]
    assert torch.equal(stream, torch.cat([s[j] for s, j in zip(record["states"], [0, 1, 0])]))
    assert torch.equal(row.positions[P + K:], torch.arange(P, P + K))
    assert row.attn[P + K:, :P].all() and not row.attn[P + K:, P:P + K].any()
    assert torch.equal(row.attn[P + K:, P + K:], torch.ones(K, K, dtype=torch.bool).tril())


def test_noise_schedule_climbs_within_the_window():
    g = torch.Generator().manual_seed(0)
    fixed = torch.arange(8)
    # states from fully wrong to right: noise ratios 1, 0.75, 0.5, 0.25, 0
    states = torch.stack([torch.where(torch.arange(8) >= w, 99, fixed) for w in (0, 2, 4, 6, 8)])
    assert [noise_ratio(s, fixed) for s in states] == [1.0, 0.75, 0.5, 0.25, 0.0]
    record = dict(prompt=torch.tensor([1]), answer=None, states=[states] * 5)
    for k, js in noisy_streams(record, 8, 5, g):
        ratios = [noise_ratio(states[j], fixed) for j in js]
        phase = [0.0, 0.25, 0.5, 0.75, 1.0].index(ratios[0])
        assert k == 0 and ratios == [[0.0, 0.25, 0.5, 0.75, 1.0][(phase + b) % 5] for b in range(5)]


def test_collate_pads_without_nans(tiny):
    g = torch.Generator().manual_seed(4)
    cfg = CLLMConfig()
    rows = [pack_row(fake_record(g, blocks=((4, 1),), prompt_len=L, answer_len=2), [(0, [0])], cfg, 64)
            for L in (3, 12)]
    tokens, positions, attn, labels, student, teacher = collate(rows, "cpu")
    logits, _ = tiny(tokens, input_pos=positions, attn_mask=attn)
    assert torch.isfinite(logits).all()
    assert (labels[0, len(rows[0].tokens):] == -1).all()
    assert student[:, 0].tolist() == [0] * len(rows[0].student) + [1] * len(rows[1].student)


# ----------------------------------------------------------------------------------------------
# end to end on a trivially learnable task: distillation raises tokens per forward

PROMPT_LEN, ANSWER = 4, list(range(10, 30))  # every prompt is answered by the tokens 10 .. 29


def pretrain_target(steps=150):
    """A tiny target that has learned to answer any 4-token prompt with 10, 11, .., 29."""
    torch.manual_seed(0)
    model = make_model(seed=0, vocab_size=32, block_size=32)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        x = torch.cat([torch.randint(10, (16, PROMPT_LEN)), torch.tensor(ANSWER).repeat(16, 1)], 1)
        _, loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


def mean_tokens_per_forward(model, prompts, n):
    tokens = forwards = 0
    for p in prompts:
        out, stats = jacobi_decode(model, p, len(ANSWER), n)
        assert torch.equal(out, greedy_decode(model, p, len(ANSWER)))  # exact, always
        tokens, forwards = tokens + stats.tokens, forwards + stats.forwards
    return tokens / forwards


def test_distillation_raises_tokens_per_forward():
    target = pretrain_target()
    g = torch.Generator().manual_seed(1)
    held_out = [torch.randint(10, (PROMPT_LEN,), generator=g) for _ in range(8)]
    assert greedy_decode(target, held_out[0], len(ANSWER)).tolist() == ANSWER
    n, cfg = 8, CLLMConfig(n=8, ar_weight=1.0, ar_target="fixed_point", states_per_block=1)
    before = mean_tokens_per_forward(target, held_out, n)
    train_prompts = [torch.randint(10, (PROMPT_LEN,), generator=g) for _ in range(32)]
    trajs = collect_trajectories(target, train_prompts, n, len(ANSWER), seeds=list(range(32)))
    records = [dict(prompt=p, answer=None, states=[b.states for b in t])
               for p, t in zip(train_prompts, trajs)]
    cllm = copy.deepcopy(target)  # the CLLM starts from the target's weights
    cllm.train()
    opt = torch.optim.AdamW(cllm.parameters(), lr=3e-3)
    for step in range(60):
        batch = [records[i] for i in torch.randint(32, (8,), generator=g).tolist()]
        rows = [pack_row(r, c, cfg, 32) for r, c in zip(batch, train_cllm.choose_states(batch, cfg, g))]
        loss, l_c, l_ar = train_cllm.distillation_loss(cllm, collate(rows, "cpu"), cfg)
        loss.backward()
        opt.step()
        opt.zero_grad()
    cllm.eval()
    after = mean_tokens_per_forward(cllm, held_out, n)
    assert greedy_decode(cllm, held_out[0], len(ANSWER)).tolist() == ANSWER  # quality kept
    assert after > before + 0.5, (before, after)


# ----------------------------------------------------------------------------------------------
# the whole script on a tiny arith slice: trajectory file reuse and refusal, resume

def cllm_args(data, target, out_dir, **overrides):
    return settings(dict(dataset=data, target_dir=target, out_dir=out_dir, n=4, num_prompts=12,
                         traj_max_new_tokens=16, collect_batch=5, batch_size=4, max_iters=4,
                         eval_interval=2, val_prompts=2, max_new_tokens=16, test_prompts=2,
                         log_interval=1, warmup_iters=1, repeat_limit=1000, guard_patience=0,
                         force=True),  # (the tiny target has learned nothing: the check would refuse it)
                    **overrides)


def test_pipeline_reuses_and_refuses_trajectories_and_resumes(tiny_target, tmp_path, capsys, monkeypatch):
    """The whole script: collection, distillation, the table. A run stopped at 4 steps (at an
    evaluation, as by a kill after it) and one stopped by Ctrl-C at step 3 (between evaluations),
    each resumed to 6, reuse their trajectories and end with the weights and curve of a straight
    run to 6; a fresh start in its folder and a resume with other trajectory settings are refused."""
    data, target = tiny_target
    out = str(tmp_path / "cllm")
    results = train_cllm.main(cllm_args(data, target, out, lr_decay_iters=6))
    log = capsys.readouterr().out
    assert "collect: batches 3/3" in log and "iter 4: loss" in log and "| CLLM |" in log
    readme = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")).read()
    ended = readme.split("and ended with:\n\n```\n")[1].split("```")[0].splitlines()  # the README's end of a run
    assert ended[0] in log.splitlines()  # the table's header, as the README shows it
    assert log.splitlines()[-1].startswith(ended[-1][:len("training curve (val prompts): 0.0 min: ")])
    assert results["CLLM"]["Jacobi n=4"]["exact"] == "2/2" == results["target"]["Jacobi n=4"]["exact"]
    assert "quality_within_tolerance" in results["CLLM"]["AR"]
    straight = str(tmp_path / "straight")  # (the same trajectories: no second collection)
    os.makedirs(straight)
    shutil.copy(os.path.join(out, "trajectories.pt"), straight)
    train_cllm.main(cllm_args(data, target, out, init_from="resume", max_iters=6, lr_decay_iters=6,
                              test_prompts=0))
    log = capsys.readouterr().out
    assert "reusing" in log and "iter 6: loss" in log and "iter 4: loss" not in log
    with pytest.raises(ValueError, match="already holds a run.*--init_from=resume"):
        train_cllm.main(cllm_args(data, target, out))  # a fresh start would overwrite the run
    with pytest.raises(ValueError, match="does not match this run.*'n': \\(4, 8\\)"):
        train_cllm.main(cllm_args(data, target, out, n=8, init_from="resume"))
    train_cllm.main(cllm_args(data, target, straight, max_iters=6, lr_decay_iters=6, test_prompts=0))
    stopped = str(tmp_path / "stopped")  # Ctrl-C at step 3, between the evaluations at 2 and 4
    os.makedirs(stopped)
    shutil.copy(os.path.join(out, "trajectories.pt"), stopped)
    args = lambda **kw: cllm_args(data, target, stopped, max_iters=6, lr_decay_iters=6, test_prompts=0, **kw)
    capsys.readouterr()
    with monkeypatch.context() as m:
        signal_at_step(m, train_cllm, 3, signal.SIGINT)
        with pytest.raises(SystemExit) as stop:
            train_cllm.main(args())
    assert stop.value.code == 130
    log = capsys.readouterr().out
    assert "iter 3: loss" in log and "iter 4: loss" not in log
    assert log.splitlines()[-1].startswith("SIGINT: stopped at iteration 3 of 6, saved in ")
    assert log.splitlines()[-1].endswith(" --init_from=resume")
    train_cllm.main(args(init_from="resume"))
    first = str(tmp_path / "first")  # a run that ends right after its first evaluation: last.pt at 0
    os.makedirs(first)
    shutil.copy(os.path.join(out, "trajectories.pt"), first)
    train_cllm.main(cllm_args(data, target, first, max_iters=0, lr_decay_iters=6, test_prompts=0))
    assert torch.load(f"{first}/last.pt", weights_only=False)["iter_num"] == 0
    train_cllm.main(cllm_args(data, target, first, init_from="resume", max_iters=6, lr_decay_iters=6,
                              test_prompts=0))
    capsys.readouterr()
    with pytest.raises(ValueError, match="has no last.pt to resume from: start afresh, without --init_from"):
        train_cllm.main(cllm_args(data, target, str(tmp_path / "nothing"), init_from="resume"))
    assert capsys.readouterr().out == ""  # (refused before any work)
    a = torch.load(f"{straight}/last.pt", weights_only=False)
    for run in (out, stopped, first):
        b = torch.load(f"{run}/last.pt", weights_only=False)
        assert a["iter_num"] == b["iter_num"] == 6
        assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
        assert [c["tokens_per_forward"] for c in a["curve"]] == [c["tokens_per_forward"] for c in b["curve"]]


def test_a_round_goes_on_from_the_previous_rounds_cllm(tiny_target, tmp_path):
    """--previous_round, Jacobi Forcing's progressive rounds: the previous round's CLLM collects
    this round's trajectories and is its starting point (at learning rate 0 the weights stay its
    own), while the curve's first point is still the target's, and is the target if kept. A
    folder that holds no CLLM of this target is refused."""
    from common import fingerprint, load_checkpoint
    data, target = tiny_target
    round1, out = str(tmp_path / "round1"), str(tmp_path / "round2")
    train_cllm.main(cllm_args(data, target, round1, max_iters=2, test_prompts=0))
    shutil.copy(os.path.join(round1, "last.pt"), os.path.join(round1, "ckpt.pt"))  # (not the target)
    previous = load_checkpoint(os.path.join(round1, "ckpt.pt"))[0]
    args = cllm_args(data, target, out, previous_round=round1, max_iters=1, learning_rate=0.0,
                     min_lr=0.0, test_prompts=0)
    train_cllm.main(args)
    meta = torch.load(os.path.join(out, "trajectories.pt"), weights_only=False)["meta"]
    assert meta["target"] == fingerprint(previous.state_dict())
    last = torch.load(os.path.join(out, "last.pt"), weights_only=False)
    assert all(torch.equal(v, last["model"][k]) for k, v in previous.state_dict().items())
    point0 = torch.load(os.path.join(round1, "ckpt.pt"), weights_only=False)["curve"][0]
    assert {k: last["curve"][0][k] for k in point0 if k != "train_minutes"} == \
        {k: v for k, v in point0.items() if k != "train_minutes"}  # the target's evaluation, again
    first = torch.load(os.path.join(out, "ckpt.pt"), weights_only=False)  # point 0 kept: the target
    target_weights = load_checkpoint(os.path.join(target, "ckpt.pt"))[0].state_dict()
    assert first["iter_num"] == 0 and all(torch.equal(v, first["model"][k]) for k, v in target_weights.items())
    with pytest.raises(ValueError, match="was not distilled from"):
        train_cllm.main(cllm_args(data, target, str(tmp_path / "r"), previous_round=target))


def test_two_micro_steps_are_one_step_on_the_whole_batch(tiny_target, tmp_path, monkeypatch):
    """grad_accum=2 packs the batch in two halves, each loss weighted by its share of the batch's
    positions: the gradient of the step, and the weights after it, are those of one step on the
    whole batch, up to float32 rounding (the same terms added in another grouping: a relative
    ~1e-7 of the gradient; we allow 1e-5 of each tensor's largest entry). AdamW's first update
    moves a weight by about lr: a step that differs, by a wrongly weighted half or a gradient
    scaled by 2 (which AdamW hides: it divides by the gradient's RMS), fails at once."""
    data, target = tiny_target
    grads, step = [], train_cllm.optimizer_step

    def recording(model, optimizer, grad_clip):
        grads.append([p.grad.clone() for p in model.parameters()])
        step(model, optimizer, grad_clip)
    monkeypatch.setattr(train_cllm, "optimizer_step", recording)
    for accum in (1, 2):
        out = tmp_path / f"accum{accum}"
        if accum == 2:  # the same trajectories
            os.makedirs(out)
            shutil.copy(tmp_path / "accum1" / "trajectories.pt", out)
        train_cllm.main(cllm_args(data, target, str(out), max_iters=1, grad_accum=accum,
                                  val_prompts=1, test_prompts=0))
    assert len(grads) == 2
    for whole, halves in zip(*grads):
        torch.testing.assert_close(halves, whole, rtol=0, atol=1e-5 * whole.abs().max().item())
    a = torch.load(tmp_path / "accum1" / "last.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "accum2" / "last.pt", weights_only=False)["model"]
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-5)  # 1% of the update, lr 1e-3


def test_bad_settings(tiny_target, tmp_path):
    data, target = tiny_target
    with pytest.raises(ValueError, match="consistency must be one of"):
        train_cllm.main(cllm_args(data, target, str(tmp_path), consistency="both"))
    with pytest.raises(FileNotFoundError, match="is not prepared"):
        train_cllm.main([f"--dataset={tmp_path / 'nodata'}"])


# ----------------------------------------------------------------------------------------------
# the quality guard and the verdict

TOLERANCE = dict(answer_loss=0.05, quality=0.05, repeated=0.05)


def point(tpf, loss, quality=None, repeated=0.0):
    return dict(tokens_per_forward=tpf, answer_loss=loss, quality=quality, repeated=repeated)


def test_guard_keeps_the_best_acceptable_point_and_stops_a_collapse():
    # a text run: tokens/forward soars while the answer loss climbs and the outputs repeat
    curve = [point(1.0, 4.10), point(1.8, 4.13), point(2.4, 4.14, repeated=0.20), point(4.9, 4.30, repeated=0.9),
             point(5.8, 4.45, repeated=0.9), point(5.9, 4.58, repeated=0.94)]
    verdicts = [guard(curve[:k], TOLERANCE, patience=3) for k in range(1, len(curve) + 1)]
    assert [v[0] for v in verdicts] == [0, 1, 1, 1, 1, 1]  # 2.4 repeats too much, the rest loses quality
    assert [v[2] for v in verdicts] == [False] * 4 + [True] * 2  # three bad in a row, loss rising
    assert "answer loss 4.580 vs the target's 4.100" in verdicts[-1][1][0]


def test_guard_on_the_curves_of_two_real_runs():
    """The arith default (a 2-core AMD EPYC): four evaluations outside the tolerance while the accuracy
    recovers, never a stop. Bible text with the default settings: the answer loss hardly moves
    while the repetitive outputs rise 74% -> 92% -> 98%: stopped at the third."""
    arith = [point(1.11, 0.023, 0.78), point(1.72, 0.072, 0.44, 0.06), point(2.19, 0.057, 0.52),
             point(2.75, 0.052, 0.56), point(3.62, 0.033, 0.62), point(4.12, 0.022, 0.80),
             point(4.27, 0.023, 0.78)]
    assert not any(guard(arith[:k], TOLERANCE, 3)[2] for k in range(1, len(arith) + 1))
    assert guard(arith, TOLERANCE, 3)[0] == 6
    text = [point(1.03, 3.551), point(2.19, 3.679, repeated=0.74), point(2.38, 3.700, repeated=0.92),
            point(2.99, 3.674, repeated=0.98)]
    assert [guard(text[:k], TOLERANCE, 3)[2] for k in range(1, 5)] == [False, False, False, True]
    assert guard(text, TOLERANCE, 3)[0] == 0  # nothing beat the target within the tolerance


def test_the_stop_line_says_what_collapsed_and_what_to_try():
    at = lambda i, p: dict(p, iter=i)
    text = [at(0, point(1.03, 3.551)), at(600, point(2.99, 3.674, repeated=0.98))]
    weak = stop_line(text, 3, TOLERANCE)
    assert weak.startswith("stopped at iteration 600: 3 evaluations in a row")
    assert "repeat themselves, and the target is weak (answer loss 3.55)" in weak and "prompt lookup" in weak
    competent = [at(0, point(1.1, 0.02, 0.8)), at(400, point(3.0, 0.02, 0.8, repeated=0.3))]
    assert stop_line(competent, 3, TOLERANCE).endswith(
        "the outputs repeat themselves. Try a higher ar_weight or a lower learning_rate.")
    worse = [at(0, point(1.1, 0.02, 0.8)), at(400, point(3.0, 0.30, 0.5))]
    assert stop_line(worse, 3, TOLERANCE).endswith(
        "not recovering. Try a lower learning_rate or max_iters, or a higher ar_weight.")
    assert all(line.count(". ") <= 2 for line in (weak, stop_line(worse, 3, TOLERANCE)))  # two sentences


def test_guard_waits_out_a_dip_that_recovers():
    # arith: accuracy dips early, the answer loss falls back as the learning rate decays
    curve = [point(1.1, 0.023, 0.78), point(1.4, 0.129, 0.24), point(1.8, 0.073, 0.50),
             point(1.9, 0.056, 0.50), point(2.3, 0.045, 0.48), point(4.1, 0.030, 0.80)]
    best, problems, stop = guard(curve, TOLERANCE, patience=3)
    assert best == 5 and problems == [] and not stop
    assert not any(guard(curve[:k], TOLERANCE, 3)[2] for k in range(1, 6))


def test_verdict_of_a_faster_but_worse_model():
    from extras.quality import verdict
    from extras.table import markdown_table
    row = lambda tpf, speedup, loss, rep: dict(tokens_per_forward=tpf, tokens_per_s=1.0, speedup=speedup,
                                              exact="9/9", forward_cost=1.4, quality=None,
                                              answer_loss=loss, repeated=rep)
    results = {"target": {"AR": row(1.0, 1.0, 4.129, 0.02), "Jacobi n=16": row(1.01, 0.70, 4.129, 0.02)},
               "CLLM": {"AR": row(1.0, 1.0, 4.584, 0.60), "Jacobi n=16": row(4.93, 3.62, 4.584, 0.60)}}
    lines = verdict(results, TOLERANCE)
    assert lines[1].startswith("CLLM Jacobi n=16: 3.62x its own AR at 4.93 tokens/forward, but quality fell")
    assert "not a usable speedup" in lines[1]
    assert "does not pay here" in lines[0] and "answer loss 4.13" in lines[0]
    table = markdown_table(results, None, TOLERANCE)
    assert table.count("(quality fell)") == 2  # both CLLM rows, none of the target's


def test_a_collapsing_run_says_so_instead_of_reporting_a_speedup(tiny_target, tmp_path, capsys):
    """An absurd learning rate wrecks the model at once: the guard stops the run long before its
    end (the answer loss of a wrecked model jumps about; it only has to stop falling for two
    evaluations), and the table is made with the last acceptable model, the target itself.
    Resumed with the same settings, it trains no further (the guard, run on the saved curve,
    stops it at once), and ckpt.pt stays the target."""
    data, target = tiny_target
    args = lambda **kw: cllm_args(data, target, str(tmp_path / "cllm"), learning_rate=3.0, min_lr=3.0,
                                  max_iters=60, eval_interval=2, guard_patience=2, val_prompts=4, **kw)
    results = train_cllm.main(args())
    log = capsys.readouterr().out
    assert "stopped at iteration" in log and "not recovering" in log
    assert "no distilled model beat the target within the tolerance" in log
    assert "iter 60: loss" not in log
    assert results["CLLM"]["AR"]["answer_loss"] == results["target"]["AR"]["answer_loss"]
    saved = json.loads((tmp_path / "cllm" / "results.json").read_text())
    assert saved["verdict"] and all(line in log for line in saved["verdict"])  # the printed verdict
    kept = torch.load(tmp_path / "cllm" / "ckpt.pt", weights_only=False)
    stopped_at = torch.load(tmp_path / "cllm" / "last.pt", weights_only=False)["curve"]
    train_cllm.main(args(init_from="resume", test_prompts=0))
    log = capsys.readouterr().out
    assert "was stopped by the guard: stopped at iteration" in log and "no distilled model beat" in log
    assert not re.search(r"^iter \d+: loss", log, re.M)  # not one more step of the wrecked model
    curve = torch.load(tmp_path / "cllm" / "last.pt", weights_only=False)["curve"]
    assert curve == stopped_at  # the evaluations before the stop, kept, none added
    again = torch.load(tmp_path / "cllm" / "ckpt.pt", weights_only=False)
    assert again["iter_num"] == kept["iter_num"] == 0
    assert all(torch.equal(again["model"][k], kept["model"][k]) for k in kept["model"])
