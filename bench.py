"""
Benchmark greedy AR against Jacobi decoding: tokens per forward, tokens/s, speedup, exactness.

    python bench.py                      # a random model of nanoGPT's CPU size, random prompts
    python bench.py --ns="[8, 16]" --threads=1

Every prompt is decoded by AR and by Jacobi at each n, interleaved, so that a change in the
machine's load hits all of them alike; tokens/s is the median over prompts after a warm-up, and
the speedup is the median over prompts of AR time / Jacobi time (same tokens, same prompt).
"""

import json
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field

import torch

from configurator import configure, run
from jacobi import greedy_decode, jacobi_decode
from model import GPT, GPTConfig


@dataclass
class BenchConfig:
    ns: list = field(default_factory=lambda: [4, 8, 16, 32])  # Jacobi block sizes
    num_prompts: int = 12
    prompt_len: int = 32
    max_new_tokens: int = 128
    warmup: int = 2          # prompts decoded first and not counted
    threads: int = 0         # torch threads; 0 = torch's default
    seed: int = 0
    json_out: str = "bench.json"
    # the random model (nanoGPT's CPU size: 4 layers, 4 heads, 128 wide)
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    vocab_size: int = 2048
    block_size: int = 256


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
        for n in ns:  # the default argument binds this n in the lambda
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


def markdown_table(summary, title=""):
    head = "| model | method | tokens/forward | tokens/s (median) | speedup vs AR | exact | fast-fwd | stationary |"
    lines = [head, "|" + "---|" * 8]
    for model_name, methods in summary.items():
        for name, s in methods.items():
            lines.append(f"| {model_name} | {name} | {s['tokens_per_forward']:.2f} | "
                         f"{s['tokens_per_s']:.1f} | {s.get('speedup', 1.0):.2f}x | "
                         f"{s.get('exact', '-')} | {s.get('fast_forwarded', '-')} | "
                         f"{s.get('stationary', '-')} |")
    return (f"{title}\n\n" if title else "") + "\n".join(lines)


def environment(device, dtype="float32"):
    return dict(device=str(device) if device.type != "cuda" else torch.cuda.get_device_name(),
                threads=torch.get_num_threads(), dtype=dtype, torch=torch.__version__,
                python=platform.python_version(), machine=platform.machine())


def main(argv):
    cfg = configure(BenchConfig(), argv)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    model = GPT(GPTConfig(block_size=cfg.block_size, vocab_size=cfg.vocab_size,
                          n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd)).eval()
    g = torch.Generator().manual_seed(cfg.seed)
    prompts = [torch.randint(cfg.vocab_size, (cfg.prompt_len,), generator=g)
               for _ in range(cfg.num_prompts)]
    env = environment(torch.device("cpu"))
    print(f"random model, {model.num_params() / 1e6:.2f}M parameters; {env}")
    rows = bench_model(model, prompts, cfg.ns, cfg.max_new_tokens, warmup=cfg.warmup)
    summary = {"random": summarize(rows)}
    print(markdown_table(summary))
    with open(cfg.json_out, "w") as f:
        json.dump(dict(config=asdict(cfg), environment=env, results=summary), f, indent=1)
    print(f"wrote {cfg.json_out}")


if __name__ == "__main__":
    run(main)
