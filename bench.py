"""
Benchmark greedy AR against Jacobi decoding (and the decoders of decoders.py): tokens per
forward, tokens/s, speedup, exactness, quality, fast-forwarded and stationary tokens, and a
verdict. The numbers in the README come from here.

    python bench.py                          # target vs CLLM (out-cllm-arith) on held-out prompts
    python bench.py --ns="[8, 16, 32]" --num_prompts=200 --threads=1
    python bench.py --cllm_dir=out-cllm-pycode
    python bench.py --random                 # an untrained model of nanoGPT's CPU size
    python bench.py --dtype=bfloat16         # half precision (exactness is then not guaranteed)

Every prompt is decoded by AR and by every other method, interleaved, so that a change in the
machine's load hits all of them alike; tokens/s is the median over prompts after a warm-up, and
the speedup is the median over prompts of AR time / method time (same prompt). On CUDA the
timings are synchronised. Prints a markdown table and a verdict, and writes JSON.

The verdict judges a CLLM's speed only at its target's quality: a row whose answer loss, task
score or repetition rate is outside the tolerance (QUALITY_TOLERANCE) is marked, and its speedup
is not called usable.
"""

import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Literal

import torch

from configurator import configure, run
from data.common import generation_length, load_encoding, load_meta, load_records, longest_run, score
from decoders import multiblock_jacobi_decode, prompt_lookup_decode
from jacobi import greedy_decode, jacobi_decode
from model import GPT, GPTConfig
from train import (answer_loss, check_vocabulary, decode_text, encode_prompts, load_checkpoint,
                   setup_device)
from trajectories import fingerprint


@dataclass
class BenchConfig:
    cllm_dir: str = "out-cllm-arith"  # a checkpoint folder; a CLLM's brings its target along
    random: bool = False              # an untrained model of nanoGPT's CPU size instead
    ns: list = field(default_factory=list)  # Jacobi block sizes; empty: the CLLM's n
    blocks: int = 0                   # also multi-block Jacobi over this many blocks (0: not)
    lookup: bool = False              # also prompt-lookup decoding (training-free)
    num_prompts: int = 100            # held-out (test) prompts
    max_new_tokens: int = 0           # 0: from the data (data/common.generation_length)
    warmup: int = 2                   # prompts decoded first and not counted
    threads: int = 0                  # torch threads; 0 = torch's default
    dtype: Literal["float32", "bfloat16"] = "float32"  # the weights and the KV cache
    device: str = "auto"
    seed: int = 0
    json_out: str = "bench.json"


# how far a CLLM's quality may fall below its target's and its speedup still count as usable
QUALITY_TOLERANCE = dict(answer_loss=0.05,  # nats of held-out answer loss more than the target's
                         quality=0.05,      # accuracy / parse rate / exact match less
                         repeated=0.05)     # more of the outputs repeating a token REPEAT_LIMIT times
REPEAT_LIMIT = 10
WEAK_ANSWER_LOSS = 1.0  # nats per answer token: above it a model is not competent at its task
QUALITY_NAMES = {"accuracy": "accuracy", "parse": "parse rate", "exact": "exact match", "loss": None}

# the untrained baseline: nanoGPT's CPU size (4 layers, 4 heads, 128 wide), random prompts
RANDOM_MODEL = GPTConfig(block_size=256, vocab_size=2048, n_layer=4, n_head=4, n_embd=128)
RANDOM_NS, RANDOM_PROMPT_LEN = [4, 8, 16, 32], 32


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def methods_for(ns, max_new_tokens, eos_id, blocks=0, lookup=False, init="prefix"):
    """{method name: decode(model, prompt) -> (tokens, stats)}: Jacobi at each n, and optionally
    multi-block Jacobi (at the first n) and prompt lookup. init: the initial guess (the one the
    CLLM was trained with)."""
    out = {f"Jacobi n={n}": partial(jacobi_decode, max_new_tokens=max_new_tokens, n=n, eos_id=eos_id,
                                    init=init) for n in ns}
    if blocks:
        out[f"multi-block {blocks}x{ns[0]}"] = partial(
            multiblock_jacobi_decode, max_new_tokens=max_new_tokens, n=ns[0], blocks=blocks,
            eos_id=eos_id, init=init)
    if lookup:
        out["prompt lookup"] = partial(prompt_lookup_decode, max_new_tokens=max_new_tokens, eos_id=eos_id)
    return out


