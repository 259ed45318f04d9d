"""
Benchmark greedy AR against Jacobi decoding (and the decoders of extras/decoders.py): tokens per
forward, tokens/s, speedup, exactness, quality, fast-forwarded and stationary tokens, and a
verdict. Without a run of your own it measures the models shipped in pretrained/.

    python bench.py                          # target vs CLLM on 100 held-out prompts
    python bench.py --ns="[8, 16, 32]" --blocks=2 --lookup --test_prompts=200 --threads=1
    python bench.py --model_dir=out-cllm-pycode
    python bench.py --model_dir=out-cllm-arith --control_dir=out-cllm-arith-control   # + the AR-only control
    python bench.py --compare_dirs="['out-jf']" --multiblock   # + another CLLM, Jacobi Forcing's decoders
    python bench.py --random                 # an untrained model of nanoGPT's CPU size
    python bench.py --dtype=bfloat16         # half precision (exactness is then not guaranteed)

How the rows are timed: extras/table.py. The verdict judges a CLLM's speed only at its target's
quality, or at the AR-only control's when --control_dir gives one (extras/quality.py, one rule:
QUALITY_TOLERANCE): a row outside the tolerance is marked, and its speedup not called usable.
Under the table each model's quality is compared with the target's on the same prompts (the
prompts one gets right and the other wrong). Prints a markdown table and the verdict, and writes
JSON.
"""

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch

from common import find_checkpoint, fingerprint, kept_target, load_model, own_n, run, setup_device
from data.common import generation_length, load_encoding, load_meta, load_records
from extras.configurator import configure
from extras.table import environment, held_out_comparison, markdown_table, measure, methods_for
from model import GPT, GPTConfig


@dataclass
class BenchConfig:
    model_dir: str = "out-cllm-arith"  # the model to load: the out_dir of train_cllm.py or train.py
                                      # (a CLLM brings its target); the shipped CLLM until you have
                                      # run train_cllm.py
    control_dir: str = ""             # an AR-only control to judge the CLLM against (its last.pt)
                                      # (train_cllm.py --states_per_block=0, same settings)
    compare_dirs: list = field(default_factory=list)  # more CLLMs of the same target (e.g. the
                                      # other recipe), in the same table, named by their folder
    random: bool = False              # an untrained model of nanoGPT's CPU size instead
    ns: list = field(default_factory=list)  # Jacobi block sizes; empty: the checkpoint's own
                                      # (common.own_n)
    blocks: int = 0                   # also the sliding window over blocks * n tokens (0: not)
    multiblock: bool = False          # also Jacobi Forcing's multi-block decoding, without and with
                                      # rejection recycling (extras/decoders.py)
    lookup: bool = False              # also prompt-lookup decoding (training-free)
    test_prompts: int = 100           # held-out (test) prompts
    max_new_tokens: int = 0           # 0: from the data (data/common.generation_length)
    warmup: int = 2                   # prompts decoded first and not counted
    threads: int = 0                  # torch threads; 0 = torch's default
    dtype: Literal["float32", "bfloat16"] = "float32"  # the weights and the KV cache
    device: str = "auto"              # auto: cuda when there is one, else cpu
    seed: int = 0                     # the random model and prompts of --random
    json_out: str = "bench.json"      # where the results go, as JSON


# the untrained baseline: nanoGPT's CPU size (4 layers, 4 heads, 128 wide), random prompts
RANDOM_MODEL = GPTConfig(block_size=256, vocab_size=2048, n_layer=4, n_head=4, n_embd=128)
RANDOM_NS, RANDOM_PROMPT_LEN = [4, 8, 16, 32], 32


def trained_models(cfg, device):
    """The CLLM and its target (or a lone target), and the AR-only control when control_dir is
    set; the checkpoint's dataset and settings."""
    path = find_checkpoint(cfg.model_dir)
    model, ckpt = load_model(path, device)
    models = {"target": model}
    if ckpt.get("kind") == "cllm":
        target_path = os.path.join(ckpt["config"]["target_dir"], "ckpt.pt")
        target, _ = load_model(target_path, device, ckpt["dataset"])
        if ckpt.get("target") not in (None, fingerprint(target.state_dict())):
            print(f"WARNING: {target_path} is not the model this CLLM was distilled from (it was "
                  "trained again since?): the comparison is not with its own target")
        models = {"target": target, "CLLM": model}
        if kept_target(ckpt):
            print(f"note: {path} is the target itself: the guard of its run kept no distilled checkpoint, "
                  "so the CLLM rows below are the target's (its last distilled one is last.pt)")
    if cfg.control_dir:
        control, saved = load_model(os.path.join(cfg.control_dir, "last.pt"), device, ckpt["dataset"])
        if saved["config"].get("states_per_block") != 0 or saved.get("target") != ckpt.get("target"):
            raise ValueError(f"{cfg.control_dir} is not an AR-only control of {cfg.model_dir}: make one with "
                             "the CLLM's command and --states_per_block=0 --out_dir=" + cfg.control_dir)
        models["control"] = control
    for folder in cfg.compare_dirs:
        other, saved = load_model(find_checkpoint(folder), device, ckpt["dataset"])
        if saved.get("target") != ckpt.get("target"):
            raise ValueError(f"{folder} was not distilled from the target of {cfg.model_dir}: a table "
                             "compares the CLLMs of one target")
        name = os.path.basename(folder.rstrip("/"))
        if name in models:
            raise ValueError(f"two models named {name!r} in one table: rename the folder {folder}")
        models[name] = other
    return models, ckpt["dataset"], ckpt["config"]


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
                   for _ in range(cfg.test_prompts)]
        print(f"random model, {models['random'].num_params() / 1e6:.2f}M parameters, "
              f"{len(prompts)} random {RANDOM_PROMPT_LEN}-token prompts\n{env}")
        max_new_tokens = cfg.max_new_tokens or 128
        methods = methods_for(cfg.ns or RANDOM_NS, max_new_tokens, None, cfg.blocks, cfg.lookup,
                              multiblock=cfg.multiblock)
        results = measure(models, prompts, {"random": methods}, max_new_tokens, None, cfg.warmup)
        text = markdown_table(results)
    else:
        models, dataset, trained = trained_models(cfg, device)
        models = {k: m.to(dtype) for k, m in models.items()}
        meta, enc = load_meta(dataset), load_encoding(dataset)
        records = load_records(dataset, "test")[:cfg.test_prompts]
        context = next(iter(models.values())).config.block_size
        max_new_tokens = cfg.max_new_tokens or generation_length(meta, context)
        print(f"{', '.join(models)} on {len(records)} held-out prompts of {dataset}\n{env}")
        methods = methods_for(cfg.ns or [own_n(trained)], max_new_tokens, enc.eot_token,
                              cfg.blocks, cfg.lookup, trained.get("guess", "prefix"), cfg.multiblock)
        results, text = held_out_comparison(models, enc, records, meta["metric"],
                                            {name: methods for name in models}, max_new_tokens,
                                            device, cfg.warmup)
    print(text)
    with open(cfg.json_out, "w") as f:
        json.dump(dict(argv=argv, config=asdict(cfg), environment=env, results=results), f, indent=1)
    print(f"wrote {cfg.json_out}")


if __name__ == "__main__":
    run(main)
