"""
Pretrain the target model: the ordinary AR model that train_cllm.py distils into a CLLM.

    python train.py                                # arith on a CPU, ~8 minutes
    python train.py config/train_pycode.py         # the stdlib-code target
    python train.py config/train_arith_gpu.py      # a larger target on one GPU
    python train.py --init_from=resume             # continue out_dir/last.pt exactly
    python train.py --init_from=gpt2 --gpt2_dir=gpt2 --dataset=<name with the gpt2 tokenizer>
    torchrun --standalone --nproc_per_node=8 train.py config/train_arith_gpu.py   # 8 GPUs

nanoGPT's train.py, compact: random windows of the dataset's token stream, AdamW, warm-up +
cosine learning rate, gradient clipping, train/val loss every eval_interval iterations, and at
the end the quality on held-out prompts. Two atomic checkpoints in out_dir: last.pt, everything
needed to continue (weights, optimizer, RNG states, iteration, settings), which init_from=resume
continues bit for bit; ckpt.pt, the model with the best val loss so far, which the other scripts
load. The context (block_size) and the generation length come from the data when not set, and on
small data max_iters is cut to max_epochs passes, so that a small data set is not trained to
death; the best-val checkpoint guards against the rest.
"""

import math
import os
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

import distributed
from configurator import configure, run
from data.common import (context_length, generation_length, load_encoding, load_meta, load_records,
                         load_tokens, score)
from jacobi import greedy_decode
from model import GPT, GPTConfig


@dataclass
class TrainConfig:
    out_dir: str = "out-arith"
    dataset: str = "arith"
    init_from: Literal["scratch", "resume", "gpt2"] = "scratch"  # resume: out_dir/last.pt;
                                                                 # gpt2: weights from gpt2_dir
    gpt2_dir: str = "gpt2"       # a Hugging Face GPT-2 folder, for init_from=gpt2
    # model
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 0          # context length; 0: from the data (data/common.context_length)
    dropout: float = 0.0
    # optimisation
    batch_size: int = 32         # windows per iteration, over all processes and micro-steps
    grad_accum: int = 1          # micro-steps per iteration; under torchrun each process takes
                                 # batch_size / (processes * grad_accum) windows per micro-step
    max_iters: int = 1500
    max_epochs: float = 10.0     # cap max_iters at this many passes over the train tokens (0: none)
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
    max_new_tokens: int = 0      # 0: from the data (data/common.generation_length)
    # system
    device: str = "auto"         # "auto": cuda when present, else cpu
    compile: bool = False        # torch.compile (CUDA; it did not help on CPU)
    seed: int = 1337


# ----------------------------------------------------------------------------------------------
# pieces that train_cllm.py, sample.py and bench.py use too

def get_lr(it, cfg, max_iters):
    """Linear warm-up to learning_rate, then cosine decay to min_lr at lr_decay_iters (0: at
    max_iters, the iterations this run trains)."""
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / cfg.warmup_iters
    decay_iters = cfg.lr_decay_iters or max_iters
    ratio = min(1.0, (it - cfg.warmup_iters) / max(1, decay_iters - cfg.warmup_iters))
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.learning_rate - cfg.min_lr)


def setup_device(name):
    """(device, autocast context): bf16 autocast on CUDA, plain float32 on CPU."""
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device={name}, but this torch ({torch.__version__}) sees no CUDA GPU: "
                         "use --device=cpu (or auto, which picks a GPU when there is one)")
    device = torch.device("cuda" if name == "auto" and torch.cuda.is_available() else
                          "cpu" if name == "auto" else name)
    if device.type == "cuda":  # (TF32 stays off: float32 decoding must stay exactly float32)
        return device, torch.autocast("cuda", dtype=torch.bfloat16)
    return device, nullcontext()


def optimizer_step(model, optimizer, grad_clip):
    """After backward: clip the gradient norm (grad_clip > 0), step, clear the gradients."""
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def save_checkpoint(path, checkpoint):
    """Write atomically: a crash mid-write leaves the previous checkpoint intact."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    torch.save(checkpoint, path + ".tmp")
    os.replace(path + ".tmp", path)


def read_checkpoint(path):
    """The dict saved at path, or an error that names the file and says what to do."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}: train one with `python train.py` "
                                "(the target) or `python train_cllm.py` (the CLLM)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)  # RNG states stay on CPU
        assert isinstance(checkpoint, dict) and {"model", "model_args"} <= set(checkpoint)
    except Exception as e:
        raise ValueError(f"{path} is not a readable checkpoint of this project ({type(e).__name__}"
                         f"{': ' + str(e)[:100] if str(e) else ''}): truncated by a crash, or made by "
                         "something else? Make it again with `python train.py` or `python "
                         "train_cllm.py`, or point --out_dir/--ckpt at another") from None
    return checkpoint


