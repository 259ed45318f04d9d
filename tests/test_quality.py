# Tests of extras/quality.py against answers worked out independently: the answer loss against
# one forward per answer token on a tiny model, and the verdict lines against the README's run.
# Run: python -m pytest -q tests/test_quality.py
import pytest
import torch
import torch.nn.functional as F

from extras.quality import QUALITY_TOLERANCE, answer_loss, verdict


class Numbers:
    """An "encoding" of numbers written as text: "3 1 4" is the tokens 3, 1, 4; EOS is 49."""
    eot_token = 49

    @staticmethod
    def encode_ordinary(text):
        return [int(t) for t in text.split()]


def numbers(tokens):
    return " ".join(map(str, tokens))


# ----------------------------------------------------------------------------------------------
# the answer loss

def test_answer_loss_is_the_mean_loss_of_the_answer_tokens_and_eos(tiny):
    """answer_loss takes one forward per record and masks the prompt; here the same number is
    made token by token: -log p(token | everything before it) for each answer token and the EOS
    after it, one forward per token, averaged over all of them. A record whose prompt is longer
    than generation keeps (64 - 16 = 48 tokens) is cropped from the left, and the sequence stops
    where the context (64) does."""
    g = torch.Generator().manual_seed(0)
    short = (torch.randint(49, (5,), generator=g).tolist(), torch.randint(49, (3,), generator=g).tolist())
    long = (torch.randint(49, (60,), generator=g).tolist(), torch.randint(49, (20,), generator=g).tolist())
    records = [dict(prompt=numbers(p), answer=numbers(a)) for p, a in (short, long)]
    nll = []
    for prompt, answer, keep in ((*short, 5), (*long, 48)):
        seq = prompt[-keep:] + answer + [Numbers.eot_token]
        for i in range(keep, min(len(seq), 64 + 1)):  # seq[i] given seq[:i], at most 64 tokens
            with torch.no_grad():
                logits, _ = tiny(torch.tensor(seq[:i])[None])
            nll.append(-F.log_softmax(logits[0, -1], -1)[seq[i]].item())
    assert len(nll) == 4 + 17  # 3 answer tokens + EOS; 64 - 48 + 1 positions of the long one
    got = answer_loss(tiny, Numbers, records, max_new_tokens=16, device="cpu")
    assert got == pytest.approx(sum(nll) / len(nll), rel=1e-5)


# ----------------------------------------------------------------------------------------------
# the verdict under the table

def row(speedup, tpf, loss, quality, forward_cost=1.0, repeated=0.0):
    return dict(speedup=speedup, tokens_per_forward=tpf, answer_loss=loss, quality=quality,
                repeated=repeated, forward_cost=forward_cost)


# the default run of the README (a 2-core Xeon), the numbers of its table
README_RUN = {
    "target": {"AR": row(1.0, 1.0, 0.0199, 0.760), "Jacobi n=16": row(0.79, 1.10, 0.0199, 0.760, 1.38)},
    "CLLM": {"AR": row(1.0, 1.0, 0.0158, 0.855), "Jacobi n=16": row(2.72, 4.23, 0.0158, 0.855, 1.55),
             "sliding window 2x16": row(3.05, 5.89, 0.0158, 0.855, 1.92)},
}


def test_verdict_of_the_readme_run():
    """The two lines the README shows under its table: the target does not pay and should be
    distilled; the CLLM's fastest method pays, quality kept."""
    assert verdict(README_RUN) == [
        "target Jacobi n=16: 0.79x its own AR at 1.10 tokens/forward: does not pay here, a forward "
        "costs 1.38x one of AR's. Try: distil it (python train_cllm.py).",
        "CLLM sliding window 2x16: 3.05x its own AR at 5.89 tokens/forward, quality kept: it pays here."]


def cllm_line(speedup, loss, quality=0.855):
    """The verdict on a CLLM row of the README run, changed."""
    results = {"target": README_RUN["target"],
               "CLLM": {"AR": row(1.0, 1.0, loss, quality), "Jacobi n=16": row(speedup, 3.0, loss, quality, 1.5)}}
    return verdict(results)[1]


def test_verdict_on_either_side_of_its_thresholds():
    """It pays when faster than its own AR (speedup > 1) with quality within the tolerance of the
    target's: an answer loss 0.04 above the target's is within, 0.06 is not; speedup 1.00 is not
    faster."""
    assert cllm_line(1.2, 0.0199 + 0.04).endswith("quality kept: it pays here.")
    assert "but quality fell (answer loss 0.080 vs the target's 0.020)" in cllm_line(1.2, 0.0199 + 0.06)
    assert "but quality fell (quality 0.700 vs the target's 0.760)" in cllm_line(1.2, 0.0199, 0.70)
    assert cllm_line(1.0, 0.0199).endswith(
        ": does not pay here, a forward costs 1.50x one of AR's. Try: distil longer, use a smaller n, "
        "or a larger target on a GPU.")


