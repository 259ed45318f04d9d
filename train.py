"""
Pretrain the target model: the ordinary AR model that train_cllm.py distils into a CLLM.

    python train.py                                # arith on a CPU, ~8 minutes
    python train.py config/train_pycode.py         # the stdlib-code target
    python train.py config/train_arith_gpu.py      # a larger target on one GPU
    python train.py --init_from=resume             # continue out_dir/ckpt.pt exactly
    python train.py --init_from=gpt2 --gpt2_dir=gpt2 --dataset=<name with the gpt2 tokenizer>

nanoGPT's train.py, compact: random windows of the dataset's token stream, AdamW, warm-up +
cosine learning rate, gradient clipping, train/val loss every eval_interval iterations, an atomic
checkpoint (weights, model config, optimizer, RNG states, iteration, settings, dataset) that
init_from=resume continues bit for bit, and at the end the quality on held-out prompts.
"""

import math
import os
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from configurator import configure, run
from data.common import load_encoding, load_meta, load_records, load_tokens, score
from jacobi import greedy_decode
from model import GPT, GPTConfig


@dataclass
class TrainConfig:
    out_dir: str = "out-arith"
    dataset: str = "arith"
    init_from: str = "scratch"   # "scratch", "resume" (out_dir/ckpt.pt) or "gpt2" (gpt2_dir)
    gpt2_dir: str = "gpt2"       # a Hugging Face GPT-2 folder, for init_from=gpt2
    # model
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 128
    dropout: float = 0.0
    # optimisation
    batch_size: int = 32
    max_iters: int = 1500
    learning_rate: float = 3e-3
    min_lr: float = 3e-4
    warmup_iters: int = 100
    lr_decay_iters: int = 0      # cosine reaches min_lr here; 0: at max_iters
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0
    # evaluation and logging
    eval_interval: int = 250
    eval_iters: int = 20
    log_interval: int = 25
    eval_prompts: int = 500      # held-out prompts for the final quality (0: none)
    val_prompts: int = 50        # val prompts for the quality at every eval (0: none)
    max_new_tokens: int = 96
    # system
    device: str = "auto"         # "auto": cuda when present, else cpu
    compile: bool = False        # torch.compile (CUDA; it did not help on CPU)
    seed: int = 1337


# ----------------------------------------------------------------------------------------------
# pieces that train_cllm.py, sample.py and bench.py use too

def get_lr(it, cfg):
    """Linear warm-up to learning_rate, then cosine decay to min_lr at lr_decay_iters."""
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / cfg.warmup_iters
    decay_iters = cfg.lr_decay_iters or cfg.max_iters
    ratio = min(1.0, (it - cfg.warmup_iters) / max(1, decay_iters - cfg.warmup_iters))
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.learning_rate - cfg.min_lr)


def setup_device(name):
    """(device, autocast context): bf16 autocast on CUDA, plain float32 on CPU."""
    device = torch.device("cuda" if name == "auto" and torch.cuda.is_available() else
                          "cpu" if name == "auto" else name)
    if device.type == "cuda":  # (TF32 stays off: float32 decoding must stay exactly float32)
        return device, torch.autocast("cuda", dtype=torch.bfloat16)
    return device, nullcontext()


def optimizer_step(model, optimizer, loss, grad_clip):
    """Backpropagate loss, clip the gradient norm (grad_clip > 0), step, clear the gradients."""
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def save_checkpoint(path, checkpoint):
    """Write atomically: a crash mid-write leaves the previous checkpoint intact."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    torch.save(checkpoint, path + ".tmp")
    os.replace(path + ".tmp", path)


def load_checkpoint(path, device="cpu"):
    """(model in eval mode, checkpoint dict) from a checkpoint of train.py or train_cllm.py."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}: train one with `python train.py` "
                                "(the target) or `python train_cllm.py` (the CLLM)")
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)  # RNG states stay on CPU
    model = GPT(GPTConfig(**checkpoint["model_args"]))
    model.load_state_dict(checkpoint["model"])
    return model.to(device).eval(), checkpoint


