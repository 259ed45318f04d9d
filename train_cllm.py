"""
Consistency distillation (CLLM paper, section 3.2): fine-tune the target model on its own Jacobi
trajectories so that it maps any intermediate state of a block to the block's fixed point, and so
gets several tokens right per forward pass while its greedy output stays the same.

    python train_cllm.py                           # the whole default pipeline on a CPU
    python train_cllm.py config/cllm_arith_long.py # a longer distillation
    python train_cllm.py --recipe=jacobi_forcing   # the successor's recipe (Hu, Kou et al. 2025)
    python train_cllm.py --init_from=resume        # continue out_dir/last.pt exactly

1. collect: the target decodes the training prompts with Jacobi; every state y^(0) .. y* of every
   block is kept (trajectories.py: out_dir/trajectories.pt, reused when the settings match).
2. distil: loss = consistency + ar_weight * AR, from the target's weights. Read the losses and
   distillation_loss_reference (the paper's equations, plain forwards) first; pack_row and
   distillation_loss compute the same in one forward pass per batch. Every eval_interval steps
   the quality guard (evaluate.py) keeps the best checkpoint within the target's quality.
3. report (evaluate.py): target vs CLLM on held-out prompts, with the checkpoint the guard kept:
   tokens per forward, tokens/s, speedup, quality, and a verdict.

On a fresh clone `python train_cllm.py` first prepares data/arith and trains the target
(python data/arith/prepare.py; python train.py) when they are missing.
"""

import copy
import os
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from typing import Literal

import torch
import torch.nn.functional as F

import distributed
import train
from bench import QUALITY_TOLERANCE, REPEAT_LIMIT
from configurator import configure, run
from data.common import generation_length, load_records
from evaluate import describe, evaluate, guard, report, stop_line
from packing import PackedRow, collate, pack
from trajectories import fingerprint, load_or_collect, load_target


@dataclass
class CLLMConfig:
    out_dir: str = "out-cllm-arith"
    target_dir: str = "out-arith"    # the target: target_dir/ckpt.pt, made by train.py
    dataset: str = "arith"
    init_from: Literal["target", "resume"] = "target"  # start from the target's weights, or
                                                       # continue out_dir/last.pt
    # 1. trajectories
    n: int = 16                      # Jacobi block size
    init: Literal["prefix", "repeat"] = "prefix"  # initial guess y^(0): jacobi.initial_guess
    num_prompts: int = 4000          # training prompts to collect trajectories on
    traj_max_new_tokens: int = 0     # 0: from the data (data/common.generation_length)
    collect_batch: int = 64          # prompts decoded side by side
    repeat_limit: int = REPEAT_LIMIT  # drop a prompt whose output repeats a token this many times
    # 2. distillation
    recipe: Literal["cllm", "jacobi_forcing"] = "cllm"  # cllm: states after a clean prefix
                                     # (the paper); jacobi_forcing: noisy streams (noisy_streams)
    consistency: Literal["global", "local"] = "global"  # the target: y*, or the next state
    ar_weight: float = 3.0           # loss = consistency + ar_weight * AR
    ar_target: Literal["ground_truth", "fixed_point"] = "ground_truth"  # AR labels: the
                                     # dataset's answer, or the target's own output y*
    label_smoothing: float = 0.0
    horizon: int = 0                 # consistency on this many logits from a state's first wrong
                                     # token on (consistency_mask; 0: all, the paper)
    states_per_block: int = 3        # cllm: states sampled per block and step (the paper: 1);
                                     # jacobi_forcing: noisy streams per prompt and step
    noise_window: int = 4            # jacobi_forcing: blocks over which the noise climbs 0 -> 1
    batch_size: int = 16             # prompts per step; each packs all of its blocks in one row
    grad_accum: int = 1              # micro-steps per step (see distributed.py)
    max_iters: int = 1200
    learning_rate: float = 1e-3
    min_lr: float = 1e-4
    warmup_iters: int = 50
    lr_decay_iters: int = 0          # 0: max_iters
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0
    # evaluation and the quality guard
    eval_interval: int = 200
    eval_prompts: int = 50           # held-out (val) prompts for the periodic Jacobi evaluation
    max_loss_rise: float = QUALITY_TOLERANCE["answer_loss"]  # an evaluation is acceptable when its
    max_quality_drop: float = QUALITY_TOLERANCE["quality"]   # val answer loss, task quality and
    max_repeat_rise: float = QUALITY_TOLERANCE["repeated"]   # repetition are this close to the target's
    guard_patience: int = 3          # stop after this many unacceptable evaluations in a row with
                                     # no fall of the answer loss or a rise of the
                                     # repetition (evaluate.guard; 0: never)
    max_new_tokens: int = 0          # 0: from the data (data/common.generation_length)
    final_prompts: int = 500         # held-out (test) prompts for the final table
    blocks: int = 2                  # multi-block Jacobi (decoders.py) over this many blocks of n,
                                     # measured at every eval and in the table (0: plain Jacobi only)
    lookup: bool = True              # the table also has prompt lookup, the training-free peer
    log_interval: int = 25
    device: str = "auto"
    compile: bool = False
    seed: int = 1337


