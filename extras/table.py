"""
Extra (a learner may skip it): the held-out table. Every prompt is decoded by greedy AR and by
every other method of every model, interleaved, so that a change in the machine's load hits all
rows alike; tokens/s is the median over prompts after a warm-up, and the speedup is the median
over prompts of AR time / method time (same model, same prompt). On CUDA the timings are
synchronised. bench.py and the end of train_cllm.py print it.
"""

import json
import os
import platform
import statistics
import time
from dataclasses import asdict
from functools import partial

import torch

from common import encode_prompts, load_checkpoint
from data.common import load_records
from extras.decoders import (RECYCLING_POOL, multiblock_decode, prompt_lookup_decode,
                             sliding_window_jacobi_decode)
from extras.quality import (BASELINES, QUALITY_NAMES, QUALITY_TOLERANCE, answer_loss, baseline_of,
                            mean, paired, paired_line, quality_problems, repetition_rate,
                            task_scores, verdict)
from jacobi import greedy_decode, jacobi_decode


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def methods_for(ns, max_new_tokens, eos_id, blocks=0, lookup=False, guess="prefix", multiblock=False):
    """{method name: decode(model, prompt) -> (tokens, stats)}: Jacobi at each n, and optionally
    at each n the sliding window and Jacobi Forcing's multi-block decoding (its K, r and pool
    size: multiblock_decode's defaults) without and with rejection recycling, and prompt lookup.
    guess: the initial guess (the one the CLLM was trained with)."""
    shared = dict(max_new_tokens=max_new_tokens, eos_id=eos_id)
    out = {}
    for n in ns:
        out[f"Jacobi n={n}"] = partial(jacobi_decode, n=n, guess=guess, **shared)
        if blocks:
            out[f"sliding window {blocks}x{n}"] = partial(sliding_window_jacobi_decode, n=n, blocks=blocks,
                                                          guess=guess, **shared)
        if multiblock:
            out[f"multi-block n={n}"] = partial(multiblock_decode, n=n, guess=guess, **shared)
            out[f"multi-block + recycling n={n}"] = partial(multiblock_decode, n=n, pool_size=RECYCLING_POOL,
                                                            guess=guess, **shared)
    if lookup:
        out["prompt lookup"] = partial(prompt_lookup_decode, **shared)
    return out