def encode_prompt(enc, text, model, max_new_tokens, device):
    """Token ids of a prompt, cropped from the left so that max_new_tokens fit in the context
    (but at least half the context is kept for the prompt)."""
    context = model.config.block_size
    keep = max(context - max_new_tokens, context // 2)
    return torch.tensor(enc.encode_ordinary(text)[-keep:], dtype=torch.long, device=device)


def note_changed_settings(saved, cfg):
    """On resume, say which settings differ from the checkpoint's (the run continues exactly only
    when those that shape training, such as the schedule and batch size, are the same)."""
    changed = {k: (saved.get(k), v) for k, v in asdict(cfg).items() if saved.get(k) != v}
    changed.pop("init_from", None)
    if changed:
        print(f"resuming with settings that differ from the checkpoint's (saved, now): {changed}")


def decode_text(enc, tokens):
    """Text of generated tokens, cut before the end-of-text token."""
    tokens = tokens.tolist()
    if enc.eot_token in tokens:
        tokens = tokens[:tokens.index(enc.eot_token)]
    return enc.decode(tokens)


@torch.no_grad()
def evaluate_quality(model, enc, records, metric, max_new_tokens, device):
    """Mean score of greedy generations on records (accuracy / parse rate); None for 'loss'."""
    if metric == "loss" or not records:
        return None
    model.eval()
    scores = []
    for r in records:
        prompt = encode_prompt(enc, r["prompt"], model, max_new_tokens, device)
        out = greedy_decode(model, prompt, max_new_tokens, eos_id=enc.eot_token)
        scores.append(score(metric, r, decode_text(enc, out)))
    return sum(scores) / len(scores)


@torch.no_grad()
def answer_loss(model, enc, records, device):
    """Mean cross-entropy of the answers (and their end-of-text) given their prompts: the held-out
    loss that any dataset has, checkable answer or not."""
    model.eval()
    total, count = 0.0, 0
    for r in records:
        prompt = enc.encode_ordinary(r["prompt"])[-(model.config.block_size // 2):]  # as generation
        ids = (prompt + enc.encode_ordinary(r["answer"]) + [enc.eot_token])[:model.config.block_size + 1]
        x, y = torch.tensor(ids[:-1], device=device), torch.tensor(ids[1:], device=device)
        y[:len(prompt) - 1] = -1  # no loss on the prompt itself
        logits, _ = model(x[None])
        total += F.cross_entropy(logits[0].float(), y, ignore_index=-1, reduction="sum").item()
        count += int((y != -1).sum())
    return total / max(count, 1)


# ----------------------------------------------------------------------------------------------

def get_batch(data, cfg, generator, device):
    """batch_size random windows of block_size + 1 tokens: inputs and next-token targets."""
    ix = torch.randint(len(data) - cfg.block_size - 1, (cfg.batch_size,), generator=generator)
    x = torch.stack([torch.from_numpy(data[i:i + cfg.block_size].astype(np.int64)) for i in ix])
    y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + cfg.block_size].astype(np.int64)) for i in ix])
    return x.to(device), y.to(device)


@torch.no_grad()
def estimate_loss(model, splits, cfg, ctx, device):
    """Mean loss over eval_iters batches of each split; the same batches at every evaluation."""
    model.eval()
    out = {}
    for name, data in splits.items():
        g = torch.Generator().manual_seed(0)
        losses = []
        for _ in range(cfg.eval_iters):
            with ctx:
                losses.append(model(*get_batch(data, cfg, g, device))[1].item())
        out[name] = sum(losses) / len(losses)
    model.train()
    return out


def init_model(cfg, vocab_size, device):
    """(model, optimizer, checkpoint or None) for init_from = scratch, resume or gpt2."""
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    checkpoint = None
    if cfg.init_from == "scratch":
        model = GPT(GPTConfig(block_size=cfg.block_size, vocab_size=vocab_size,
                              n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
                              dropout=cfg.dropout))
    elif cfg.init_from == "resume":
        model, checkpoint = load_checkpoint(ckpt_path, device)
        note_changed_settings(checkpoint["config"], cfg)
    elif cfg.init_from == "gpt2":
        model = GPT.from_pretrained(cfg.gpt2_dir)
    else:
        raise ValueError(f"init_from must be 'scratch', 'resume' or 'gpt2', got {cfg.init_from!r}")
    if model.config.vocab_size != vocab_size:
        raise ValueError(f"the model's vocabulary ({model.config.vocab_size}) is not the dataset's "
                         f"({vocab_size}): GPT-2 weights need a dataset prepared with GPT-2's "
                         "tokenizer (data/custom/prepare.py --tokenizer=gpt2)")
    model.to(device).train()
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.learning_rate,
                                           (cfg.beta1, cfg.beta2), device.type)
    if checkpoint is not None:
        optimizer.load_state_dict(checkpoint["optimizer"])
    return model, optimizer, checkpoint