# ----------------------------------------------------------------------------------------------
# 1. the trajectories: trajectories.py (load_or_collect)
# 2. the losses
# 3. evaluation, the quality guard and the final table: evaluate.py

def consistency_loss(student_logits, teacher_logits):
    """The consistency loss (paper section 3.2), over the unmasked block positions i:

        L = mean_i KL( q_theta-( . | x, yhat_<i ) || q_theta( . | x, y_<i ) )

    student_logits (N, V): the model on a state y. teacher_logits (N, V): the model on the state
    it should map to, yhat = y* for the global loss L_GC, y^(j+1) for the local loss L_LC;
    detached, since theta- is a stop-gradient copy of the current weights. Zero when y == yhat.
    """
    if len(student_logits) == 0:
        return student_logits.sum() * 0.0
    teacher = F.log_softmax(teacher_logits.detach().float(), dim=-1)
    student = F.log_softmax(student_logits.float(), dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean")


def ar_loss(logits, targets, label_smoothing=0.0):
    """The AR loss (paper section 3.2): L_AR = -mean_i log q_theta(l_i | x, l_<i) over the
    labelled positions (targets != -1), l = the target's output y* or the ground truth."""
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1),
                           ignore_index=-1, label_smoothing=label_smoothing)


def consistency_target(states, j, kind):
    """The state the model should map state j to: the fixed point (global) or the next (local;
    the fixed point maps to itself)."""
    if kind == "global":
        return len(states) - 1
    if kind == "local":
        return min(j + 1, len(states) - 1)
    raise ValueError(f"consistency must be 'global' or 'local', got {kind!r}")


def consistency_mask(state, target, horizon=0):
    """(b - 1,) which logits of a block count: the logit at token i predicts token i + 1 from
    inputs y_0 .. y_i; up to the first token where state and target differ the inputs are the
    same, so those positions are masked. horizon > 0 keeps only that many logits from the first
    wrong token on (the paper: all). (The authors' code keeps one more position, the logit
    that predicts the first differing token: its inputs are still the same and its KL is 0, so it
    only adds to the count the mean divides by.) Padding never enters a block."""
    differ = (state[:-1] != target[:-1]).long()
    first = int(differ.argmax()) if differ.any() else len(differ)
    i = torch.arange(len(differ))
    return (i >= first) & ((i < first + horizon) if horizon else True)


