"""
Extra (a learner may skip it): how good a model's outputs are, measured in one place, and what
the quality guard (train_cllm.guard) says in words.

- answer_loss: the held-out loss of the answers given their prompts (every dataset has it).
- greedy_quality: the task's own score of greedy outputs (accuracy, parse rate, exact match).
- evaluate: a CLLM during distillation: Jacobi tokens per forward, quality, repetition, loss.
- unfit_target: whether a target has learned its task well enough to be worth distilling.
- paired: a model against its target on the same prompts: the prompts it loses and gains.
- quality_problems, stop_line: why an evaluation is not acceptable, in words, and the line a
  collapsing run stops with (train_cllm.guard is the rule that uses them).
- verdict: one line per model under the final table.

The measurements behind the tolerances and the advice are in docs/own-data.md.
"""

import time

import torch
import torch.nn.functional as F

from common import decode_text, prompt_budget
from data.common import score
from extras.decoders import sliding_window_jacobi_decode
from jacobi import greedy_decode, jacobi_decode, longest_run

# how far a CLLM's quality may fall below its target's and its speedup still count as usable
QUALITY_TOLERANCE = dict(answer_loss=0.05,  # nats of held-out answer loss more than the target's
                         quality=0.01,      # accuracy / parse rate / exact match less (1 point;
                                            # on 50 prompts no prompt may be lost on balance)
                         repeated=0.05)     # more of the outputs repeating a token REPEAT_LIMIT times
REPEAT_LIMIT = 10
WEAK_ANSWER_LOSS = 1.0  # nats per answer token: above it a model is not competent at its task
QUALITY_NAMES = {"accuracy": "accuracy", "parse": "parse rate", "exact": "exact match", "loss": None}


def tolerance_of(settings):
    """The quality tolerance of a distillation run from its settings (train_cllm.py's
    max_loss_rise, max_quality_drop, max_repeat_rise), QUALITY_TOLERANCE where one is missing."""
    names = dict(answer_loss="max_loss_rise", quality="max_quality_drop", repeated="max_repeat_rise")
    return {k: settings.get(names[k], v) for k, v in QUALITY_TOLERANCE.items()}


@torch.no_grad()
def answer_loss(model, enc, records, max_new_tokens, device):
    """Mean cross-entropy of the answers (and their end-of-text) given their prompts, cropped as
    generation crops them: the held-out loss that any dataset has, checkable answer or not."""
    model.eval()
    total, count = 0.0, 0
    for r in records:
        prompt = enc.encode_ordinary(r["prompt"])[-prompt_budget(model.config.block_size, max_new_tokens):]
        ids = (prompt + enc.encode_ordinary(r["answer"]) + [enc.eot_token])[:model.config.block_size + 1]
        x, y = torch.tensor(ids[:-1], device=device), torch.tensor(ids[1:], device=device)
        y[:len(prompt) - 1] = -1  # no loss on the prompt itself
        logits, _ = model(x[None])
        total += F.cross_entropy(logits[0].float(), y, ignore_index=-1, reduction="sum").item()
        count += int((y != -1).sum())
    return total / max(count, 1)


def task_scores(metric, records, outputs, enc):
    """The task's score (0 or 1) of each output, in the order of records; None for 'loss'."""
    scores = [score(metric, r, decode_text(enc, out)) for r, out in zip(records, outputs)]
    return scores if scores and scores[0] is not None else None


def mean(scores):
    """The mean of task_scores; None where there are none (metric 'loss')."""
    return sum(scores) / len(scores) if scores else None


def mean_score(metric, records, outputs, enc):
    """The task's score of generated tokens, averaged over records; None for 'loss'."""
    return mean(task_scores(metric, records, outputs, enc))


def paired(base_scores, scores):
    """A model against its target on the same prompts (scores 0/1 per prompt, same order):
    lost = prompts the target gets right and the model wrong, gained = the reverse, change = the
    model's score minus the target's (= (gained - lost) / prompts), se = the standard error of
    that change (of the mean of the paired differences): prompts both get right or both wrong
    add nothing to it, so a paired comparison sees a 1-point change that two unpaired 500-prompt
    accuracies (each +-1.3 points near 0.9) cannot."""
    diffs = [s - b for b, s in zip(base_scores, scores, strict=True)]
    n = len(diffs)
    change = sum(diffs) / n
    var = sum((d - change) ** 2 for d in diffs) / max(n - 1, 1)
    return dict(prompts=n, lost=sum(d < 0 for d in diffs), gained=sum(d > 0 for d in diffs),
                change=change, se=(var / n) ** 0.5)


