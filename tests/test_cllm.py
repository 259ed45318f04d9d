# Tests of train_cllm.py: batched trajectory collection, packing, the losses, and distillation
# that measurably raises tokens per forward while Jacobi stays exactly greedy.
# Run: python -m pytest -q tests/test_cllm.py
import pytest
import torch

import train
import train_cllm
from conftest import make_model
from jacobi import greedy_decode, jacobi_decode
from train_cllm import (CLLMConfig, collate, collect_trajectories, consistency_loss,
                        consistency_mask, consistency_target, pack_row)


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


def test_local_and_global_targets():
    states = torch.tensor([[5, 5, 5], [1, 5, 5], [1, 2, 5], [1, 2, 3]])
    assert consistency_target(states, 0, "global") == 3
    assert consistency_target(states, 1, "global") == 3
    assert consistency_target(states, 0, "local") == 1
    assert consistency_target(states, 2, "local") == 3
    with pytest.raises(ValueError, match="global' or 'local"):
        consistency_target(states, 0, "both")


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
        tokens, stats = jacobi_decode(model, prompt, 40, n, eos_id, seed=i, return_trajectory=True)
        assert len(blocks) == len(stats.trajectory)
        for a, b in zip(blocks, stats.trajectory):
            assert torch.equal(a.prefix, b.prefix) and torch.equal(a.states, b.states)
        out = torch.cat([b.fixed_point for b in blocks]) if blocks else tokens[:0]
        assert torch.equal(out, greedy_decode(model, prompt, 40, eos_id))


# ----------------------------------------------------------------------------------------------
# packing: one forward of a packed row == separate forwards

def fake_states(g, b, S, vocab=50):
    """States of one block: S random states, then a fixed point."""
    return torch.randint(vocab, (S + 1, b), generator=g)


@pytest.mark.parametrize("kind,ar_target", [("global", "fixed_point"), ("local", "fixed_point"),
                                            ("global", "ground_truth")])
def test_packed_row_equals_separate_forwards(tiny, kind, ar_target):
    g = torch.Generator().manual_seed(3)
    prompt = torch.randint(50, (6,), generator=g)
    states = [fake_states(g, 5, 1), fake_states(g, 5, 3), fake_states(g, 3, 2)]
    choices = [[0], [len(states[1]) - 2, 0], []]
    answer = torch.randint(50, (9,), generator=g)
    cfg = CLLMConfig(consistency=kind, ar_target=ar_target)
    row = pack_row(prompt, states, choices, answer, cfg, context=64)
    tokens, positions, attn, labels, s_cols, t_cols, = row
    packed, _ = tiny(tokens[None], input_pos=positions, attn_mask=attn[None])
    packed = packed[0]
    fixed = [s[-1] for s in states]
    main = torch.cat([prompt, *fixed])
    main_logits, _ = tiny(main[None])
    torch.testing.assert_close(packed[:len(main)], main_logits[0], atol=1e-5, rtol=0)
    # every student column equals a separate forward of prefix + state, and its teacher column a
    # separate forward of prefix + target state, at the same block position
    expected_s, expected_t = [], []
    for k, j in ((k, j) for k, picks in enumerate(choices) for j in picks):
        s = states[k]
        prefix = torch.cat([prompt, *fixed[:k]])
        t = consistency_target(s, j, kind)
        alone_s, _ = tiny(torch.cat([prefix, s[j]])[None])
        alone_t, _ = tiny(torch.cat([prefix, s[t]])[None])
        cols = torch.arange(len(s[j]) - 1)[consistency_mask(s[j], s[t])]
        expected_s.append(alone_s[0, len(prefix) + cols])
        expected_t.append(alone_t[0, len(prefix) + cols])
    torch.testing.assert_close(packed[s_cols], torch.cat(expected_s), atol=1e-5, rtol=0)
    torch.testing.assert_close(packed[t_cols], torch.cat(expected_t), atol=1e-5, rtol=0)
    # AR labels: the fixed points after the prompt, or the ground truth in its own segment
    labelled = labels[labels != -1]
    if ar_target == "fixed_point":
        assert torch.equal(labelled, torch.cat(fixed))
    else:
        assert torch.equal(labelled, answer)
        gt_start = len(main)
        alone, _ = tiny(torch.cat([prompt, answer])[None])
        torch.testing.assert_close(packed[gt_start:gt_start + len(answer)], alone[0, len(prompt):],
                                   atol=1e-5, rtol=0)


