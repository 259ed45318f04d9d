"""
Benchmark greedy AR against Jacobi decoding: tokens per forward, tokens/s, speedup, exactness,
quality, fast-forwarded and stationary tokens. The numbers in the README come from here.

    python bench.py                          # target vs CLLM (out-cllm-arith) on held-out prompts
    python bench.py --ns="[8, 16, 32]" --num_prompts=200 --threads=1
    python bench.py --cllm_dir=out-cllm-pycode
    python bench.py --random                 # an untrained model of nanoGPT's CPU size

Every prompt is decoded by AR and by Jacobi at each n, interleaved, so that a change in the
machine's load hits all of them alike; tokens/s is the median over prompts after a warm-up, and
the speedup is the median over prompts of AR time / Jacobi time (same tokens, same prompt).
On CUDA the timings are synchronised. Prints a markdown table and writes JSON.
"""

import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch

from configurator import configure, run
from data.common import load_encoding, load_meta, load_records, score
from jacobi import greedy_decode, jacobi_decode
from model import GPT, GPTConfig
from train import answer_loss, decode_text, encode_prompt, load_checkpoint, setup_device


@dataclass
class BenchConfig:
    cllm_dir: str = "out-cllm-arith"  # a checkpoint folder; a CLLM's brings its target along
    random: bool = False              # an untrained model of nanoGPT's CPU size instead
    ns: list = field(default_factory=list)  # Jacobi block sizes; empty: the CLLM's n
    num_prompts: int = 100            # held-out (test) prompts
    max_new_tokens: int = 96
    warmup: int = 2                   # prompts decoded first and not counted
    threads: int = 0                  # torch threads; 0 = torch's default
    device: str = "auto"
    seed: int = 0
    json_out: str = "bench.json"


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


def bench_model(model, prompts, ns, max_new_tokens, eos_id=None, warmup=2):
    """Decode every prompt with AR and with Jacobi for each n, interleaved.

    Returns {method: row}; a row holds the summed tokens and forwards, the per-prompt tokens/s
    and seconds, the outputs, and (Jacobi) fast-forwarded/stationary counts and exactness.
    """
    device = next(model.parameters()).device
    rows = {"AR": dict(n=1, tokens=0, forwards=0, tps=[], secs=[], outputs=[])}
    for n in ns:
        rows[f"Jacobi n={n}"] = dict(n=n, tokens=0, forwards=0, tps=[], secs=[], outputs=[],
                                     fast_forwarded=0, stationary=0, exact=0, speedups=[])
    for i, prompt in enumerate([*prompts[:warmup], *prompts]):
        counted = i >= warmup
        greedy, secs = timed(lambda: greedy_decode(model, prompt, max_new_tokens, eos_id), device)
        if counted:
            _add(rows["AR"], greedy, len(greedy), secs)
        for n in ns:
            (tokens, stats), jsecs = timed(
                lambda: jacobi_decode(model, prompt, max_new_tokens, n, eos_id), device)
            if counted:
                row = rows[f"Jacobi n={n}"]
                _add(row, tokens, stats.forwards, jsecs)
                row["fast_forwarded"] += stats.fast_forwarded
                row["stationary"] += stats.stationary
                row["exact"] += int(torch.equal(tokens, greedy))
                row["speedups"].append(secs / jsecs)
    return rows


def _add(row, tokens, forwards, secs):
    row["tokens"] += len(tokens)
    row["forwards"] += forwards
    row["tps"].append(len(tokens) / secs)
    row["secs"].append(secs)
    row["outputs"].append(tokens.tolist())


def summarize(rows):
    """One summary dict per method: the numbers of the table."""
    out = {}
    for name, r in rows.items():
        s = dict(tokens=r["tokens"], forwards=r["forwards"],
                 tokens_per_forward=r["tokens"] / max(r["forwards"], 1),
                 tokens_per_s=statistics.median(r["tps"]))
        if "speedups" in r:
            s.update(speedup=statistics.median(r["speedups"]), exact=f"{r['exact']}/{len(r['tps'])}",
                     fast_forwarded=r["fast_forwarded"], stationary=r["stationary"])
        out[name] = s
    return out