def load_checkpoint(path, device="cpu"):
    """(model in eval mode, checkpoint dict) from a checkpoint of train.py or train_cllm.py."""
    checkpoint = read_checkpoint(path)
    model = GPT(GPTConfig(**checkpoint["model_args"]))
    model.load_state_dict(checkpoint["model"])
    return model.to(device).eval(), checkpoint


def check_vocabulary(model, meta, path):
    """A model decodes only the dataset whose tokenizer it was trained with."""
    if model.config.vocab_size != meta["vocab_size"]:
        raise ValueError(f"{path} has a vocabulary of {model.config.vocab_size} tokens, but dataset "
                         f"{meta['name']!r} has {meta['vocab_size']}: the dataset was prepared again "
                         "since, or the checkpoint belongs to another one; train the model again")


def refuse_to_overwrite(out_dir, init_from):
    """Starting afresh in a folder that holds a run would lose it; resuming needs last.pt. Say
    what to do instead."""
    last, best = os.path.join(out_dir, "last.pt"), os.path.join(out_dir, "ckpt.pt")
    if init_from != "resume" and (os.path.isfile(last) or os.path.isfile(best)):
        raise ValueError(f"{out_dir} already holds a run ({'last.pt' if os.path.isfile(last) else 'ckpt.pt'}): "
                         "continue it with --init_from=resume (a larger --max_iters trains longer), or "
                         "start afresh in another --out_dir (or delete this one)")
    if init_from == "resume" and not os.path.isfile(last) and os.path.isfile(best):
        raise ValueError(f"{out_dir} has a ckpt.pt but no last.pt to resume from (a run that ended "
                         "before its first evaluation, or one made by an older version): start afresh "
                         "in another --out_dir")


def prompt_budget(model, max_new_tokens):
    """How many prompt tokens generation keeps: the context minus the tokens to generate, but at
    least half the context."""
    context = model.config.block_size
    return max(context - max_new_tokens, context // 2)


def encode_prompt(enc, text, model, max_new_tokens, device):
    """Token ids of a prompt, cropped from the left to prompt_budget tokens."""
    ids = enc.encode_ordinary(text)
    return torch.tensor(ids[-prompt_budget(model, max_new_tokens):], dtype=torch.long, device=device)


def encode_prompts(enc, records, model, max_new_tokens, device, what="prompts", say=print):
    """encode_prompt for every record, saying how many prompts were cropped (the model then never
    sees their beginning)."""
    keep = prompt_budget(model, max_new_tokens)
    cropped = sum(len(ids) > keep for ids in enc.encode_ordinary_batch([r["prompt"] for r in records]))
    if cropped:
        say(f"note: {cropped} of {len(records)} {what} are longer than {keep} tokens and were cropped "
            f"to their last {keep} (context {model.config.block_size}, max_new_tokens "
            f"{max_new_tokens}): a larger --block_size (train.py) keeps more")
    return [encode_prompt(enc, r["prompt"], model, max_new_tokens, device) for r in records]


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
def evaluate_quality(model, enc, prompts, records, metric, max_new_tokens):
    """Mean score of greedy generations on records (accuracy / parse rate); None for 'loss'."""
    if metric == "loss" or not records:
        return None
    model.eval()
    scores = [score(metric, r, decode_text(enc, greedy_decode(model, p, max_new_tokens, enc.eot_token)))
              for p, r in zip(prompts, records)]
    return sum(scores) / len(scores)


@torch.no_grad()
def answer_loss(model, enc, records, max_new_tokens, device):
    """Mean cross-entropy of the answers (and their end-of-text) given their prompts, cropped as
    generation crops them: the held-out loss that any dataset has, checkable answer or not."""
    model.eval()
    total, count = 0.0, 0
    for r in records:
        prompt = enc.encode_ordinary(r["prompt"])[-prompt_budget(model, max_new_tokens):]
        ids = (prompt + enc.encode_ordinary(r["answer"]) + [enc.eot_token])[:model.config.block_size + 1]
        x, y = torch.tensor(ids[:-1], device=device), torch.tensor(ids[1:], device=device)
        y[:len(prompt) - 1] = -1  # no loss on the prompt itself
        logits, _ = model(x[None])
        total += F.cross_entropy(logits[0].float(), y, ignore_index=-1, reduction="sum").item()
        count += int((y != -1).sum())
    return total / max(count, 1)


# ----------------------------------------------------------------------------------------------

def get_batch(data, starts, block_size, device):
    """Windows of block_size + 1 tokens at the given starts: inputs and next-token targets."""
    x = torch.stack([torch.from_numpy(data[i:i + block_size].astype(np.int64)) for i in starts])
    y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + block_size].astype(np.int64)) for i in starts])
    return x.to(device), y.to(device)