def test_collate_pads_without_nans(tiny):
    g = torch.Generator().manual_seed(4)
    cfg = CLLMConfig()
    rows = [pack_row(torch.randint(50, (L,), generator=g), [fake_states(g, 4, 1)], [[0]],
                     torch.tensor([1, 2]), cfg, 64) for L in (3, 12)]
    tokens, positions, attn, labels, student, teacher = collate(rows, "cpu")
    logits, _ = tiny(tokens, input_pos=positions, attn_mask=attn)
    assert torch.isfinite(logits).all()
    assert (labels[0, len(rows[0][0]):] == -1).all()
    assert student[:, 0].tolist() == [0] * len(rows[0][4]) + [1] * len(rows[1][4])


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
    n, cfg = 8, CLLMConfig(n=8, ar_weight=1.0, ar_target="fixed_point")
    before = mean_tokens_per_forward(target, held_out, n)
    train_prompts = [torch.randint(10, (PROMPT_LEN,), generator=g) for _ in range(32)]
    trajs = collect_trajectories(target, train_prompts, n, len(ANSWER), seeds=list(range(32)))
    records = [dict(prompt=p, answer=None, states=[b.states for b in t])
               for p, t in zip(train_prompts, trajs)]
    cllm = pretrain_target()  # the same weights as the target
    cllm.load_state_dict(target.state_dict())
    cllm.train()
    opt = torch.optim.AdamW(cllm.parameters(), lr=3e-3)
    for step in range(60):
        batch = [records[i] for i in torch.randint(32, (8,), generator=g).tolist()]
        rows = [pack_row(r["prompt"], r["states"], c, r["answer"], cfg, 32)
                for r, c in zip(batch, train_cllm.sample_choices(batch, 1, g))]
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
    args = dict(dataset=data, target_dir=target, out_dir=out_dir, n=4, num_prompts=12,
                traj_max_new_tokens=16, collect_batch=5, batch_size=4, max_iters=4,
                eval_interval=2, eval_prompts=2, max_new_tokens=16, final_prompts=2,
                log_interval=1, warmup_iters=1, repeat_limit=1000)
    args.update(overrides)
    return [f"--{k}={v}" for k, v in args.items()]


def test_pipeline_reuses_and_refuses_trajectories_and_resumes(tiny_target, tmp_path, capsys):
    data, target = tiny_target
    out = str(tmp_path / "cllm")
    results = train_cllm.main(cllm_args(data, target, out))
    log = capsys.readouterr().out
    assert "collect: prompts 12/12" in log and "iter 4: loss" in log and "| CLLM |" in log
    assert results["CLLM"]["Jacobi n=4"]["exact"] == "2/2" == results["target"]["Jacobi n=4"]["exact"]
    train_cllm.main(cllm_args(data, target, out, init_from="resume", max_iters=6))
    log = capsys.readouterr().out
    assert "reusing" in log and "iter 6: loss" in log and "iter 4: loss" not in log
    with pytest.raises(ValueError, match="does not match this run.*'n': \\(4, 8\\)"):
        train_cllm.main(cllm_args(data, target, out, n=8))
    straight = str(tmp_path / "straight")
    train_cllm.main(cllm_args(data, target, straight, max_iters=6, lr_decay_iters=6))
    split = str(tmp_path / "split")
    train_cllm.main(cllm_args(data, target, split, max_iters=4, lr_decay_iters=6))
    train_cllm.main(cllm_args(data, target, split, max_iters=6, lr_decay_iters=6, init_from="resume"))
    a = torch.load(f"{straight}/ckpt.pt", weights_only=False)["model"]
    b = torch.load(f"{split}/ckpt.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_settings(tiny_target, tmp_path):
    data, target = tiny_target
    with pytest.raises(ValueError, match="consistency must be one of"):
        train_cllm.main(cllm_args(data, target, str(tmp_path), consistency="both"))
    with pytest.raises(FileNotFoundError, match="is not prepared"):
        train_cllm.main([f"--dataset={tmp_path / 'nodata'}"])