def bench_models(models, prompts, methods, max_new_tokens, eos_id=None, warmup=2):
    """Decode every prompt with every model, by AR and by every method of that model
    (methods: {model name: {method: decode}}), interleaved: a change in the machine's load hits
    every row alike, also the AR rows of two models.

    Returns {model name: {method: row}}; a row holds the summed tokens and forwards, the
    per-prompt tokens/s and seconds, the outputs, and (not AR) fast-forwarded/stationary counts
    and exactness.
    """
    device = next(next(iter(models.values())).parameters()).device
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
    """{model name: {method: summary}} for several models on the same prompts, each decoded by AR
    and by its methods ({model name: {method: decode}}).
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
    """quality(model, outputs) for measure(): the dataset's score (None where there is none), the
    answer loss, and the share of outputs that repeat one token REPEAT_LIMIT times."""
    def quality(model, outputs):
        scores = [score(metric, r, decode_text(enc, torch.tensor(out))) for r, out in zip(records, outputs)]
        return dict(quality=sum(scores) / len(scores) if scores and scores[0] is not None else None,
                    answer_loss=answer_loss(model, enc, records, max_new_tokens, device),
                    repeated=sum(longest_run(o) >= REPEAT_LIMIT for o in outputs) / max(len(outputs), 1))
    return quality


# ----------------------------------------------------------------------------------------------
# the verdict

def quality_problems(point, base, tolerance=QUALITY_TOLERANCE):
    """Why a model's quality is outside the tolerance of its target's: [] when it is within.
    point, base: dicts with answer_loss, quality (or None) and repeated."""
    problems = []
    if point["answer_loss"] > base["answer_loss"] + tolerance["answer_loss"]:
        problems.append(f"answer loss {point['answer_loss']:.3f} vs the target's {base['answer_loss']:.3f}")
    if None not in (point["quality"], base["quality"]) and point["quality"] < base["quality"] - tolerance["quality"]:
        problems.append(f"quality {point['quality']:.3f} vs the target's {base['quality']:.3f}")
    if point["repeated"] > base["repeated"] + tolerance["repeated"]:
        problems.append(f"{point['repeated']:.0%} of the outputs repeat a token {REPEAT_LIMIT}+ times "
                        f"vs the target's {base['repeated']:.0%}")
    return problems


def verdict(results, tolerance=QUALITY_TOLERANCE):
    """One line per model under the table: does its fastest method pay on this machine, at what
    quality, and if it does not, the likely reason and what to try. A CLLM is judged against its
    target."""
    base = results.get("target", {}).get("AR")
    lines = []
    for model_name, methods in results.items():
        name, best = max(((k, s) for k, s in methods.items() if k != "AR"),
                         key=lambda kv: kv[1]["speedup"], default=(None, None))
        if best is None:
            continue
        head = f"{model_name} {name}: {best['speedup']:.2f}x its own AR at {best['tokens_per_forward']:.2f} tokens/forward"
        problems = quality_problems(best, base, tolerance) if base is not None and model_name != "target" else []
        if "answer_loss" not in best:
            lines.append(head)
        elif problems:
            lines.append(f"{head}, but quality fell ({'; '.join(problems)}): NOT a usable speedup. "
                         "Use an earlier checkpoint, a higher ar_weight or a lower learning_rate")
        elif best["speedup"] > 1:
            lines.append(f"{head}, quality kept: it pays here")
        else:
            reason = (f"{best['tokens_per_forward']:.2f} tokens/forward does not pay for a forward pass "
                      f"that costs {best['forward_cost']:.2f}x one of AR's")
            advice = ("distil it (python train_cllm.py)" if model_name == "target" else
                      "distil longer, use a smaller n, or a larger target on a GPU")
            if best["answer_loss"] > WEAK_ANSWER_LOSS:
                reason += (f"; the model is not competent at the task (answer loss "
                           f"{best['answer_loss']:.2f}), and a weak model has little to accelerate")
            lines.append(f"{head}: does not pay on this machine: {reason}. Try: {advice}")
    return lines


def markdown_table(results, quality_name=None, tolerance=QUALITY_TOLERANCE):
    """The table, with a mark on every row of a model whose quality is outside the tolerance."""
    base = results.get("target", {}).get("AR")
    head = "| model | method | tokens/forward | tokens/s (median) | speedup vs AR | == AR |"
    head += f" {quality_name} |" if quality_name else ""
    head += " answer loss | repetitive | fast-fwd | stationary |" if base else " fast-fwd | stationary |"
    lines = [head, "|" + "---|" * head.count(" |")]
    for model_name, methods in results.items():
        fell = base is not None and model_name != "target" and quality_problems(methods["AR"], base, tolerance)
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
    decode}}) interleaved per prompt, with the
    dataset's quality, the answer loss and the repetition rate. Returns (results, table and
    verdict as text); a CLLM whose quality fell is marked in the results too."""
    prompts = encode_prompts(enc, records, next(iter(models.values())), max_new_tokens, device)
    results = measure(models, prompts, methods, max_new_tokens, enc.eot_token, warmup,
                      quality_measure(enc, records, metric, max_new_tokens, device))
    base = results.get("target", {}).get("AR")
    for name, summaries in results.items():
        problems = quality_problems(summaries["AR"], base, tolerance) if base and name != "target" else []
        for s in summaries.values():
            s["quality_within_tolerance"] = not problems
    text = markdown_table(results, QUALITY_NAMES[metric], tolerance) + "\n" + "\n".join(verdict(results, tolerance))
    return results, text