def random_starts(data, block_size, batch_size, generator):
    return torch.randint(len(data) - block_size - 1, (batch_size,), generator=generator)


@torch.no_grad()
def estimate_loss(model, splits, cfg, block_size, ctx, device):
    """Mean loss over eval_iters batches of each split; the same batches at every evaluation."""
    model.eval()
    out = {}
    for name, data in splits.items():
        g = torch.Generator().manual_seed(0)
        losses = []
        for _ in range(cfg.eval_iters):
            with ctx:
                starts = random_starts(data, block_size, cfg.batch_size, g)
                losses.append(model(*get_batch(data, starts, block_size, device))[1].item())
        out[name] = sum(losses) / len(losses)
    model.train()
    return out


def init_model(cfg, vocab_size, block_size, device):
    """(model, optimizer, last checkpoint or None) for init_from = scratch, resume or gpt2."""
    checkpoint = None
    if cfg.init_from == "scratch":
        model = GPT(GPTConfig(block_size=block_size, vocab_size=vocab_size, n_layer=cfg.n_layer,
                              n_head=cfg.n_head, n_embd=cfg.n_embd, dropout=cfg.dropout))
    elif cfg.init_from == "resume":
        model, checkpoint = load_checkpoint(os.path.join(cfg.out_dir, "last.pt"), device)
        note_changed_settings(checkpoint["config"], cfg)
    else:
        model = GPT.from_pretrained(cfg.gpt2_dir)
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


def training_length(cfg, train_tokens, block_size, say):
    """max_iters, cut to max_epochs passes over the training tokens on small data."""
    per_epoch = train_tokens / (cfg.batch_size * block_size)  # iterations per pass
    iters = cfg.max_iters
    if cfg.max_epochs and iters > cfg.max_epochs * per_epoch:
        iters = max(1, math.ceil(cfg.max_epochs * per_epoch))
        say(f"note: {cfg.max_iters} iterations would be {cfg.max_iters / per_epoch:.0f} epochs of this "
            f"small data set; training {iters} ({cfg.max_epochs:g} epochs, --max_epochs)")
    say(f"{iters} iterations of {cfg.batch_size} x {block_size} tokens: {iters / per_epoch:.2f} epochs "
        f"of {train_tokens:,} training tokens")
    return iters