def paired_line(pair, against="the target"):
    """What a paired comparison says, in words: the counts, the change and how sure it is."""
    return (f"{pair['lost']} of {pair['prompts']} prompts right by {against} and wrong by the model, "
            f"{pair['gained']} the reverse: {100 * pair['change']:+.1f} points +- "
            f"{100 * pair['se']:.1f} (one standard error)")


def repetition_rate(outputs, limit=REPEAT_LIMIT):
    """The share of outputs (token lists) that repeat one token `limit` times in a row."""
    return sum(longest_run(o) >= limit for o in outputs) / max(len(outputs), 1)


@torch.no_grad()
def greedy_quality(model, enc, prompts, records, metric, max_new_tokens):
    """The task's score of greedy generations on records; None for 'loss' or no records."""
    if metric == "loss" or not records:
        return None
    model.eval()
    outputs = [greedy_decode(model, p, max_new_tokens, enc.eot_token) for p in prompts]
    return mean_score(metric, records, outputs, enc)


@torch.no_grad()
def evaluate(model, enc, prompts, records, cfg, metric, device):
    """Jacobi-decode held-out prompts in blocks of cfg.decode_n: tokens per forward (and with the
    sliding window), the task's quality (None where there is none), the share of repetitive
    outputs, the answer loss, and the seconds it took."""
    model.eval()
    t0, tokens, forwards, window_forwards, outputs = time.time(), 0, 0, 0, []
    for p in prompts:
        out, stats = jacobi_decode(model, p, cfg.max_new_tokens, cfg.decode_n, enc.eot_token, cfg.guess)
        tokens, forwards = tokens + stats.tokens, forwards + stats.forwards
        if cfg.blocks:  # the same tokens (exactness), in fewer passes
            window_forwards += sliding_window_jacobi_decode(
                model, p, cfg.max_new_tokens, cfg.decode_n, cfg.blocks, enc.eot_token, cfg.guess)[1].forwards
        outputs.append(out)
    lists = [o.tolist() for o in outputs]
    scores = task_scores(metric, records, outputs, enc)
    return dict(tokens_per_forward=tokens / max(forwards, 1),
                window_tokens_per_forward=tokens / max(window_forwards, 1) if cfg.blocks else None,
                repeated=repetition_rate(lists),
                quality=mean(scores), scores=scores,
                answer_loss=answer_loss(model, enc, records, cfg.max_new_tokens, device),
                ended=sum(enc.eot_token in o for o in lists) / max(len(lists), 1),
                prompts=len(prompts), seconds=round(time.time() - t0, 1))


def unfit_target(point, records, enc, max_new_tokens, metric):
    """The line that refuses to distil a target that has not learned its task, or None. point:
    the target's evaluation on val records. Unfit: no answer right, outputs that do not end where
    the data's do, or an answer loss above WEAK_ANSWER_LOSS; measured: targets at 0.0003 and 0.02 (arith)
    and 0.23 nats (SQL) distilled to 2.5-3x, targets at 2.4-3.6 nats (SQL trained too little,
    Bible text, Python code) got nothing or collapsed (docs/own-data.md)."""
    fits = sum(len(enc.encode_ordinary(r["answer"])) < max_new_tokens for r in records) / max(len(records), 1)
    problems = []
    if point["quality"] == 0:
        problems.append(f"{QUALITY_NAMES[metric]} 0")
    if point["ended"] < fits / 2:
        problems.append(f"{point['ended']:.0%} of its outputs end within {max_new_tokens} tokens, "
                        f"where {fits:.0%} of the answers do")
    if point["answer_loss"] > WEAK_ANSWER_LOSS:
        problems.append(f"answer loss {point['answer_loss']:.2f} nats per token")
    if not problems:
        return None
    return (f"the target has not learned its task ({', '.join(problems)} on {len(records)} val "
            "prompts), and a CLLM only produces the target's own outputs faster. Train it longer, on "
            "more data or larger, or use prompt lookup (python bench.py --lookup); --force distils it "
            "anyway (docs/own-data.md).")


