"""
Evaluating a CLLM while it is distilled, and the guard that keeps a speedup from being bought with
quality (train_cllm.py calls these).

- evaluate: Jacobi-decode the val prompts: tokens per forward, the task's quality, the repetition
  rate, and the answer loss (every dataset has that one, free text too).
- guard: read the curve of evaluations: which checkpoint is the CLLM (the most tokens/forward
  within the quality tolerance of the target's), and whether the run is collapsing; stop_line
  says why it stopped.
- report: the held-out table (bench.held_out_comparison) made with the checkpoint the guard chose,
  and results.json.
"""

import json
import os
from dataclasses import asdict

import torch

import train
from bench import (WEAK_ANSWER_LOSS, environment, held_out_comparison, methods_for, quality_problems,
                   verdict)
from data.common import load_records, longest_run, score
from decoders import multiblock_jacobi_decode
from jacobi import jacobi_decode


@torch.no_grad()
def evaluate(model, enc, prompts, records, cfg, metric, max_new_tokens, device):
    """Jacobi-decode held-out prompts: tokens per forward (and with multi-block Jacobi), the task's
    quality (None where there is none), the share of outputs that repeat one token, and the answer
    loss."""
    model.eval()
    tokens = forwards = mb_forwards = repeated = 0
    scores = []
    for p, r in zip(prompts, records):
        out, stats = jacobi_decode(model, p, max_new_tokens, cfg.n, enc.eot_token, cfg.init)
        tokens, forwards = tokens + stats.tokens, forwards + stats.forwards
        if cfg.blocks:  # the same tokens (exactness), in fewer passes
            mb_forwards += multiblock_jacobi_decode(model, p, max_new_tokens, cfg.n, cfg.blocks,
                                                    enc.eot_token, cfg.init)[1].forwards
        repeated += longest_run(out.tolist()) >= cfg.repeat_limit
        scores.append(score(metric, r, train.decode_text(enc, out)))
    return dict(tokens_per_forward=tokens / max(forwards, 1),
                multiblock_tokens_per_forward=tokens / max(mb_forwards, 1) if cfg.blocks else None,
                repeated=repeated / max(len(records), 1),
                quality=sum(scores) / len(scores) if scores and scores[0] is not None else None,
                answer_loss=train.answer_loss(model, enc, records, max_new_tokens, device))


def guard(curve, tolerance, patience):
    """Read the curve of evaluations (curve[0]: the target itself). A point is acceptable when its
    quality is within the tolerance of the target's (bench.quality_problems). Returns (the index
    of the best acceptable point: most tokens/forward, the problems of the last point, whether to
    stop: the last `patience` points were all unacceptable, and over them the answer loss did not
    fall or the share of repetitive outputs rose: a collapse, rather than the dip that
    distillation often makes early and then recovers from)."""
    problems = [quality_problems(point, curve[0], tolerance) for point in curve]
    best = max((i for i, p in enumerate(problems) if not p), key=lambda i: curve[i]["tokens_per_forward"])
    bad = curve[max(i for i, p in enumerate(problems) if not p) + 1:]  # unacceptable, in a row
    stop = 0 < patience <= len(bad) and (bad[-1]["answer_loss"] >= bad[-patience]["answer_loss"] or
                                         bad[-1]["repeated"] > bad[-patience]["repeated"])
    return best, problems[-1], stop


def stop_line(curve, patience, tolerance):
    """The one line that ends a collapsing run: what collapsed, why, and what to try. The advice
    is what was measured on arith and on Bible text (README: "Two data sets nobody here tuned for")."""
    last, base = curve[-1], curve[0]
    line = (f"stopped at iteration {last['iter']}: {patience} evaluations in a row outside the quality "
            "tolerance, with the answer loss not falling or the repetition rising: a collapse")
    if last["repeated"] <= base["repeated"] + tolerance["repeated"]:
        return line + " of quality; lower learning_rate or max_iters, or raise ar_weight"
    if base["answer_loss"] <= WEAK_ANSWER_LOSS:
        return line + " into repetition; raise ar_weight or lower learning_rate"
    return (line + f" into repetition, and the target is weak (answer loss {base['answer_loss']:.2f}): "
            "where the next token cannot be told from the text before it, consistency training teaches "
            "the model to guess past a wrong input token, and on its own text the guess becomes a loop "
            "of frequent tokens. No learning rate, ar_weight, label smoothing, horizon or recipe that "
            "was measured kept it off (README); prompt lookup needs no training, and the data sets where "
            "distillation paid had competent targets")


