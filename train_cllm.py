"""
Consistency distillation (CLLM paper, section 3.2): fine-tune a target model on its own Jacobi
trajectories so that it maps any intermediate state of a block to the block's fixed point, and so
gets several tokens right per forward pass, while an AR loss keeps its answers close to the
target's (the quality guard keeps a checkpoint only when they are).

    python train_cllm.py                           # distil the shipped arith target on a CPU
    python train_cllm.py --target_dir=out-arith    # distil a target you trained (python train.py)
    python train_cllm.py --init_from=resume        # continue out_dir/last.pt exactly
    python train_cllm.py --help                    # every setting, its default and its meaning

Ctrl-C or a scheduler's SIGTERM stops it after the current step, with last.pt saved (from the
first evaluation on; before it there is nothing to save), and prints the command that goes on.

Read top to bottom (main, at the end, runs the steps in this order):
1. trajectories: the target Jacobi-decodes the training prompts (collect_batch, a call into
   jacobi.collect_trajectories); every state y^(0) .. y* of every block is kept:
       record = {"prompt": (P,) ids, "answer": (A,) ground truth + EOS, "states": [(S_k, b_k)]}
2. the losses: consistency_loss and ar_loss, the paper's equations, and
   distillation_loss_reference, the loss of a batch with one plain forward per sequence;
3. the packed batch: pack_row, collate and distillation_loss compute the same in one forward;
4. the loop: AdamW from the target's weights (train_step); every eval_interval steps the CLLM is
   Jacobi-decoded on val prompts and the quality guard (guard) picks the checkpoint kept in
   ckpt.pt: the most tokens per forward within the target's quality (evaluate_and_keep);
5. the report: target vs CLLM on held-out test prompts (extras/table.py).
Saving trajectories once, DDP, the report's wording and the Jacobi Forcing recipe are extras/.
"""

import copy
import os
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F

from common import (Interrupt, encode_prompts, fingerprint, load_model, optimizer_step,
                    refuse_to_overwrite, run, save_checkpoint, set_lr, setup_device, tokenizer_fingerprint)
from data.common import ensure_prepared, generation_length, load_encoding, load_meta, load_records, trajectory_length
from extras import ddp
from extras.configurator import check_cllm_settings, configure
from extras.jacobi_forcing import load_previous_round, noisy_streams
from extras.quality import (QUALITY_TOLERANCE, REPEAT_LIMIT, describe, evaluate, quality_problems, stop_line,
                            tolerance_of, unfit_target)
from extras.resume import exit_if_interrupted, resume, save_last
from extras.table import cost_line, loss_line, report
from extras.trajectories import load_or_collect
from jacobi import collect_trajectories
from model import pack