def quality_problems(point, base, tolerance=QUALITY_TOLERANCE, against="target"):
    """Why a model's quality is outside the tolerance of its baseline's (the target's, or the
    AR-only control's): [] when it is within. point, base: dicts with answer_loss, quality (or
    None) and repeated; with the per-prompt scores of both on the same prompts, the message gives
    the paired comparison."""
    problems = []
    eps = 1e-9  # a model exactly at the tolerance (99 of 100 right against 100) is within it
    if point["answer_loss"] > base["answer_loss"] + tolerance["answer_loss"] + eps:
        problems.append(f"answer loss {point['answer_loss']:.3f} vs the {against}'s {base['answer_loss']:.3f}")
    if None not in (point["quality"], base["quality"]) and point["quality"] < base["quality"] - tolerance["quality"] - eps:
        both = point.get("scores") and base.get("scores") and len(point["scores"]) == len(base["scores"])
        problems.append(f"quality {point['quality']:.3f} vs the {against}'s {base['quality']:.3f}"
                        + (f" ({paired_line(paired(base['scores'], point['scores']), 'the ' + against)})"
                           if both else ""))
    if point["repeated"] > base["repeated"] + tolerance["repeated"]:
        problems.append(f"{point['repeated']:.0%} of the outputs repeat a token {REPEAT_LIMIT}+ times "
                        f"vs the {against}'s {base['repeated']:.0%}")
    return problems


BASELINES = ("target", "control")  # the models a CLLM is judged against, not judged themselves


def baseline_of(results):
    """(name, AR row) of the model the verdict judges a CLLM's quality against: the AR-only
    control when the table has one (python bench.py --control_dir=...: it had the same training
    steps without the consistency loss), else the target; (None, None) without either."""
    name = next((n for n in reversed(BASELINES) if n in results), None)
    return name, results[name]["AR"] if name else None


def stop_line(curve, patience, tolerance):
    """The line that ends a collapsing run: what happened and what to try, in two sentences."""
    last, base = curve[-1], curve[0]
    head = (f"stopped at iteration {last['iter']}: {patience} evaluations in a row outside the "
            "quality tolerance and not recovering")
    if last["repeated"] <= base["repeated"] + tolerance["repeated"]:
        return head + ". Try a lower learning_rate or max_iters, or a higher ar_weight."
    if base["answer_loss"] <= WEAK_ANSWER_LOSS:
        return head + ", the outputs repeat themselves. Try a higher ar_weight or a lower learning_rate."
    return (head + f", the outputs repeat themselves, and the target is weak (answer loss "
            f"{base['answer_loss']:.2f}). No setting measured helped such a target: train it better, "
            "or use prompt lookup (docs/own-data.md).")


def describe(point, metric, best, problems):
    """The log line of one evaluation: its numbers and what the guard made of it."""
    q = f"{metric} {point['quality']:.3f}, " if point["quality"] is not None else ""
    window = point["window_tokens_per_forward"]
    window = f" ({window:.2f} sliding window)" if window else ""
    return (f"eval iter {point['iter']}: tokens/forward {point['tokens_per_forward']:.2f}{window}, {q}"
            f"answer loss {point['answer_loss']:.4f}, repetitive {point['repeated']:.0%} on "
            f"{point['prompts']} val prompts ({point['seconds']:.1f}s): "
            + (f"outside the quality tolerance ({'; '.join(problems)})" if problems else
               "the best so far within the quality tolerance: ckpt.pt" if best is None else
               f"acceptable; the best stays iteration {best}"))  # best: None when this point is it


def verdict(results, tolerance=QUALITY_TOLERANCE):
    """One line per model under the table: does its fastest method pay on this machine, at what
    quality, and if not, why and what to try. A CLLM is judged against its target, or against the
    AR-only control when the table has one (baseline_of); one rule, QUALITY_TOLERANCE, in
    bench.py and at the end of train_cllm.py."""
    against, base = baseline_of(results)
    lines = []
    for model_name, methods in results.items():
        name, best = max(((k, s) for k, s in methods.items() if k != "AR"),
                         key=lambda kv: kv[1]["speedup"], default=(None, None))
        if best is None:
            continue
        head = f"{model_name} {name}: {best['speedup']:.2f}x its own AR at {best['tokens_per_forward']:.2f} tokens/forward"
        problems = quality_problems(best, base, tolerance, against) if model_name not in BASELINES and base else []
        if "answer_loss" not in best:
            lines.append(head)
        elif problems:
            lines.append(f"{head}, but quality fell ({'; '.join(problems)}): not a usable speedup. "
                         "Use an earlier checkpoint, a higher ar_weight or a lower learning_rate.")
        elif best["speedup"] > 1:
            lines.append(f"{head}, quality kept: it pays here.")
        else:
            weak = best["answer_loss"] > WEAK_ANSWER_LOSS
            advice = ("train a better target first (answer loss "
                      f"{best['answer_loss']:.2f}: little to accelerate)" if weak else
                      "distil it (python train_cllm.py)" if model_name in BASELINES else
                      "distil longer, use a smaller n, or a larger target on a GPU")
            lines.append(f"{head}: does not pay here, a forward costs {best['forward_cost']:.2f}x one "
                         f"of AR's. Try: {advice}.")
    return lines