def describe(point, metric, num_prompts, secs, best, problems):
    """The log line of one evaluation: its numbers and what the guard made of it."""
    q = f"{metric} {point['quality']:.3f}, " if point["quality"] is not None else ""
    mb = point["multiblock_tokens_per_forward"]
    mb = f" ({mb:.2f} multi-block)" if mb else ""
    return (f"eval iter {point['iter']}: tokens/forward {point['tokens_per_forward']:.2f}{mb}, {q}"
            f"answer loss {point['answer_loss']:.4f}, repetitive {point['repeated']:.0%} on "
            f"{num_prompts} val prompts ({secs:.1f}s): "
            + (f"outside the quality tolerance ({'; '.join(problems)})" if problems else
               "the best so far within the quality tolerance: ckpt.pt" if best is None else
               f"acceptable; the best stays iteration {best}"))  # best: None when this point is it


def report(cfg, target, enc, meta, curve, stopped, tolerance, max_new_tokens, device):
    """The held-out table, with the model the guard chose (out_dir/ckpt.pt), and results.json."""
    model, chosen = train.load_checkpoint(os.path.join(cfg.out_dir, "ckpt.pt"), device)
    best = next(c for c in curve if c["iter"] == chosen["iter_num"])
    print(f"\nthe CLLM is ckpt.pt, iteration {chosen['iter_num']}: the most tokens/forward on the val "
          f"prompts ({best['tokens_per_forward']:.2f}) of the evaluations within the quality tolerance"
          + (": no distilled model beat the target within the tolerance, so the 'CLLM' below is the "
             "target itself" if chosen["iter_num"] == 0 else "") + (f"; {stopped}" if stopped else ""))
    test_records = load_records(cfg.dataset, "test")[:cfg.final_prompts]
    results = {}
    if test_records:
        print(f"held-out comparison on {len(test_records)} test prompts "
              f"({environment(device)['device']}, {torch.get_num_threads()} threads):")
        # the target's row of multi-block Jacobi is left out: it is slower than plain Jacobi on an
        # ordinary model and the most expensive row (bench.py --blocks=2 measures it)
        methods = dict(target=methods_for([cfg.n], max_new_tokens, enc.eot_token, 0, cfg.lookup, cfg.init),
                       CLLM=methods_for([cfg.n], max_new_tokens, enc.eot_token, cfg.blocks, cfg.lookup,
                                        cfg.init))
        results, text = held_out_comparison({"target": target, "CLLM": model}, enc, test_records,
                                            meta["metric"], methods, max_new_tokens, device,
                                            tolerance=tolerance)
        print(text)
    print("training curve (val prompts): " + ", ".join(
        f"{c['train_minutes']:.1f} min: {c['tokens_per_forward']:.2f} tok/fwd"
        + (f" ({c['multiblock_tokens_per_forward']:.2f} multi-block)" if c.get("multiblock_tokens_per_forward") else "")
        + (f", {c['quality']:.3f}" if c["quality"] is not None else "")
        + f", loss {c['answer_loss']:.3f}" for c in curve))
    with open(os.path.join(cfg.out_dir, "results.json"), "w") as f:
        json.dump(dict(config=asdict(cfg), environment=environment(device), metric=meta["metric"],
                       results=results, curve=curve, chosen_iter=chosen["iter_num"], stopped=stopped,
                       verdict=verdict(results, tolerance) if results else []), f, indent=1)
    return results