def test_verdict_on_a_weak_target():
    """A target with an answer loss above 1 nat has little to accelerate: train it first."""
    results = {"target": {"AR": row(1.0, 1.0, 3.55, None), "Jacobi n=16": row(0.7, 1.03, 3.55, None, 1.4)}}
    assert verdict(results, QUALITY_TOLERANCE) == [
        "target Jacobi n=16: 0.70x its own AR at 1.03 tokens/forward: does not pay here, a forward "
        "costs 1.40x one of AR's. Try: train a better target first (answer loss 3.55: little to "
        "accelerate)."]


# ----------------------------------------------------------------------------------------------
# the judge: a paired comparison on the same prompts, a 1-point tolerance

def test_paired_comparison_counts_and_standard_error():
    """Worked by hand: 10 prompts, the model loses prompts 1 and 7 and gains prompt 4. The
    differences are 0 seven times, -1 twice, +1 once: mean -0.1, sample variance
    (7 * 0.01 + 2 * 0.81 + 1.21) / 9 = 0.32222, standard error sqrt(0.32222 / 10) = 0.17951."""
    from extras.quality import paired, paired_line
    base = [1, 1, 1, 1, 0, 0, 1, 1, 1, 1]
    model = [1, 0, 1, 1, 1, 0, 1, 0, 1, 1]
    pair = paired(base, model)
    assert (pair["prompts"], pair["lost"], pair["gained"]) == (10, 2, 1)
    assert pair["change"] == pytest.approx(-0.1) and pair["se"] == pytest.approx(0.17951, abs=1e-5)
    assert paired_line(pair) == ("2 of 10 prompts right by the target and wrong by the model, 1 the "
                                 "reverse: -10.0 points +- 18.0 (one standard error)")
    with pytest.raises(ValueError):
        paired(base, model[:-1])  # not the same prompts


def verdict_of(target, cllm, control=None, loss=0.001):
    results = {"target": {"AR": row(1.0, 1.0, loss, target), "Jacobi n=16": row(0.8, 1.1, loss, target, 1.4)},
               "CLLM": {"AR": row(1.0, 1.0, loss, cllm), "Jacobi n=16": row(2.5, 4.0, loss, cllm, 1.6)}}
    if control is not None:
        results["control"] = {"AR": row(1.0, 1.0, loss, control), "Jacobi n=16": row(0.8, 1.1, loss, control, 1.4)}
    return verdict(results)[1]


def test_the_verdict_sees_a_two_point_loss():
    """The default rule (QUALITY_TOLERANCE, 1 point): the CLLM 4.8 points below a 0.996 target
    (test prompts, distilled with the old defaults) and one 2 points below lose quality; half a
    point below keeps it. With the AR-only control in the table, the CLLM is judged against it:
    the old shipped CLLM (0.832) gains on its target (0.762) but falls short of its control (0.920)."""
    assert "but quality fell (quality 0.948 vs the target's 0.996)" in verdict_of(0.996, 0.948)
    assert "but quality fell (quality 0.976 vs the target's 0.996)" in verdict_of(0.996, 0.976)
    assert verdict_of(0.996, 0.991).endswith("quality kept: it pays here.")
    assert verdict_of(0.762, 0.832).endswith("quality kept: it pays here.")
    assert "but quality fell (quality 0.832 vs the control's 0.920)" in verdict_of(0.762, 0.832, 0.920)


def test_the_guard_refuses_a_lost_val_prompt():
    """On 50 val prompts one prompt is 2 points: a checkpoint that loses one, on balance, against a
    target that answers all 50, is outside the tolerance however fast it is; one that loses one
    and gains another is within it. The message gives the paired counts."""
    from train_cllm import guard
    target = [1] * 49 + [0]
    lost_one = [0] + [1] * 48 + [0]
    swapped = [0] + [1] * 49
    curve = [dict(tokens_per_forward=1.1, answer_loss=0.001, quality=0.98, repeated=0.0, scores=target),
             dict(tokens_per_forward=3.0, answer_loss=0.002, quality=0.98, repeated=0.0, scores=swapped),
             dict(tokens_per_forward=4.5, answer_loss=0.002, quality=0.96, repeated=0.0, scores=lost_one)]
    best, problems, _ = guard(curve, QUALITY_TOLERANCE, patience=3)
    assert best == 1
    assert problems == ["quality 0.960 vs the target's 0.980 (1 of 50 prompts right by the target and "
                        "wrong by the model, 0 the reverse: -2.0 points +- 2.0 (one standard error))"]
