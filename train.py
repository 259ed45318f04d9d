"""
Pretrain the target model: the ordinary AR model that train_cllm.py distils into a CLLM.

    python train.py                                # arith on a CPU, ~33 minutes
    python train.py config/train_pycode.py         # the stdlib-code target
    python train.py config/train_arith_gpu.py      # a larger target on one GPU
    python train.py --init_from=resume             # continue out_dir/last.pt exactly
    python train.py --init_from=gpt2 --gpt2_dir=gpt2 --dataset=<name with the gpt2 tokenizer>
    python train_cllm.py --target_dir=out-arith    # then distil this target instead of the shipped one
    torchrun --standalone --nproc_per_node=8 train.py config/train_arith_gpu.py   # 8 GPUs

nanoGPT's train.py, compact: random windows of the dataset's token stream, AdamW, warm-up +
cosine learning rate, gradient clipping, train/val loss every eval_interval iterations, and at
the end the quality on held-out prompts. Two atomic checkpoints in out_dir: last.pt, everything
needed to continue (weights, optimizer, RNG states, iteration, settings), written at every
evaluation and when Ctrl-C or SIGTERM stops the run after a step, which init_from=resume continues
bit for bit; ckpt.pt, the model with the best val answer loss so far, which the other scripts
load. The context (block_size) and the generation length come from the data when not set, and
are checked against it before training (check_settings).

Which model is best is judged by what the task measures: the loss of the val prompts' answers
given their prompts (extras/quality.answer_loss), not the loss over the whole text, which
flattens long before the answers are learned (on arith the text's val loss moved 0.356 -> 0.344
while val accuracy rose 0.82 -> 0.98, iterations 3000 to 4500: docs/results.md). Training stops
at max_iters, or earlier once `patience` evaluations brought no better val answer loss (on small
data an evaluation comes every epoch), and says which. With val_prompts=0 the text's val loss is
the judge.
"""

import math
import os
import time
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import torch

from common import (Interrupt, check_context, encode_prompts, load_checkpoint, optimizer_step,
                    refuse_to_overwrite, run, save_checkpoint, set_lr, setup_device,
                    tokenizer_fingerprint)
from data.common import (context_length, ensure_prepared, generation_length, load_encoding,
                         load_meta, load_records, load_tokens)
from extras.configurator import configure, note_changed_settings
from extras import ddp
from extras.gpt2 import load_gpt2
from extras.quality import answer_loss, greedy_quality
from model import GPT, GPTConfig


@dataclass
class TrainConfig:
    out_dir: str = "out-arith"   # the target: out_dir/ckpt.pt (best val answer loss) and last.pt
    dataset: str = "arith"       # data/<dataset>, made by data/<dataset>/prepare.py
    init_from: Literal["scratch", "resume", "gpt2"] = "scratch"  # resume: out_dir/last.pt;
                                                                 # gpt2: weights from gpt2_dir
    gpt2_dir: str = "gpt2"       # a Hugging Face GPT-2 folder, for init_from=gpt2
    # model
    n_layer: int = 4             # transformer blocks
    n_head: int = 4              # attention heads
    n_embd: int = 128            # width
    block_size: int = 0          # context length; 0: from the data (data/common.context_length)
    dropout: float = 0.0         # dropout probability while training
    # optimisation (AdamW, betas 0.9/0.99)
    batch_size: int = 32         # windows per iteration, over all processes and micro-steps
    grad_accum: int = 1          # micro-steps per iteration; under torchrun each process takes
                                 # batch_size / (processes * grad_accum) windows per micro-step
    max_iters: int = 6000        # optimizer steps (arith's answers are learned by ~5,000)
    max_epochs: float = 0.0      # cap max_iters at this many passes over the train tokens (0: no
                                 # cap: patience ends training on small data)
    learning_rate: float = 3e-3  # after warmup_iters, cosine decay to min_lr
    min_lr: float = 3e-4         # the learning rate at the end
    warmup_iters: int = 100      # linear warm-up steps
    lr_decay_iters: int = 0      # cosine reaches min_lr here; 0: at max_iters
    weight_decay: float = 0.1    # on matrices and embeddings
    grad_clip: float = 1.0       # clip the gradient norm to this (0: no clipping)
    # evaluation and logging
    eval_interval: int = 250     # train/val loss and val quality every this many steps, or every
                                 # epoch when that comes sooner (small data)
    patience: int = 5            # stop after this many evaluations without a better val answer
                                 # loss (0: never)
    eval_iters: int = 20         # batches per loss estimate
    log_interval: int = 25       # a progress line every this many steps
    val_prompts: int = 50        # val prompts for the answer loss and quality at every
                                 # evaluation (0: none, and the text's val loss judges)
    test_prompts: int = 500      # test prompts for the final quality (0: none)
    max_new_tokens: int = 0      # 0: from the data (data/common.generation_length)
    # system
    device: str = "auto"         # "auto": cuda when present, else cpu
    compile: bool = False        # torch.compile (CUDA; it did not help on CPU)
    autocast: Literal["auto", "bfloat16", "float32"] = "auto"  # training precision: auto = bf16
                                 # autocast on CUDA, float32 on CPU; bfloat16 on a CPU too
    seed: int = 1337             # the weights' initialisation and the batches


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
        model = load_gpt2(cfg.gpt2_dir)
    if model.config.vocab_size != vocab_size:
        raise ValueError(f"the model's vocabulary ({model.config.vocab_size}) is not the dataset's "
                         f"({vocab_size}): GPT-2 weights need a dataset prepared with GPT-2's "
                         "tokenizer (data/custom/prepare.py --tokenizer=gpt2)")
    model.to(device).train()
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, device.type)
    if checkpoint is not None:
        optimizer.load_state_dict(checkpoint["optimizer"])
    return model, optimizer, checkpoint