def consistency_pair(record, choice, kind):
    """(prefix, y, yhat) for one choice (k, js) of a record: y holds state js[0] of block k, state
    js[1] of block k + 1, ..; yhat the states they should map to (consistency_target); both
    continue prefix = prompt + y*_1 .. y*_{k-1}. The CLLM recipe picks one block (js = [j]),
    Jacobi Forcing a state of every block (k = 0): a noisy stream."""
    k, js = choice
    states = record["states"]
    prefix = torch.cat([record["prompt"], *(s[-1] for s in states[:k])]).long()
    y = torch.cat([states[k + i][j] for i, j in enumerate(js)]).long()
    yhat = torch.cat([states[k + i][consistency_target(states[k + i], j, kind)]
                      for i, j in enumerate(js)]).long()
    return prefix, y, yhat


def ar_labels(record, ar_target, context):
    """The AR labels l after the prompt: the dataset's answer (cut to the context) or y*."""
    if ar_target == "ground_truth":
        return record["answer"][:context - len(record["prompt"])].long()
    return torch.cat([s[-1] for s in record["states"]]).long()


def distillation_loss_reference(model, records, choices, cfg):
    """The loss of a batch, the paper's equations with one plain forward per sequence:

        loss = L_consistency + ar_weight * L_AR

    Each term is a mean over all its positions in the batch. Slow and obviously right: the
    packed distillation_loss below computes the same numbers in one forward, and
    tests/test_cllm.py checks that the two agree, loss and gradients.
    """
    context = model.config.block_size
    students, teachers, ar_logits, ar_targets = [], [], [], []
    for record, picks in zip(records, choices):
        prompt, labels = record["prompt"].long(), ar_labels(record, cfg.ar_target, context)
        logits, _ = model(torch.cat([prompt, labels[:-1]])[None])   # q_theta(. | x, l_<i)
        ar_logits.append(logits[0, len(prompt) - 1:])
        ar_targets.append(labels)
        for choice in picks:
            prefix, y, yhat = consistency_pair(record, choice, cfg.consistency)
            cols = len(prefix) + consistency_mask(y, yhat, cfg.horizon).nonzero().flatten()
            logits, _ = model(torch.cat([prefix, y])[None])          # q_theta(. | x, y_<i)
            students.append(logits[0, cols])
            with torch.no_grad():
                logits, _ = model(torch.cat([prefix, yhat])[None])   # q_theta-(. | x, yhat_<i)
            teachers.append(logits[0, cols])
    none = model.lm_head.weight.new_zeros(0, model.config.vocab_size)  # (a batch of fixed points)
    l_c = consistency_loss(torch.cat([none, *students]), torch.cat([none, *teachers]))  # L_GC (or L_LC)
    l_ar = ar_loss(torch.cat(ar_logits), torch.cat(ar_targets), cfg.label_smoothing)  # L_AR
    return l_c + cfg.ar_weight * l_ar, l_c, l_ar


# ----------------------------------------------------------------------------------------------
# packing (packing.py): the same loss in one forward pass per batch

def pack_row(record, picks, cfg, context):
    """One training row holding every sequence distillation_loss_reference runs for a record:

        [prompt y*_1 .. y*_K] [ground truth] [y of choice 1] [yhat of choice 1, if local] [..]

    Every segment after the first continues a prefix of the first, and packing.pack lays them out
    so that its logits are those of a separate forward of prefix + segment. The first gives the AR
    term when the labels are y*, and the global teachers (y*_k sits in it); the ground-truth
    segment gives the AR term on the dataset's answer. One forward replaces 2 + 2 * choices.
    """
    prompt = record["prompt"].long()
    P = len(prompt)
    main = torch.cat([prompt, *(s[-1] for s in record["states"])]).long()  # prompt y*_1 .. y*_K
    segments = [(main, 0, 0)]  # (tokens, position of the first, how many first columns it sees)
    labels = [torch.full((len(main),), -1)]
    if cfg.ar_target == "fixed_point":
        labels[0][P - 1:-1] = main[P:]
    else:
        gt = ar_labels(record, cfg.ar_target, context)
        labels[0][P - 1] = gt[0]
        segments.append((gt, P, P))
        labels.append(torch.cat([gt[1:], torch.tensor([-1])]))
    pairs = []  # (student segment, teacher segment, teacher's first column in it, columns)
    for choice in picks:
        prefix, y, yhat = consistency_pair(record, choice, cfg.consistency)
        start = len(prefix)
        segments.append((y, start, start))
        labels.append(torch.full((len(y),), -1))
        student = len(segments) - 1
        if torch.equal(yhat, main[start:start + len(yhat)]):
            teacher, offset = 0, start  # the fixed points, already in the first segment
        else:
            segments.append((yhat, start, start))
            labels.append(torch.full((len(yhat),), -1))
            teacher, offset = len(segments) - 1, 0
        pairs.append((student, teacher, offset, consistency_mask(y, yhat, cfg.horizon).nonzero().flatten()))
    tokens, positions, attn, first_col = pack(segments)
    empty = torch.zeros(0, dtype=torch.long)
    return PackedRow(tokens, positions, attn, torch.cat(labels),
                     torch.cat([empty] + [first_col[st] + cols for st, _, _, cols in pairs]),
                     torch.cat([empty] + [first_col[te] + off + cols for _, te, off, cols in pairs]))