def trained_models(cfg, device):
    """The CLLM and its target (or a lone target), the checkpoint's dataset and settings, and the
    quality tolerance it was distilled with."""
    path = os.path.join(cfg.cllm_dir, "ckpt.pt")
    model, ckpt = load_checkpoint(path, device)
    check_vocabulary(model, load_meta(ckpt["dataset"]), path)
    models = {"target": model}
    if ckpt.get("kind") == "cllm":
        target_path = os.path.join(ckpt["config"]["target_dir"], "ckpt.pt")
        target, _ = load_checkpoint(target_path, device)
        if ckpt.get("target") not in (None, fingerprint(target.state_dict())):
            print(f"WARNING: {target_path} is not the model this CLLM was distilled from (it was "
                  "trained again since?): the comparison is not with its own target")
        models = {"target": target, "CLLM": model}
    tolerance = {k: ckpt["config"].get(key, v) for (k, v), key in
                 zip(QUALITY_TOLERANCE.items(), ("max_loss_rise", "max_quality_drop", "max_repeat_rise"))}
    return models, ckpt["dataset"], ckpt["config"], tolerance


def main(argv):
    cfg = configure(BenchConfig(), argv)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device, _ = setup_device(cfg.device)
    torch.manual_seed(cfg.seed)
    env = environment(device, cfg.dtype)
    dtype = getattr(torch, cfg.dtype)
    if cfg.random:
        models = {"random": GPT(RANDOM_MODEL).to(device, dtype).eval()}
        g = torch.Generator().manual_seed(cfg.seed)
        prompts = [torch.randint(RANDOM_MODEL.vocab_size, (RANDOM_PROMPT_LEN,), generator=g).to(device)
                   for _ in range(cfg.num_prompts)]
        print(f"random model, {models['random'].num_params() / 1e6:.2f}M parameters, "
              f"{len(prompts)} random {RANDOM_PROMPT_LEN}-token prompts\n{env}")
        max_new_tokens = cfg.max_new_tokens or 128
        methods = methods_for(cfg.ns or RANDOM_NS, max_new_tokens, None, cfg.blocks, cfg.lookup)
        results = measure(models, prompts, {"random": methods}, max_new_tokens, None, cfg.warmup)
        text = markdown_table(results)
    else:
        models, dataset, trained, tolerance = trained_models(cfg, device)
        models = {k: m.to(dtype) for k, m in models.items()}
        meta, enc = load_meta(dataset), load_encoding(dataset)
        records = load_records(dataset, "test")[:cfg.num_prompts]
        context = next(iter(models.values())).config.block_size
        max_new_tokens = cfg.max_new_tokens or generation_length(meta, context)
        print(f"{', '.join(models)} on {len(records)} held-out prompts of {dataset}\n{env}")
        methods = methods_for(cfg.ns or [trained.get("n", 16)], max_new_tokens, enc.eot_token,
                              cfg.blocks, cfg.lookup, trained.get("init", "prefix"))
        results, text = held_out_comparison(models, enc, records, meta["metric"],
                                            {name: methods for name in models}, max_new_tokens,
                                            device, cfg.warmup, tolerance)
    print(text)
    with open(cfg.json_out, "w") as f:
        json.dump(dict(config=asdict(cfg), environment=env, results=results), f, indent=1)
    print(f"wrote {cfg.json_out}")


if __name__ == "__main__":
    run(main)