def training_length(cfg, train_tokens, block_size, judge, say):
    """(max_iters, the evaluation interval): max_iters, cut to max_epochs passes over the training
    tokens when that is set; an evaluation every eval_interval iterations, or every epoch when that
    comes sooner, so that patience can stop a small data set before it overfits."""
    per_epoch = train_tokens / (cfg.batch_size * block_size)  # iterations per pass
    iters = cfg.max_iters
    if cfg.max_epochs and iters > cfg.max_epochs * per_epoch:
        iters = max(1, math.ceil(cfg.max_epochs * per_epoch))
        say(f"note: {cfg.max_iters} iterations would be {cfg.max_iters / per_epoch:.0f} epochs; "
            f"training {iters} ({cfg.max_epochs:g} epochs, --max_epochs)")
    every = max(1, min(cfg.eval_interval, math.ceil(per_epoch)))
    say(f"at most {iters} iterations of {cfg.batch_size} x {block_size} tokens: {iters / per_epoch:.2f} "
        f"epochs of {train_tokens:,} training tokens; an evaluation every {every} iterations"
        + (" (one epoch)" if every < cfg.eval_interval else "")
        + (f", stopping after {cfg.patience} without a better val {judge}" if cfg.patience else ""))
    return iters, every


def check_settings(cfg, meta, splits, block_size, say):
    """What the model's shape and the data allow, checked before any work: each failure is an
    error that says what to change."""
    if cfg.init_from == "scratch" and cfg.n_embd % cfg.n_head:
        raise ValueError(f"n_embd {cfg.n_embd} does not split into {cfg.n_head} attention heads "
                         "(n_head): make n_embd a multiple of n_head")
    for name, data in splits.items():
        if len(data) < block_size + 2:
            raise ValueError(f"the {name} split of {cfg.dataset!r} has {len(data)} tokens, fewer "
                             f"than block_size + 2 = {block_size + 2}: lower --block_size or add data")
    fit = context_length(meta, say=lambda *a: None)  # the data's own choice
    check_context(meta, block_size, cfg.max_new_tokens or generation_length(meta, block_size),
                  f"a context of {block_size} tokens (block_size)", "raise --block_size"
                  + (f" (0 chooses it from the data: {fit})" if block_size < fit else ""), say)