@dataclass
class CLLMConfig:
    out_dir: str = "out-cllm-arith"  # the CLLM: out_dir/ckpt.pt, last.pt, trajectories.pt
    target_dir: str = "pretrained/arith-target"  # the target: target_dir/ckpt.pt
    dataset: str = "arith"           # data/<dataset>, made by data/<dataset>/prepare.py
    init_from: Literal["target", "resume"] = "target"  # the target's weights, or out_dir/last.pt
    # 1. trajectories
    n: int = 16                      # Jacobi block size of the trajectories (training)
    guess: Literal["prefix", "repeat"] = "prefix"  # the initial guess y^(0) (jacobi.initial_guess)
    num_prompts: int = 4000          # training prompts to collect trajectories on
    # 2. the losses: consistency + ar_weight * AR
    consistency: Literal["global", "local"] = "global"  # map a state to y*, or to the next state
    ar_weight: float = 10.0          # the weight w of the AR loss (the authors'; docs/results.md
                                     # compares 3, 5 and 10)
    ar_target: Literal["ground_truth", "fixed_point"] = "fixed_point"  # AR labels: the target's
                                     # own output y* (the authors'), or the data's answer
    states_per_block: int = 2        # states sampled per block and step (the paper: 1; 0: no
                                     # consistency loss, the AR-only control of a run)
    # 3. optimisation (AdamW, betas 0.9/0.99, no weight decay; warm-up, then cosine to min_lr)
    batch_size: int = 16             # prompts per step; each packs all of its blocks in one row
    max_iters: int = 2200            # optimizer steps
    learning_rate: float = 1e-3      # after warmup_iters, cosine decay to min_lr
    min_lr: float = 1e-4             # the learning rate at the end
    # 4. evaluation: which checkpoint is the CLLM, and the final table
    decode_n: int = 0                # Jacobi block size of the evaluations and the table; 0: n
    eval_interval: int = 200         # Jacobi-decode the val prompts every this many steps
    val_prompts: int = 50            # val prompts of each evaluation
    test_prompts: int = 200          # test prompts of the final table (0: no table), where the
                                     # CLLM is paired with its target prompt by prompt
    max_loss_rise: float = QUALITY_TOLERANCE["answer_loss"]  # the guard accepts this much more
                                     # answer loss than the target's,
    max_quality_drop: float = QUALITY_TOLERANCE["quality"]  # this much less task quality,
    max_repeat_rise: float = QUALITY_TOLERANCE["repeated"]  # and this much more repetition
    guard_patience: int = 5          # stop after this many unacceptable evaluations that do not
                                     # recover (0: never); distilling arith dips for up to 5
    seed: int = 1337                 # the trajectories' guesses, the batches, the states drawn
    device: str = "auto"             # auto: cuda when there is one, else cpu
    # practicalities (defaults that rarely need changing)
    traj_max_new_tokens: int = 0     # tokens decoded per prompt in the collection; 0: whole blocks
                                     # of n that 95% of the data's answers fit in
    max_new_tokens: int = 0          # tokens decoded per prompt in the evaluations and the table;
                                     # 0: from the data
    collect_batch: int = 64          # prompts decoded side by side in the collection
    repeat_limit: int = REPEAT_LIMIT  # collection: drop a prompt whose output repeats a token this
                                     # many times (the guard and the table count at REPEAT_LIMIT)
    warmup_iters: int = 50           # linear warm-up steps
    lr_decay_iters: int = 0          # cosine reaches min_lr here; 0: at max_iters
    grad_clip: float = 1.0           # clip the gradient norm to this (0: no clipping)
    grad_accum: int = 1              # micro-steps per step (extras/ddp.py)
    log_interval: int = 25           # a progress line every this many steps
    force: bool = False              # distil a target that the check before collection calls unfit
    compile: bool = False            # torch.compile the model (a GPU setting)
    autocast: Literal["auto", "bfloat16", "float32"] = "auto"  # training precision: auto =
                                     # bf16 autocast on CUDA, float32 on CPU; bfloat16 on a CPU too
    # extras (a learner may skip them)
    recipe: Literal["cllm", "jacobi_forcing"] = "cllm"  # jacobi_forcing: noisy streams of states
                                     # (extras/jacobi_forcing.py); states_per_block streams
    noise_window: int = 4            # jacobi_forcing: blocks over which the noise climbs 0 -> 1
    previous_round: str = ""         # a CLLM's out_dir: its ckpt.pt collects the trajectories and
                                     # is the start (Jacobi Forcing's progressive rounds)
    horizon: int = 0                 # consistency on this many logits from a state's first wrong
                                     # token on (0: all, the paper)
    label_smoothing: float = 0.0     # of the AR loss
    blocks: int = 2                  # the sliding-window decoder (extras/decoders.py) over blocks
                                     # * decode_n tokens, in the evaluations and the table (0: none)
    lookup: bool = False             # the table also has prompt lookup, the training-free peer


# ----------------------------------------------------------------------------------------------
# 1. trajectories

def collect_batch(cfg, source, enc, records, ids, first):
    """The records of one batch of training prompts (ids: their token ids): the source model (the
    target, or the previous round's CLLM) Jacobi-decodes them side by side, prompt i with seed
    cfg.seed + first + i. A prompt whose output repeats one token repeat_limit times is dropped:
    it teaches collapse. Returns (records, how many prompts were dropped)."""
    trajectories = collect_trajectories(source, ids, cfg.n, cfg.traj_max_new_tokens, enc.eot_token,
                                        cfg.guess, [cfg.seed + first + i for i in range(len(ids))],
                                        cfg.repeat_limit)
    kept = [dict(prompt=prompt, answer=torch.tensor(enc.encode_ordinary(r["answer"]) + [enc.eot_token]),
                 states=[block.states.to(torch.int32).cpu() for block in trajectory])
            for r, prompt, trajectory in zip(records, ids, trajectories) if trajectory is not None]
    return kept, len(ids) - len(kept)


# ----------------------------------------------------------------------------------------------
# 2. the losses

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