def main(argv):
    cfg = configure(TrainConfig(), argv)
    device, ctx = setup_device(cfg.device)
    world, device = distributed.init(device)  # ddp
    say = print if world.master else lambda *a, **k: None
    per_process = distributed.per_process_batch(cfg.batch_size, cfg.grad_accum, world)  # ddp
    refuse_to_overwrite(cfg.out_dir, cfg.init_from)
    meta, enc = load_meta(cfg.dataset), load_encoding(cfg.dataset)
    block_size = cfg.block_size or context_length(meta, say)
    splits = {"train": load_tokens(cfg.dataset, "train"), "val": load_tokens(cfg.dataset, "val")}
    for name, data in splits.items():
        if len(data) < block_size + 2:
            raise ValueError(f"the {name} split of {cfg.dataset!r} has {len(data)} tokens, fewer "
                             f"than block_size + 2 = {block_size + 2}: lower --block_size or add data")
    torch.manual_seed(cfg.seed + world.rank)  # ddp: dropout differs from process to process
    model, optimizer, checkpoint = init_model(cfg, meta["vocab_size"], block_size, device)
    block_size = model.config.block_size
    if checkpoint is not None and checkpoint["config"]["dataset"] != cfg.dataset:
        raise ValueError(f"{cfg.out_dir}/last.pt was trained on {checkpoint['config']['dataset']!r}, "
                         f"not {cfg.dataset!r}")
    max_new_tokens = cfg.max_new_tokens or generation_length(meta, block_size)
    max_iters = training_length(cfg, len(splits["train"]), block_size, say)
    batch_gen = torch.Generator().manual_seed(cfg.seed)  # the same on every process
    iter_num, best_val = 0, float("inf")
    if checkpoint is not None:  # continue exactly where the checkpoint left off
        iter_num, best_val = checkpoint["iter_num"], checkpoint["best_val_loss"]
        batch_gen.set_state(checkpoint["batch_rng"])
        distributed.restore_rng(checkpoint["torch_rng"], world)
    resumed_at = iter_num  # where this run starts: evaluated already when resumed
    train_model = distributed.wrap(torch.compile(model) if cfg.compile else model, world, device)
    val_records = load_records(cfg.dataset, "val")[:cfg.val_prompts] if world.master else []
    val_prompts = encode_prompts(enc, val_records, model, max_new_tokens, device, "val prompts")
    say(f"{model.num_params() / 1e6:.2f}M parameters, dataset {cfg.dataset}, context {block_size}, "
        f"device {device}" + (f" x {world.size} processes" if world.size > 1 else "")
        + f", from {cfg.init_from} at iter {iter_num}")

    def evaluate_and_checkpoint():
        """Train/val loss and val quality; last.pt always, ckpt.pt when the val loss is the best."""
        nonlocal best_val
        rng = distributed.all_gather(torch.get_rng_state(), world)  # ddp: every process's
        if not world.master:
            return
        losses = estimate_loss(model, splits, cfg, block_size, ctx, device)
        quality = evaluate_quality(model, enc, val_prompts, val_records, meta["metric"], max_new_tokens)
        model.train()
        best = losses["val"] < best_val
        best_val = min(best_val, losses["val"])
        print(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}"
              + (f", val {meta['metric']} {quality:.3f}" if quality is not None else "")
              + (" (best so far: ckpt.pt)" if best else f" (best {best_val:.4f} stays in ckpt.pt)"))
        state = dict(model=model.state_dict(), model_args=asdict(model.config), iter_num=iter_num,
                     config=asdict(cfg), dataset=cfg.dataset, kind="target", val_loss=losses["val"])
        save_checkpoint(os.path.join(cfg.out_dir, "last.pt"), dict(
            state, optimizer=optimizer.state_dict(), best_val_loss=best_val,
            batch_rng=batch_gen.get_state(), torch_rng=rng))
        if best:
            save_checkpoint(os.path.join(cfg.out_dir, "ckpt.pt"), state)

    t_start = t0 = time.time()
    last_log = iter_num
    while iter_num < max_iters:
        if iter_num % cfg.eval_interval == 0 and iter_num != resumed_at:  # (0 when fresh)
            evaluate_and_checkpoint()
            distributed.barrier(world)
            t0 = time.time()  # the evaluation is not training time
        lr = get_lr(iter_num, cfg, max_iters)
        for group in optimizer.param_groups:
            group["lr"] = lr
        starts = random_starts(splits["train"], block_size, cfg.batch_size, batch_gen)
        mine = distributed.my_share(starts, world, per_process * cfg.grad_accum)  # ddp
        loss_sum = 0.0
        for micro, rows in enumerate(mine.split(per_process)):
            last_micro = micro == cfg.grad_accum - 1  # ddp: average the gradients only then
            with ctx, (train_model.no_sync() if world.size > 1 and not last_micro else nullcontext()):
                _, loss = train_model(*get_batch(splits["train"], rows, block_size, device))
                (loss / cfg.grad_accum).backward()
            loss_sum = loss_sum + loss.detach() / cfg.grad_accum
        optimizer_step(model, optimizer, cfg.grad_clip)
        iter_num += 1
        if iter_num % cfg.log_interval == 0 or iter_num == max_iters:
            loss = distributed.all_sum([float(loss_sum)], world)[0] / world.size  # ddp: global mean
            dt = (time.time() - t0) / (iter_num - last_log)
            t0, last_log = time.time(), iter_num
            say(f"iter {iter_num}: loss {loss:.4f}, lr {lr:.2e}, time {dt * 1000:.0f}ms, "
                f"{cfg.batch_size * block_size / dt:,.0f} tok/s, eta {(max_iters - iter_num) * dt / 60:.1f} min")
    if iter_num > resumed_at or checkpoint is None:  # (a resumed run evaluated resumed_at already)
        evaluate_and_checkpoint()
    say(f"trained {iter_num} iterations in {(time.time() - t_start) / 60:.1f} min")
    result = {}
    if world.master:
        best, saved = load_checkpoint(os.path.join(cfg.out_dir, "ckpt.pt"), device)
        records = load_records(cfg.dataset, "test")[:cfg.eval_prompts]
        prompts = encode_prompts(enc, records, best, max_new_tokens, device, "test prompts")
        quality = evaluate_quality(best, enc, prompts, records, meta["metric"], max_new_tokens)
        if records:
            print(f"held-out answer loss {answer_loss(best, enc, records, max_new_tokens, device):.4f}"
                  + (f", {meta['metric']} {quality:.3f}" if quality is not None else "")
                  + f" on {len(records)} test prompts, with ckpt.pt (iteration {saved['iter_num']})")
        result = dict(val_loss=saved["val_loss"], quality=quality)
    distributed.finish(world)
    return result


if __name__ == "__main__":
    run(main)