def distillation_loss(model, batch, cfg, shares=(1.0, 1.0)):
    """(total, consistency, AR) for one packed batch: consistency + ar_weight * AR.

    shares: the batch's share of the consistency positions and of the AR labels of the whole step
    when it is one part of it (a micro-step, or one process's part): the two means are weighted by
    them, so that the parts' losses add up to the loss of the whole batch."""
    tokens, positions, attn, labels, student, teacher = batch
    logits, _ = model(tokens, input_pos=positions, attn_mask=attn)  # (B, T, V)
    l_c = consistency_loss(logits[student[:, 0], student[:, 1]], logits[teacher[:, 0], teacher[:, 1]])
    l_ar = ar_loss(logits, labels, cfg.label_smoothing) if (labels != -1).any() else logits.sum() * 0.0
    l_c, l_ar = shares[0] * l_c, shares[1] * l_ar
    return l_c + cfg.ar_weight * l_ar, l_c, l_ar


# ----------------------------------------------------------------------------------------------
# which states a step trains on: the two recipes

def sample_choices(record, k, generator):
    """The CLLM recipe: for every block, k distinct non-fixed-point states drawn uniformly (fewer
    if it has fewer), each seen after the clean prefix prompt + y*_<k. The paper draws one; more
    per block put more of each packed row to use."""
    return [(b, [j]) for b, s in enumerate(record["states"])
            for j in torch.randperm(len(s) - 1, generator=generator)[:k].tolist()]


def noise_ratio(state, fixed):
    """Jacobi Forcing's noise of a state: the share of its block from the first wrong token on."""
    wrong = (state != fixed).nonzero()
    return (len(state) - int(wrong[0])) / len(state) if len(wrong) else 0.0


def noisy_streams(record, k, window, generator):
    """The Jacobi Forcing recipe: k noisy streams, each a state of every block, seen after the
    prompt and the earlier *noisy* blocks. Progressive noise: block j aims at the noise ratio
    t = schedule[(phase + j) mod window], schedule = linspace(0, 1, window), and takes the state
    whose noise_ratio is nearest t. The phase is drawn per stream: Jacobi Forcing's answers have
    ~32 blocks and a fixed phase, ours ~3, which would always train the first block clean."""
    if not record["states"]:
        return []
    schedule = torch.linspace(0, 1, window).tolist()
    streams = []
    for _ in range(k):
        phase = int(torch.randint(window, (1,), generator=generator))
        js = []
        for b, s in enumerate(record["states"]):
            t = schedule[(phase + b) % window]
            noise = [abs(noise_ratio(state, s[-1]) - t) for state in s]
            js.append(noise.index(min(noise)))
        streams.append((0, js))
    return streams


def choose_states(records, cfg, generator):
    """For each record, the choices (k, js) that one step trains on (see consistency_pair)."""
    if cfg.recipe == "cllm":
        return [sample_choices(r, cfg.states_per_block, generator) for r in records]
    return [noisy_streams(r, cfg.states_per_block, cfg.noise_window, generator) for r in records]