def measure(models, prompts, ns, max_new_tokens, eos_id=None, warmup=2, quality=None):
    """{model name: {method: summary}} for several models on the same prompts.
    quality(model, outputs) -> dict of quality numbers, added to every method of the model (the
    outputs are AR's; Jacobi's are the same where 'exact' says so)."""
    results = {}
    for name, model in models.items():
        rows = bench_model(model, prompts, ns, max_new_tokens, eos_id, warmup)
        results[name] = summarize(rows)
        if quality is not None:
            q = quality(model, rows["AR"]["outputs"])
            for summary in results[name].values():
                summary.update(q)
    return results


def markdown_table(results, quality_name=None):
    head = "| model | method | tokens/forward | tokens/s (median) | speedup vs AR | Jacobi == AR |"
    head += f" {quality_name} | answer loss |" if quality_name else ""
    head += " fast-fwd | stationary |"
    lines = [head, "|" + "---|" * head.count(" |")]
    for model_name, methods in results.items():
        for name, s in methods.items():
            line = (f"| {model_name} | {name} | {s['tokens_per_forward']:.2f} | {s['tokens_per_s']:.1f} | "
                    f"{s.get('speedup', 1.0):.2f}x | {s.get('exact', '-')} |")
            if quality_name:
                q = s.get("quality")
                line += f" {q:.3f} |" if q is not None else " - |"
                line += f" {s['answer_loss']:.4f} |"
            line += f" {s.get('fast_forwarded', '-')} | {s.get('stationary', '-')} |"
            lines.append(line)
    return "\n".join(lines)


def environment(device, dtype="float32"):
    return dict(device=str(device) if device.type != "cuda" else torch.cuda.get_device_name(),
                threads=torch.get_num_threads(), dtype=dtype, torch=torch.__version__,
                python=platform.python_version(), machine=platform.machine())


def quality_measure(enc, records, metric, device):
    """quality(model, outputs) for measure(): the dataset's score and the answer loss."""
    def quality(model, outputs):
        scores = [score(metric, r, decode_text(enc, torch.tensor(out))) for r, out in zip(records, outputs)]
        return dict(quality=sum(scores) / len(scores) if scores and scores[0] is not None else None,
                    answer_loss=answer_loss(model, enc, records, device))
    return quality


def trained_models(cfg, device):
    """The CLLM and its target (or a lone target), the dataset and its encoding."""
    model, ckpt = load_checkpoint(os.path.join(cfg.cllm_dir, "ckpt.pt"), device)
    models = {"target": model}
    if ckpt.get("kind") == "cllm":
        target, _ = load_checkpoint(os.path.join(ckpt["config"]["target_dir"], "ckpt.pt"), device)
        models = {"target": target, "CLLM": model}
    ns = cfg.ns or [ckpt["config"].get("n", 16)]
    return models, ckpt["dataset"], ns


def main(argv):
    cfg = configure(BenchConfig(), argv)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device, _ = setup_device(cfg.device)
    torch.manual_seed(cfg.seed)
    if cfg.random:
        models = {"random": GPT(RANDOM_MODEL).to(device).eval()}
        g = torch.Generator().manual_seed(cfg.seed)
        prompts = [torch.randint(RANDOM_MODEL.vocab_size, (RANDOM_PROMPT_LEN,), generator=g).to(device)
                   for _ in range(cfg.num_prompts)]
        ns, eos_id, quality, metric = cfg.ns or RANDOM_NS, None, None, None
        print(f"random model, {models['random'].num_params() / 1e6:.2f}M parameters, "
              f"{len(prompts)} random {RANDOM_PROMPT_LEN}-token prompts")
    else:
        models, dataset, ns = trained_models(cfg, device)
        enc, metric = load_encoding(dataset), load_meta(dataset)["metric"]
        records = load_records(dataset, "test")[:cfg.num_prompts]
        model = next(iter(models.values()))
        prompts = [encode_prompt(enc, r["prompt"], model, cfg.max_new_tokens, device) for r in records]
        eos_id, quality = enc.eot_token, quality_measure(enc, records, metric, device)
        print(f"{', '.join(models)} on {len(prompts)} held-out prompts of {dataset}")
    env = environment(device)
    print(f"{env}")
    results = measure(models, prompts, ns, cfg.max_new_tokens, eos_id, cfg.warmup, quality)
    name = {"accuracy": "accuracy", "parse": "parse rate", "loss": "quality"}.get(metric)
    print(markdown_table(results, name))
    with open(cfg.json_out, "w") as f:
        json.dump(dict(config=asdict(cfg), environment=env, results=results), f, indent=1)
    print(f"wrote {cfg.json_out}")


if __name__ == "__main__":
    run(main)