def main(argv):
    cfg = configure(TrainConfig(), argv)
    device, ctx = setup_device(cfg.device)
    meta, enc = load_meta(cfg.dataset), load_encoding(cfg.dataset)
    val_records = load_records(cfg.dataset, "val")[:cfg.val_prompts]
    splits = {"train": load_tokens(cfg.dataset, "train"), "val": load_tokens(cfg.dataset, "val")}
    for name, data in splits.items():
        if len(data) < cfg.block_size + 2:
            raise ValueError(f"the {name} split of {cfg.dataset!r} has {len(data)} tokens, fewer "
                             f"than block_size + 2 = {cfg.block_size + 2}: lower --block_size or "
                             "add data")
    torch.manual_seed(cfg.seed)
    model, optimizer, checkpoint = init_model(cfg, meta["vocab_size"], device)
    if checkpoint is not None and checkpoint["config"]["dataset"] != cfg.dataset:
        raise ValueError(f"{cfg.out_dir}/ckpt.pt was trained on {checkpoint['config']['dataset']!r}, "
                         f"not {cfg.dataset!r}")
    batch_gen = torch.Generator().manual_seed(cfg.seed)
    iter_num, best_val = 0, float("inf")
    if checkpoint is not None:  # continue exactly where the checkpoint left off
        iter_num, best_val = checkpoint["iter_num"], checkpoint["best_val_loss"]
        batch_gen.set_state(checkpoint["batch_rng"])
        torch.set_rng_state(checkpoint["torch_rng"])
    train_model = torch.compile(model) if cfg.compile else model
    print(f"{model.num_params() / 1e6:.2f}M parameters, dataset {cfg.dataset} "
          f"({len(splits['train']):,} train tokens), device {device}, from {cfg.init_from} "
          f"at iter {iter_num}")

    def checkpoint_now():
        save_checkpoint(os.path.join(cfg.out_dir, "ckpt.pt"), dict(
            model=model.state_dict(), model_args=asdict(model.config),
            optimizer=optimizer.state_dict(), iter_num=iter_num, best_val_loss=best_val,
            config=asdict(cfg), dataset=cfg.dataset, batch_rng=batch_gen.get_state(),
            torch_rng=torch.get_rng_state(), kind="target"))

    t_start = t0 = time.time()
    last_log = iter_num
    while iter_num < cfg.max_iters:
        if iter_num % cfg.eval_interval == 0 and iter_num > 0:
            losses = estimate_loss(model, splits, cfg, ctx, device)
            best_val = min(best_val, losses["val"])
            quality = evaluate_quality(model, enc, val_records, meta["metric"], cfg.max_new_tokens, device)
            model.train()
            print(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}"
                  + (f", val {meta['metric']} {quality:.3f}" if quality is not None else ""))
            checkpoint_now()
        lr = get_lr(iter_num, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y = get_batch(splits["train"], cfg, batch_gen, device)
        with ctx:
            _, loss = train_model(x, y)
        optimizer_step(model, optimizer, loss, cfg.grad_clip)
        iter_num += 1
        if iter_num % cfg.log_interval == 0 or iter_num == cfg.max_iters:
            dt = (time.time() - t0) / (iter_num - last_log)
            t0, last_log = time.time(), iter_num
            eta = (cfg.max_iters - iter_num) * dt / 60
            print(f"iter {iter_num}: loss {loss.item():.4f}, lr {lr:.2e}, time {dt * 1000:.0f}ms, "
                  f"{cfg.batch_size * cfg.block_size / dt:,.0f} tok/s, eta {eta:.1f} min")
    losses = estimate_loss(model, splits, cfg, ctx, device)
    best_val = min(best_val, losses["val"])
    print(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f} "
          f"({(time.time() - t_start) / 60:.1f} min)")
    checkpoint_now()
    records = load_records(cfg.dataset, "test")[:cfg.eval_prompts]
    quality = evaluate_quality(model, enc, records, meta["metric"], cfg.max_new_tokens, device)
    if records:
        print(f"held-out answer loss {answer_loss(model, enc, records, device):.4f}"
              + (f", {meta['metric']} {quality:.3f}" if quality is not None else "")
              + f" on {len(records)} test prompts")
    return dict(val_loss=losses["val"], quality=quality)


if __name__ == "__main__":
    run(main)