# ----------------------------------------------------------------------------------------------

def main(argv):
    cfg = configure(CLLMConfig(), argv)
    device, ctx = train.setup_device(cfg.device)
    world, device = distributed.init(device)  # ddp
    say = print if world.master else lambda *a, **k: None
    per_process = distributed.per_process_batch(cfg.batch_size, cfg.grad_accum, world)  # ddp
    train.refuse_to_overwrite(cfg.out_dir, cfg.init_from)
    if cfg.eval_prompts < 1:
        raise ValueError("eval_prompts must be at least 1: the guard chooses the CLLM by them")
    target, meta, enc = load_target(cfg, device, world)
    context = target.config.block_size
    cfg = replace(cfg, max_new_tokens=cfg.max_new_tokens or generation_length(meta, context),
                  traj_max_new_tokens=cfg.traj_max_new_tokens or generation_length(meta, context))
    max_new_tokens = cfg.max_new_tokens
    torch.manual_seed(cfg.seed + world.rank)
    target_id = fingerprint(target.state_dict())  # which target the trajectories and CLLM come from
    prompts = load_or_collect(cfg, target, target_id, enc, world)
    if not prompts:
        raise ValueError("no usable trajectories (every prompt was dropped as repetitive)")

    # 2. distil, from the target's weights or from last.pt of this script
    last_path, best_path = os.path.join(cfg.out_dir, "last.pt"), os.path.join(cfg.out_dir, "ckpt.pt")
    batch_gen = torch.Generator().manual_seed(cfg.seed)  # the same on every process
    iter_num, curve, train_secs, stopped = 0, [], 0.0, None
    last_eval = -1  # the iteration of the last evaluation, known to every process
    if cfg.init_from == "resume":
        model, checkpoint = train.load_checkpoint(last_path, device)
        train.note_changed_settings(checkpoint["config"], cfg)
        iter_num, curve, train_secs = checkpoint["iter_num"], checkpoint["curve"], checkpoint["train_secs"]
        last_eval = curve[-1]["iter"]
        batch_gen.set_state(checkpoint["batch_rng"])
        distributed.restore_rng(checkpoint["torch_rng"], world)
    else:
        model = copy.deepcopy(target)  # the CLLM starts from the target's weights
    model.train()
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.learning_rate,
                                           (cfg.beta1, cfg.beta2), device.type)
    if cfg.init_from == "resume":
        optimizer.load_state_dict(checkpoint["optimizer"])
    train_model = distributed.wrap(torch.compile(model) if cfg.compile else model, world, device)
    tolerance = dict(answer_loss=cfg.max_loss_rise, quality=cfg.max_quality_drop,
                     repeated=cfg.max_repeat_rise)
    eval_records = load_records(cfg.dataset, "val")[:cfg.eval_prompts] if world.master else []
    eval_prompts = train.encode_prompts(enc, eval_records, model, max_new_tokens, device, "val prompts")
    say(f"distilling {model.num_params() / 1e6:.2f}M parameters on {len(prompts)} prompts "
        f"({sum(len(p['states']) for p in prompts)} blocks): {cfg.recipe} recipe, {cfg.consistency} "
        f"consistency + {cfg.ar_weight} * AR ({cfg.ar_target}), from iter {iter_num} to {cfg.max_iters}")

    def evaluate_and_save():
        """Evaluate on the val prompts; last.pt always, ckpt.pt when the guard has a new best."""
        nonlocal stopped, last_eval
        last_eval = iter_num
        rng = distributed.all_gather(torch.get_rng_state(), world)  # ddp: every process's
        if world.master:
            t = time.time()
            e = evaluate(model, enc, eval_prompts, eval_records, cfg, meta["metric"], max_new_tokens, device)
            curve.append(dict(iter=iter_num, train_minutes=round(train_secs / 60, 2), **e))
            best, problems, stop = guard(curve, tolerance, cfg.guard_patience)
            print(describe(curve[-1], meta["metric"], len(eval_records), time.time() - t,
                           None if best == len(curve) - 1 else curve[best]["iter"], problems))
            state = dict(model=model.state_dict(), model_args=asdict(model.config), iter_num=iter_num,
                         config=asdict(cfg), dataset=cfg.dataset, kind="cllm", target=target_id,
                         curve=curve)
            if iter_num > 0:
                train.save_checkpoint(last_path, dict(
                    state, optimizer=optimizer.state_dict(), train_secs=train_secs,
                    batch_rng=batch_gen.get_state(), torch_rng=rng))
            if best == len(curve) - 1:
                train.save_checkpoint(best_path, state)
            if stop:
                stopped = stop_line(curve, cfg.guard_patience, tolerance)
                print(stopped)
        stopped = distributed.all_gather(stopped, world)[0]  # ddp: rank 0 decides

    t0, last_log = time.time(), iter_num
    while iter_num < cfg.max_iters and not stopped:
        if iter_num % cfg.eval_interval == 0 and last_eval != iter_num:
            evaluate_and_save()
            t0, last_log = time.time(), iter_num
            if stopped:
                break
        lr = train.get_lr(iter_num, cfg, cfg.max_iters)
        for group in optimizer.param_groups:
            group["lr"] = lr
        model.train()  # (evaluation leaves it in eval mode)
        step_start = time.time()
        idx = torch.randint(len(prompts), (cfg.batch_size,), generator=batch_gen).tolist()
        picked = [prompts[i] for i in idx]
        choices = choose_states(picked, cfg, batch_gen)  # drawn for the whole batch by every process
        mine = distributed.my_share(list(zip(picked, choices)), world, per_process * cfg.grad_accum)
        rows = [pack_row(r, c, cfg, context) for r, c in mine]
        counts = distributed.all_sum([sum(len(r.student) for r in rows),  # ddp: the whole batch's
                                      sum(int((r.labels != -1).sum()) for r in rows)], world)
        terms = torch.zeros(2)
        for micro in range(cfg.grad_accum):
            part = rows[micro * per_process:(micro + 1) * per_process]
            shares = (sum(len(r.student) for r in part) / max(counts[0], 1),
                      sum(int((r.labels != -1).sum()) for r in part) / max(counts[1], 1))
            last_micro = micro == cfg.grad_accum - 1  # ddp: average the gradients only then
            with ctx, (train_model.no_sync() if world.size > 1 and not last_micro else nullcontext()):
                loss, l_c, l_ar = distillation_loss(train_model, collate(part, device), cfg, shares)
                (loss * world.size).backward()  # DDP averages over the processes; the shares sum
            terms += torch.stack([l_c.detach().float().cpu(), l_ar.detach().float().cpu()])
        train.optimizer_step(model, optimizer, cfg.grad_clip)
        train_secs += time.time() - step_start
        iter_num += 1
        if iter_num % cfg.log_interval == 0 or iter_num == cfg.max_iters:
            l_c, l_ar = distributed.all_sum(terms.tolist(), world)  # ddp: the whole batch's means
            dt = (time.time() - t0) / (iter_num - last_log)
            t0, last_log = time.time(), iter_num
            say(f"iter {iter_num}: loss {l_c + cfg.ar_weight * l_ar:.4f} (consistency {l_c:.4f}, "
                f"ar {l_ar:.4f}), lr {lr:.2e}, time {dt * 1000:.0f}ms, "
                f"eta {(cfg.max_iters - iter_num) * dt / 60:.1f} min")
    if not stopped and last_eval != iter_num:
        evaluate_and_save()
    results = {}
    if world.master:
        results = report(cfg, target, enc, meta, curve, stopped, tolerance, max_new_tokens, device)
    distributed.finish(world)
    return results


if __name__ == "__main__":
    run(main)