def bench_models(models, prompts, methods, max_new_tokens, eos_id=None, warmup=2):
    """Decode every prompt with every model, by AR and by every method of that model
    (methods: {model name: {method: decode}}), interleaved.

    Returns {model name: {method: row}}; a row holds the summed tokens and forwards, the
    per-prompt tokens/s and seconds, the outputs, and (not AR) fast-forwarded/stationary counts
    and exactness.
    """
    device = next(next(iter(models.values())).parameters()).device
    total, every, t0 = warmup + len(prompts), max(1, len(prompts) // 10), time.time()
    rows = {}
    for model_name in models:
        rows[model_name] = {"AR": dict(tokens=0, forwards=0, tps=[], secs=[], outputs=[])}
        for name in methods[model_name]:
            rows[model_name][name] = dict(tokens=0, forwards=0, tps=[], secs=[], outputs=[],
                                          fast_forwarded=0, stationary=0, exact=0, speedups=[])
    for i, prompt in enumerate([*prompts[:warmup], *prompts]):
        counted = i >= warmup
        for model_name, model in models.items():
            greedy, secs = timed(lambda: greedy_decode(model, prompt, max_new_tokens, eos_id), device)
            if counted:
                _add(rows[model_name]["AR"], greedy, len(greedy), secs)
            for name, decode in methods[model_name].items():
                (tokens, stats), msecs = timed(lambda: decode(model, prompt), device)
                if counted:  # (the statistics are computed here, after the timed call)
                    row = rows[model_name][name]
                    _add(row, tokens, stats.forwards, msecs)
                    row["fast_forwarded"] += stats.fast_forwarded
                    # stationary tokens exist only where a decoder records blocks (jacobi_decode)
                    recorded = stats.passes and row["stationary"] is not None
                    row["stationary"] = row["stationary"] + stats.stationary if recorded else None
                    row["exact"] += int(torch.equal(tokens, greedy))
                    row["speedups"].append(secs / msecs)
        if (i + 1) % every == 0 and i + 1 < total:  # progress, a line per tenth of the prompts
            per = (time.time() - t0) / (i + 1)
            print(f"decoded {i + 1}/{total} prompts, {per:.1f} s per prompt, "
                  f"eta {(total - i - 1) * per / 60:.1f} min")
    return rows


def _add(row, tokens, forwards, secs):
    row["tokens"] += len(tokens)
    row["forwards"] += forwards
    row["tps"].append(len(tokens) / secs)
    row["secs"].append(secs)
    row["outputs"].append(tokens.tolist())


def summarize(rows):
    """One summary dict per method: the numbers of the table. forward_cost: the time of one
    forward pass relative to one of AR's, so tokens/forward must pass it for a speedup."""
    out = {}
    ar_per_forward = sum(rows["AR"]["secs"]) / max(rows["AR"]["forwards"], 1)
    for name, r in rows.items():
        s = dict(tokens=r["tokens"], forwards=r["forwards"],
                 tokens_per_forward=r["tokens"] / max(r["forwards"], 1),
                 tokens_per_s=statistics.median(r["tps"]))
        if "speedups" in r:
            s.update(speedup=statistics.median(r["speedups"]), exact=f"{r['exact']}/{len(r['tps'])}",
                     fast_forwarded=r["fast_forwarded"], stationary=r["stationary"],
                     forward_cost=sum(r["secs"]) / max(r["forwards"], 1) / ar_per_forward)
        out[name] = s
    return out


def measure(models, prompts, methods, max_new_tokens, eos_id=None, warmup=2, quality=None):
    """{model name: {method: summary}} for several models on the same prompts.
    quality(model, outputs) -> dict of quality numbers, added to every method of the model (the
    outputs are AR's; the other methods' are the same where 'exact' says so)."""
    rows = bench_models(models, prompts, methods, max_new_tokens, eos_id, warmup)
    results = {name: summarize(r) for name, r in rows.items()}
    if quality is not None:
        for name, model in models.items():
            q = quality(model, rows[name]["AR"]["outputs"])
            for summary in results[name].values():
                summary.update(q)
    return results


def quality_measure(enc, records, metric, max_new_tokens, device):
    """quality(model, outputs) for measure(): the task's score (the mean, and each prompt's),
    the answer loss, the repetition."""
    def quality(model, outputs):
        scores = task_scores(metric, records, [torch.tensor(o) for o in outputs], enc)
        return dict(quality=mean(scores), scores=scores,
                    answer_loss=answer_loss(model, enc, records, max_new_tokens, device),
                    repeated=repetition_rate(outputs))
    return quality


def markdown_table(results, quality_name=None, tolerance=QUALITY_TOLERANCE):
    """The table, with a mark on every row of a model whose quality is outside the tolerance of
    its baseline's (the target's, or the AR-only control's: baseline_of)."""
    against, base = baseline_of(results)
    head = "| model | method | tokens/forward | tokens/s (median) | speedup vs AR | == AR |"
    head += f" {quality_name} |" if quality_name else ""
    head += " answer loss | repetitive | fast-fwd | stationary |" if base else " fast-fwd | stationary |"
    lines = [head, "|" + "---|" * head.count(" |")]
    for model_name, methods in results.items():
        fell = base is not None and model_name not in BASELINES and quality_problems(methods["AR"], base, tolerance)
        for name, s in methods.items():
            line = (f"| {model_name} | {name} | {s['tokens_per_forward']:.2f} | {s['tokens_per_s']:.1f} | "
                    f"{s.get('speedup', 1.0):.2f}x | {s.get('exact', '-')} |")
            if quality_name:
                line += f" {s['quality']:.3f} |" if s.get("quality") is not None else " - |"
            if base:
                line += f" {s['answer_loss']:.4f}{' (quality fell)' if fell else ''} | {s['repeated']:.0%} |"
            stationary = s.get("stationary")
            line += f" {s.get('fast_forwarded', '-')} | {'-' if stationary is None else stationary} |"
            lines.append(line)
    return "\n".join(lines)


def environment(device, dtype="float32"):
    return dict(device=str(device) if device.type != "cuda" else torch.cuda.get_device_name(),
                threads=torch.get_num_threads(), dtype=dtype, torch=torch.__version__,
                python=platform.python_version(), machine=platform.machine())


def held_out_comparison(models, enc, records, metric, methods, max_new_tokens, device, warmup=2,
                        tolerance=QUALITY_TOLERANCE):
    """{name: model} on held-out records: AR and each model's methods ({model name: {method:
    decode}}) interleaved per prompt, with the task's quality, the answer loss and the repetition
    rate. Returns (results, table and verdict as text); a CLLM whose quality fell is marked.
    Under the table, each model's quality against the target's, paired on the same prompts."""
    prompts = encode_prompts(enc, records, next(iter(models.values())), max_new_tokens, device)
    results = measure(models, prompts, methods, max_new_tokens, enc.eot_token, warmup,
                      quality_measure(enc, records, metric, max_new_tokens, device))
    against, base = baseline_of(results)
    lines = []
    for name, summaries in results.items():
        judged = base is not None and name not in BASELINES
        problems = quality_problems(summaries["AR"], base, tolerance, against) if judged else []
        others = [b for b in BASELINES if b in results and b != name and results[b]["AR"]["scores"]]
        pairs = {} if name == "target" else {
            b: paired(results[b]["AR"]["scores"], summaries["AR"]["scores"]) for b in others}
        for b, pair in pairs.items():
            lines.append(f"{name} vs {b}, {QUALITY_NAMES[metric]} on the same {len(records)} prompts: "
                         f"{paired_line(pair, 'the ' + b)}"
                         + (f"; the verdict allows {100 * tolerance['quality']:g} point less" if judged
                            and b == against else ""))
        for s in summaries.values():
            s["quality_within_tolerance"] = not problems
            s["paired"] = pairs
    for s in (s for summaries in results.values() for s in summaries.values()):
        s.pop("scores", None)  # per prompt, used by the pairs above; the JSON keeps the counts
    text = "\n".join([markdown_table(results, QUALITY_NAMES[metric], tolerance), *lines,
                      *verdict(results, tolerance)])
    return results, text


def report(cfg, target, target_ckpt, enc, meta, curve, stopped, device):
    """The end of train_cllm.py: the held-out table with the model the guard chose
    (out_dir/ckpt.pt), the curve, and results.json. The verdict is bench.py's, at
    QUALITY_TOLERANCE, whatever tolerance the guard ran with."""
    model, chosen = load_checkpoint(os.path.join(cfg.out_dir, "ckpt.pt"), device)
    best = next(c for c in curve if c["iter"] == chosen["iter_num"])
    print(f"\nthe CLLM is ckpt.pt, iteration {chosen['iter_num']}: the most tokens/forward on the val "
          f"prompts ({best['tokens_per_forward']:.2f}) of the evaluations within the quality tolerance"
          + (": no distilled model beat the target within the tolerance, so the 'CLLM' below is the "
             "target itself" if chosen["iter_num"] == 0 else ""))
    test_records = load_records(cfg.dataset, "test")[:cfg.test_prompts]
    results = {}
    if test_records:
        print(f"held-out comparison on {len(test_records)} test prompts "
              f"({environment(device)['device']}, {torch.get_num_threads()} threads):")
        # the target gets no sliding-window row: it is slower than plain Jacobi on an ordinary
        # model and the most expensive row (bench.py --blocks=2 measures it)
        methods = dict(target=methods_for([cfg.decode_n], cfg.max_new_tokens, enc.eot_token, 0, cfg.lookup,
                                          cfg.guess),
                       CLLM=methods_for([cfg.decode_n], cfg.max_new_tokens, enc.eot_token, cfg.blocks,
                                        cfg.lookup, cfg.guess))
        results, text = held_out_comparison({"target": target, "CLLM": model}, enc, test_records,
                                            meta["metric"], methods, cfg.max_new_tokens, device)
        print(text)
        note = quality_gain_note(target_ckpt, meta["metric"], results, cfg.out_dir)
        if note:
            print(note)
    print("training curve (val prompts): " + ", ".join(
        f"{c['train_minutes']:.1f} min: {c['tokens_per_forward']:.2f} tok/fwd"
        + (f" ({c['window_tokens_per_forward']:.2f} sliding window)" if c.get("window_tokens_per_forward") else "")
        + (f", {c['quality']:.3f}" if c["quality"] is not None else "")
        + f", loss {c['answer_loss']:.3f}" for c in curve))
    with open(os.path.join(cfg.out_dir, "results.json"), "w") as f:
        json.dump(dict(config=asdict(cfg), environment=environment(device), metric=meta["metric"],
                       results=results, curve=curve, chosen_iter=chosen["iter_num"], stopped=stopped,
                       verdict=verdict(results) if results else []), f, indent=1)
    return results


def quality_gain_note(target_ckpt, metric, results, out_dir, tolerance=QUALITY_TOLERANCE):
    """A note when the CLLM answers better than its target. Distillation's AR loss trains on the
    data's answers, so part of such a gain is further training, not consistency distillation; more
    so when the target's best checkpoint is its last iteration (it was still improving). The note
    names the measure of that part, the AR-only control (the same run with --states_per_block=0),
    and the bench.py command that puts the control's number in the table and judges the CLLM
    against it."""
    cllm, base = results["CLLM"]["AR"], results["target"]["AR"]
    higher = (cllm["quality"] or 0) - (base["quality"] or 0) > tolerance["quality"]
    if not (higher or base["answer_loss"] - cllm["answer_loss"] > tolerance["answer_loss"]):
        return None
    change = (f"{QUALITY_NAMES[metric]} {base['quality']:.3f} -> {cllm['quality']:.3f}" if higher else
              f"answer loss {base['answer_loss']:.3f} -> {cllm['answer_loss']:.3f}")
    last = target_ckpt.get("max_iters", target_ckpt.get("config", {}).get("max_iters"))
    still = (f" The target was still improving when its training ended (iteration {last}): "
             "a target trained to its plateau (python train.py) is the fairer baseline."
             if target_ckpt.get("iter_num") == last else "")
    control = f"{out_dir.rstrip('/')}-control"
    return (f"note: the CLLM answers better than its target ({change}). Its AR loss trains on the "
            f"data's answers, so part of that is further training, not distillation.{still} The AR-only "
            f"control measures that part: the same command with --states_per_block=0 --out_dir={control}, "
            f"then python bench.py --model_dir={out_dir} --control_dir={control} puts the control's "
            f"{QUALITY_NAMES[metric] or 'answer loss'} in the table and judges the CLLM against it "
            "(docs/own-data.md).")


def loss_line(cfg):
    """What a run trains on, in words: the loss, or that it is the AR-only control."""
    if not cfg.states_per_block:
        return ("the AR loss alone (states_per_block=0), a control: ckpt.pt is chosen by tokens/forward "
                "as for a CLLM; compare its last.pt with the CLLM's iteration")
    return f"{cfg.recipe} recipe, {cfg.consistency} consistency + {cfg.ar_weight} * AR ({cfg.ar_target})"


def cost_line(cfg, iter_num, secs_per_iter, curve, test_prompts):
    """The line that says, a few steps into distillation, what the rest of the run will cost:
    the steps left, the evaluations left (each timed like the last one on the curve: the target's
    in a fresh run, and later ones are faster), and the final table on test_prompts prompts (the
    setting, or fewer when the data's test split is smaller; its decodes each about as slow as one
    of an evaluation's)."""
    steps = (cfg.max_iters - iter_num) * secs_per_iter
    evals = sum(k % cfg.eval_interval == 0 or k == cfg.max_iters for k in range(iter_num + 1, cfg.max_iters + 1))
    eval_secs = curve[-1].get("seconds")
    if eval_secs is None:  # (a run resumed from a checkpoint whose evaluations were not timed)
        return (f"expected: {steps / 60:.1f} min of distillation ({secs_per_iter:.2f} s per step), "
                f"then {evals} evaluations and the table")
    decodes = 2 + 2 + bool(cfg.blocks) + 2 * cfg.lookup  # AR + Jacobi of two models, the extras
    per_decode = eval_secs / max(curve[-1]["prompts"], 1) / (1 + bool(cfg.blocks))
    table = test_prompts * decodes * per_decode
    total = steps + evals * eval_secs + table
    return (f"expected: {steps / 60:.1f} min of distillation ({secs_per_iter:.2f} s per step), "
            f"{evals} evaluations {evals * eval_secs / 60:.1f} min, the table on {test_prompts} test "
            f"prompts {table / 60:.1f} min: about {total / 60:.1f} min more")