def main(argv):
    cfg = configure(TrainConfig(), argv)
    device, ctx = setup_device(cfg.device, cfg.autocast)
    world, device = ddp.init(device)  # ddp
    say = print if world.master else lambda *a, **k: None
    per_process = ddp.per_process_batch(cfg.batch_size, cfg.grad_accum, world)  # ddp
    refuse_to_overwrite(cfg.out_dir, cfg.init_from)
    meta = ensure_prepared(cfg.dataset) if world.size == 1 else load_meta(cfg.dataset)  # ddp: no race
    enc = load_encoding(cfg.dataset)
    block_size = cfg.block_size or context_length(meta, say)
    splits = {"train": load_tokens(cfg.dataset, "train"), "val": load_tokens(cfg.dataset, "val")}
    check_settings(cfg, meta, splits, block_size, say)
    torch.manual_seed(cfg.seed + world.rank)  # ddp: dropout differs from process to process
    model, optimizer, checkpoint = init_model(cfg, meta["vocab_size"], block_size, device)
    block_size = model.config.block_size
    if checkpoint is not None and checkpoint["config"]["dataset"] != cfg.dataset:
        raise ValueError(f"{cfg.out_dir}/last.pt was trained on {checkpoint['config']['dataset']!r}, "
                         f"not {cfg.dataset!r}")
    max_new_tokens = cfg.max_new_tokens or generation_length(meta, block_size)
    tokenizer = tokenizer_fingerprint(cfg.dataset)  # which tokenizer the checkpoints decode with
    val_records = load_records(cfg.dataset, "val")[:cfg.val_prompts] if world.master else []
    judge = "answer loss" if cfg.val_prompts else "loss"  # what picks ckpt.pt and ends training
    max_iters, eval_every = training_length(cfg, len(splits["train"]), block_size, judge, say)
    batch_gen = torch.Generator().manual_seed(cfg.seed)  # the same on every process
    iter_num, best_judged, best_iter, stale = 0, float("inf"), 0, 0  # stale: evaluations since the best
    last_eval = -1  # the iteration last evaluated
    if checkpoint is not None:  # continue exactly where the checkpoint left off
        iter_num, best_judged = checkpoint["iter_num"], checkpoint["best_judged"]
        best_iter, stale = checkpoint.get("best_iter", 0), checkpoint.get("stale_evals", 0)
        last_eval = checkpoint.get("last_eval", iter_num)  # (an interrupt saves between evaluations)
        batch_gen.set_state(checkpoint["batch_rng"])
        ddp.restore_rng(checkpoint["torch_rng"], world)
    train_model = ddp.wrap(torch.compile(model) if cfg.compile else model, world, device)
    val_prompts = encode_prompts(enc, val_records, model, max_new_tokens, device, "val prompts")
    say(f"{model.num_params() / 1e6:.2f}M parameters, dataset {cfg.dataset}, context {block_size}, "
        f"device {device}" + (f" x {world.size} processes" if world.size > 1 else "")
        + f", from {cfg.init_from} at iter {iter_num}")
    last_path, best_path = os.path.join(cfg.out_dir, "last.pt"), os.path.join(cfg.out_dir, "ckpt.pt")

    def model_state(**measured):
        """What ckpt.pt holds: the weights, the model's shape, the settings, what was measured."""
        return dict(model=model.state_dict(), model_args=asdict(model.config), iter_num=iter_num,
                    config=asdict(cfg), dataset=cfg.dataset, kind="target", max_iters=max_iters,
                    tokenizer=tokenizer, **measured)

    def save_last(state, rng):
        """last.pt: state and everything else needed to continue exactly from this iteration."""
        save_checkpoint(last_path, dict(
            state, optimizer=optimizer.state_dict(), best_judged=best_judged, best_iter=best_iter,
            stale_evals=stale, last_eval=last_eval, batch_rng=batch_gen.get_state(), torch_rng=rng))

    def evaluate_and_checkpoint():
        """Train/val loss, val answer loss and quality; last.pt always, ckpt.pt when the judge
        (the val answer loss, or the val loss without val prompts) is the best so far. Returns the
        line that stops training once patience evaluations brought no better one."""
        nonlocal best_judged, best_iter, stale, last_eval
        last_eval = iter_num
        rng = ddp.all_gather(torch.get_rng_state(), world)  # ddp: every process's
        if not world.master:
            return ddp.all_gather(None, world)[0]  # ddp: rank 0 decides
        losses = estimate_loss(model, splits, cfg, block_size, ctx, device)
        quality = greedy_quality(model, enc, val_prompts, val_records, meta["metric"], max_new_tokens)
        judged = (answer_loss(model, enc, val_records, max_new_tokens, device) if val_records
                  else losses["val"])
        model.train()
        best = judged < best_judged
        best_judged, best_iter, stale = (judged, iter_num, 0) if best else (best_judged, best_iter, stale + 1)
        print(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}"
              + (f", val answer loss {judged:.4f}" if val_records else "")
              + (f", val {meta['metric']} {quality:.3f}" if quality is not None else "")
              + (" (best so far: ckpt.pt)" if best else f" (best {best_judged:.4f} stays in ckpt.pt)"))
        state = model_state(val_loss=losses["val"], val_judged=judged)
        save_last(state, rng)
        if best:
            save_checkpoint(best_path, state)
        stop = None
        if cfg.patience and stale >= cfg.patience:
            stop = (f"stopped at iteration {iter_num}: {stale} evaluations without a better val {judge}; "
                    f"the best, {best_judged:.4f} at iteration {best_iter}, is ckpt.pt")
            print(stop)
        return ddp.all_gather(stop, world)[0]

    def exit_if_interrupted(interrupt):
        """After Ctrl-C or SIGTERM (to any process: all stop at the same step): last.pt at this
        iteration, and the line that says how to go on."""
        signum = ddp.first_of(interrupt.signal, world)  # ddp
        if signum:
            rng = ddp.all_gather(torch.get_rng_state(), world)  # ddp: every process's
            if world.master:
                save_last(model_state(), rng)
            ddp.finish(world)
            interrupt.exit(signum, f"stopped at iteration {iter_num} of {max_iters}, saved in "
                                   f"{last_path}")

    t_start = t0 = time.time()
    last_log, stopped = iter_num, None
    with Interrupt("train.py", argv, world.size, world.master) as interrupt:
        while iter_num < max_iters:
            exit_if_interrupted(interrupt)
            if iter_num % eval_every == 0 and iter_num != last_eval:  # (0 when fresh)
                stopped = evaluate_and_checkpoint()
                t0, last_log = time.time(), iter_num  # the evaluation is not training time
                if stopped:
                    break
            lr = set_lr(optimizer, iter_num, cfg, max_iters)
            starts = random_starts(splits["train"], block_size, cfg.batch_size, batch_gen)
            mine = ddp.my_share(starts, world, per_process * cfg.grad_accum)  # ddp
            loss_sum = 0.0
            for (_, sync), rows in zip(ddp.micro_steps(train_model, world, cfg.grad_accum),
                                           mine.split(per_process)):
                with ctx, sync:  # ddp: the processes average their gradients in the last micro-step
                    _, loss = train_model(*get_batch(splits["train"], rows, block_size, device))
                    (loss / cfg.grad_accum).backward()
                loss_sum = loss_sum + loss.detach() / cfg.grad_accum
            optimizer_step(model, optimizer, cfg.grad_clip)
            iter_num += 1
            if iter_num % cfg.log_interval == 0 or iter_num == max_iters:
                loss = ddp.all_sum([float(loss_sum)], world)[0] / world.size  # ddp: global mean
                dt = (time.time() - t0) / (iter_num - last_log)
                t0, last_log = time.time(), iter_num
                say(f"iter {iter_num}: loss {loss:.4f}, lr {lr:.2e}, time {dt * 1000:.0f}ms, "
                    f"{cfg.batch_size * block_size / dt:,.0f} tok/s, "
                    f"eta {(max_iters - iter_num) * dt / 60:.1f} min")
        if not stopped:
            if iter_num != last_eval:
                evaluate_and_checkpoint()
            exit_if_interrupted(interrupt)  # (a signal during that evaluation)
    improving = not stopped and best_iter == iter_num  # (rank 0 knows)
    say(f"trained {iter_num} iterations in {(time.time() - t_start) / 60:.1f} min"
        + (f": max_iters, with the val {judge} still improving (a larger --max_iters may train a "
           "better target)" if improving else ""))
    result = {}
    if world.master:
        best, saved = load_checkpoint(os.path.join(cfg.out_dir, "ckpt.pt"), device)
        records = load_records(cfg.dataset, "test")[:cfg.test_prompts]
        prompts = encode_prompts(enc, records, best, max_new_tokens, device, "test prompts")
        quality = greedy_quality(best, enc, prompts, records, meta["metric"], max_new_tokens)
        if records:
            print(f"held-out answer loss {answer_loss(best, enc, records, max_new_tokens, device):.4f}"
                  + (f", {meta['metric']} {quality:.3f}" if quality is not None else "")
                  + f" on {len(records)} test prompts, with ckpt.pt (iteration {saved['iter_num']})")
        result = dict(val_loss=saved["val_loss"], quality=quality)
    ddp.finish(world)
    return result


if __name__ == "__main__":
    run(main)