def consistency_mask(state, target, horizon=0, lengths=None):
    """(b - 1,) which logits of a block count: the logit at token i predicts token i + 1 from
    inputs y_0 .. y_i; up to the first token where state and target differ the inputs are the
    same, so those positions are masked. horizon > 0 keeps only that many logits from the first
    wrong token on (the paper: all). (The authors' code keeps one more position, the logit
    that predicts the first differing token: its inputs are still the same and its KL is 0, so it
    only adds to the count the mean divides by.)

    lengths: of the blocks that state is made of, for Jacobi Forcing's mask: then
    (b,) each block counts from its own first wrong token to its end, its last logit (that
    predicts the next block's first token) included, and a right block after a wrong one counts
    nothing."""
    if lengths is not None:  # (each block with one shared token appended: its mask covers all b logits)
        return torch.cat([consistency_mask(torch.cat([s, s[-1:]]), torch.cat([t, s[-1:]]), horizon)
                          for s, t in zip(state.split(lengths), target.split(lengths))])
    differ = (state[:-1] != target[:-1]).long()
    first = int(differ.argmax()) if differ.any() else len(differ)
    i = torch.arange(len(differ))
    return (i >= first) & ((i < first + horizon) if horizon else True)


def kept_columns(record, choice, y, yhat, cfg):
    """The positions of y whose logits the consistency loss counts: consistency_mask over y, for
    a Jacobi Forcing stream block by block."""
    lengths = [len(s[-1]) for s in record["states"][choice[0]:]] if cfg.recipe == "jacobi_forcing" else None
    return consistency_mask(y, yhat, cfg.horizon, lengths).nonzero().flatten()


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
            cols = len(prefix) + kept_columns(record, choice, y, yhat, cfg)
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
# 3. the packed batch: the same loss in one forward pass per batch

class PackedRow(NamedTuple):
    tokens: torch.Tensor     # (T,)
    positions: torch.Tensor  # (T,) the position each token has in its own sequence
    attn: torch.Tensor       # (T, T) bool, True where a query may attend to a key
    labels: torch.Tensor     # (T,) AR labels, -1 where none
    student: torch.Tensor    # (C,) columns whose logits are the students of the consistency loss
    teacher: torch.Tensor    # (C,) and the columns of their teachers


def pack_row(record, picks, cfg, context):
    """One training row holding every sequence distillation_loss_reference runs for a record:

        [prompt y*_1 .. y*_K] [ground truth] [y of choice 1] [yhat of choice 1, if local] [..]

    Every segment after the first continues a prefix of the first, and model.pack lays them out
    so that its logits are those of a separate forward of prefix + segment. The first segment
    gives the AR term when the labels are y*, and the global teachers (y*_k sits in it); the
    ground-truth segment gives the AR term on the dataset's answer. One forward
    of the row replaces the reference's 1 + 2 * len(picks) forwards (up to 1 + 4K with the
    defaults: K blocks, 2 states each).
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
        pairs.append((student, teacher, offset, kept_columns(record, choice, y, yhat, cfg)))
    tokens, positions, attn, first_col = pack(segments)  # model.pack
    empty = torch.zeros(0, dtype=torch.long)
    return PackedRow(tokens, positions, attn, torch.cat(labels),
                     torch.cat([empty] + [first_col[st] + cols for st, _, _, cols in pairs]),
                     torch.cat([empty] + [first_col[te] + off + cols for _, te, off, cols in pairs]))


class Batch(NamedTuple):
    """Packed rows padded to one batch (collate): the input of distillation_loss."""
    tokens: torch.Tensor     # (B, T)
    positions: torch.Tensor  # (B, T)
    attn: torch.Tensor       # (B, T, T) bool
    labels: torch.Tensor     # (B, T) AR labels, -1 where none
    student: torch.Tensor    # (C, 2) (row, column) of each logit the consistency loss trains
    teacher: torch.Tensor    # (C, 2) (row, column) of the logit it is pulled towards


def collate(rows, device):
    """Pad packed rows to one Batch. Padding attends only to itself (a query that sees nothing
    would make softmax NaN) and has no label. Consistency columns become (row, column) pairs."""
    B, T = len(rows), max(len(r.tokens) for r in rows)
    tokens = torch.zeros(B, T, dtype=torch.long)
    positions = torch.zeros(B, T, dtype=torch.long)
    attn = torch.eye(T, dtype=torch.bool).repeat(B, 1, 1)
    labels = torch.full((B, T), -1, dtype=torch.long)
    for b, r in enumerate(rows):
        L = len(r.tokens)
        tokens[b, :L], positions[b, :L], attn[b, :L, :L], labels[b, :L] = r.tokens, r.positions, r.attn, r.labels
    pairs = lambda cols: torch.cat([torch.stack([torch.full_like(c, b), c], 1) for b, c in enumerate(cols)])
    batch = Batch(tokens, positions, attn, labels, pairs([r.student for r in rows]),
                  pairs([r.teacher for r in rows]))
    return Batch(*(t.to(device) for t in batch))


def distillation_loss(model, batch, cfg, shares=(1.0, 1.0)):
    """(total, consistency, AR) for one packed Batch: consistency + ar_weight * AR.

    shares: the batch's share of the consistency positions and of the AR labels of the whole step
    when it is one part of it (a micro-step, or one process's part): the two means are weighted by
    them, so that the parts' losses add up to the loss of the whole batch."""
    logits, _ = model(batch.tokens, input_pos=batch.positions, attn_mask=batch.attn)  # (B, T, V)
    student, teacher = batch.student, batch.teacher
    l_c = consistency_loss(logits[student[:, 0], student[:, 1]], logits[teacher[:, 0], teacher[:, 1]])
    # (a part without labels would make the mean NaN; the check reads the device once per micro-step)
    l_ar = ar_loss(logits, batch.labels, cfg.label_smoothing) if (batch.labels != -1).any() else logits.sum() * 0.0
    l_c, l_ar = shares[0] * l_c, shares[1] * l_ar
    return l_c + cfg.ar_weight * l_ar, l_c, l_ar


def sample_choices(record, count, generator):
    """Which states a step trains on, the CLLM recipe: for every block k, `count` distinct
    non-fixed-point states drawn uniformly (fewer if it has fewer), each seen after the clean
    prefix prompt + y*_<k. The paper draws one; more put more of each packed row to use."""
    return [(k, [j]) for k, s in enumerate(record["states"])
            for j in torch.randperm(len(s) - 1, generator=generator)[:count].tolist()]


def choose_states(records, cfg, generator):
    """For each record, the choices (k, js) that one step trains on (see consistency_pair)."""
    if cfg.recipe == "cllm":
        return [sample_choices(r, cfg.states_per_block, generator) for r in records]
    return [noisy_streams(r, cfg.states_per_block, cfg.noise_window, generator) for r in records]


# ----------------------------------------------------------------------------------------------
# 4. the loop

def guard(curve, tolerance, patience):
    """The quality guard: which evaluation is the CLLM, and whether to stop. curve[0] is the
    target's own evaluation; a point is acceptable when its answer loss, task quality and share of
    repetitive outputs are within the tolerance of the target's (quality_problems lists those that
    are not). Returns (the index of the acceptable point with the most tokens/forward, the
    problems of the last point, whether to stop: the last `patience` points were all unacceptable
    and over them the answer loss did not fall or the repetition rose, a collapse rather than the
    dip that distillation often makes early and recovers from)."""
    problems = [quality_problems(point, curve[0], tolerance) for point in curve]
    best = max((i for i, p in enumerate(problems) if not p), key=lambda i: curve[i]["tokens_per_forward"])
    bad = curve[max(i for i, p in enumerate(problems) if not p) + 1:]  # unacceptable, in a row
    stop = 0 < patience <= len(bad) and (bad[-1]["answer_loss"] >= bad[-patience]["answer_loss"] or
                                         bad[-1]["repeated"] > bad[-patience]["repeated"])
    return best, problems[-1], stop


@dataclass
class Progress:
    """Where a run stands. last.pt keeps it with the weights and the optimizer (but `stopped`, which
    the guard works out again from the curve)."""
    iter_num: int = 0
    curve: list = field(default_factory=list)  # an evaluation every eval_interval steps; [0]: the target's
    train_secs: float = 0.0                    # time spent in train_step
    batch_gen: torch.Generator = None          # draws batches and states, the same on every process
    stopped: str = None                        # the guard's stop line, once it has stopped the run


def train_step(model, train_model, optimizer, records, cfg, progress, world, autocast):
    """One optimizer step on batch_size records drawn at random, each a packed row (pack_row);
    under DDP each process takes its share. Returns this process's part of the step's (consistency,
    AR), on the device: summed over the processes (ddp.all_sum), the step's means."""
    drawn = torch.randint(len(records), (cfg.batch_size,), generator=progress.batch_gen).tolist()
    picked = [records[i] for i in drawn]
    choices = choose_states(picked, cfg, progress.batch_gen)  # for the whole batch, on every process
    mine = ddp.my_share(list(zip(picked, choices)), world, len(picked) // world.size)
    rows = [pack_row(r, c, cfg, model.config.block_size) for r, c in mine]
    terms = torch.zeros(2, device=model.lm_head.weight.device)
    # shares: a part's share of the step's positions; one process, one micro-step: (1, 1), and the
    # loss is distillation_loss_reference's
    for part, shares, sync in ddp.micro_batches(rows, train_model, world, cfg.grad_accum):
        with autocast, sync:
            loss, l_c, l_ar = distillation_loss(train_model, collate(part, terms.device), cfg, shares)
            (loss * world.size).backward()  # DDP averages over the processes; the shares sum
        terms += torch.stack([l_c.detach().float(), l_ar.detach().float()])
    optimizer_step(model, optimizer, cfg.grad_clip)
    return terms


def checkpoint_of(model, progress, about):
    """What ckpt.pt holds: the weights, the model's shape, what it was distilled from, the curve."""
    return dict(about, model=model.state_dict(), model_args=asdict(model.config),
                iter_num=progress.iter_num, curve=progress.curve)


def evaluate_and_keep(point, model, target, progress, about, tolerance, cfg):
    """Add an evaluation to the curve and let the guard judge it: ckpt.pt when it is the best so
    far (at iteration 0, the target's weights), and the stop line when it says stop."""
    progress.curve.append(dict(iter=progress.iter_num, train_minutes=round(progress.train_secs / 60, 2), **point))
    best, problems, stop = guard(progress.curve, tolerance, cfg.guard_patience)
    newest = best == len(progress.curve) - 1
    print(describe(progress.curve[-1], about["metric"], None if newest else progress.curve[best]["iter"], problems))
    if newest:
        state = checkpoint_of(model, progress, about)
        save_checkpoint(os.path.join(cfg.out_dir, "ckpt.pt"),
                        state if progress.iter_num else dict(state, model=target.state_dict()))
    if stop:
        progress.stopped = stop_line(progress.curve, cfg.guard_patience, tolerance)
        print(progress.stopped)


def main(argv):
    cfg = configure(CLLMConfig(), argv)
    device, autocast = setup_device(cfg.device, cfg.autocast)
    world, device = ddp.init(device)
    ddp.per_process_batch(cfg.batch_size, cfg.grad_accum, world)  # (refuses a batch that does not split)
    say = print if world.master else lambda *a, **k: None
    refuse_to_overwrite(cfg.out_dir, cfg.init_from)
    # a fresh clone prepares data/arith here (~5 s); under torchrun it must be there already
    meta = ensure_prepared(cfg.dataset) if world.size == 1 else load_meta(cfg.dataset)
    target, target_ckpt = load_model(os.path.join(cfg.target_dir, "ckpt.pt"), device, cfg.dataset, say)
    enc, context = load_encoding(cfg.dataset), target.config.block_size
    cfg = replace(cfg, decode_n=cfg.decode_n or cfg.n,
                  max_new_tokens=cfg.max_new_tokens or generation_length(meta, context),
                  traj_max_new_tokens=cfg.traj_max_new_tokens or trajectory_length(meta, context, cfg.n))
    check_cllm_settings(cfg, meta, context, say)
    interrupt = Interrupt("train_cllm.py", argv, world.size, world.master)  # Ctrl-C, SIGTERM
    torch.manual_seed(cfg.seed + world.rank)
    target_id = fingerprint(target.state_dict())  # which target the trajectories and CLLM come from
    source = load_previous_round(cfg, target_id, device, say) if cfg.previous_round else target
    about = dict(config=asdict(cfg), dataset=cfg.dataset, kind="cllm", target=target_id, metric=meta["metric"],
                 tokenizer=tokenizer_fingerprint(cfg.dataset))  # what each checkpoint says it is
    val_records = load_records(cfg.dataset, "val")[:cfg.val_prompts] if world.master else []
    val_prompts = encode_prompts(enc, val_records, target, cfg.max_new_tokens, device, "val prompts")
    evaluate_on_val = lambda m: evaluate(m, enc, val_prompts, val_records, cfg, meta["metric"], device)

    # 0. is the target worth distilling? Its evaluation is also the first point of the curve
    target_point = evaluate_on_val(target) if world.master and cfg.init_from == "target" else None
    unfit = target_point and unfit_target(target_point, val_records, enc, cfg.max_new_tokens, meta["metric"])
    unfit = ddp.all_gather(unfit, world)[0]  # (rank 0's)
    if unfit and not cfg.force:
        raise ValueError(unfit)

    # 1. the trajectories of the target (or of the previous round's CLLM), collected once
    records = load_or_collect(cfg, source, enc, world, interrupt, collect_batch)

    # 4. the loop, from the target's weights (the previous round's; or last.pt of an earlier run)
    model = copy.deepcopy(source).train()
    optimizer = model.configure_optimizers(0.0, cfg.learning_rate, device.type)
    progress, tolerance = Progress(batch_gen=torch.Generator().manual_seed(cfg.seed)), tolerance_of(asdict(cfg))
    if cfg.init_from == "resume":
        resume(cfg, model, optimizer, progress, world)
        if guard(progress.curve, tolerance, cfg.guard_patience)[2]:
            progress.stopped = stop_line(progress.curve, cfg.guard_patience, tolerance)
            say(f"{cfg.out_dir} was stopped by the guard: {progress.stopped}")
    train_model = ddp.wrap(torch.compile(model) if cfg.compile else model, world, device)
    say(f"distilling on {len(records)} prompts ({sum(len(r['states']) for r in records)} blocks), "
        f"iterations {progress.iter_num} to {cfg.max_iters}: " + loss_line(cfg))
    checkpoint = lambda: checkpoint_of(model, progress, about)
    last_eval = progress.curve[-1]["iter"] if progress.curve else -1
    t0, last_log = time.time(), progress.iter_num
    first_step, secs_before = progress.iter_num, progress.train_secs  # (this process's run, for the cost line)
    with interrupt:
        while not progress.stopped:
            exit_if_interrupted(interrupt, cfg, checkpoint, optimizer, progress, world)
            it = progress.iter_num
            if (it % cfg.eval_interval == 0 or it == cfg.max_iters) and it != last_eval:
                if world.master:  # (iteration 0 of a fresh run: the target's evaluation, above)
                    evaluate_and_keep(target_point or evaluate_on_val(model), model, target, progress,
                                      about, tolerance, cfg)
                    target_point = None
                    model.train()  # (evaluate leaves it in eval mode)
                save_last(checkpoint(), optimizer, progress, world)
                progress.stopped = ddp.all_gather(progress.stopped, world)[0]  # rank 0 decides
                t0, last_log, last_eval = time.time(), it, it
            if progress.stopped or it >= cfg.max_iters:
                break
            lr = set_lr(optimizer, it, cfg, cfg.max_iters)
            step_start = time.time()
            terms = train_step(model, train_model, optimizer, records, cfg, progress, world, autocast)
            progress.train_secs += time.time() - step_start
            progress.iter_num += 1
            if progress.iter_num == first_step + 5 and world.master:  # what the rest costs, a few steps in
                print(cost_line(cfg, progress.iter_num, (progress.train_secs - secs_before) / 5, progress.curve,
                                len(load_records(cfg.dataset, "test")[:cfg.test_prompts])))
            if progress.iter_num % cfg.log_interval == 0 or progress.iter_num == cfg.max_iters:
                l_c, l_ar = ddp.all_sum(terms.tolist(), world)  # the whole batch's means
                dt = (time.time() - t0) / (progress.iter_num - last_log)
                t0, last_log = time.time(), progress.iter_num
                say(f"iter {progress.iter_num}: loss {l_c + cfg.ar_weight * l_ar:.4f} (consistency "
                    f"{l_c:.4f}, ar {l_ar:.4f}), lr {lr:.2e}, time {dt * 1000:.0f}ms, "
                    f"eta {(cfg.max_iters - progress.iter_num) * dt / 60:.1f} min")
        exit_if_interrupted(interrupt, cfg, checkpoint, optimizer, progress, world)  # (in the last evaluation)

    # 5. the report, with the checkpoint the guard kept
    results = report(cfg, target, target_ckpt, enc, meta, progress.curve, progress.stopped, device) if world.master else {}
    ddp.finish(world)
    return results


if __name__ == "__main__":
    run(main)
