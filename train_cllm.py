"""
Consistency distillation (CLLM paper, section 3.2): fine-tune a target model on its own Jacobi
trajectories so that it maps any intermediate state of a block to the block's fixed point, and so
gets several tokens right per forward pass, while an AR loss keeps its answers close to the
target's (the quality guard keeps a checkpoint only when they are).

    python train_cllm.py                           # distil the shipped arith target on a CPU
    python train_cllm.py --target_dir=out-arith    # distil a target you trained (python train.py)
    python train_cllm.py --init_from=resume        # continue out_dir/last.pt exactly
    python train_cllm.py --help                    # every setting, its default and its meaning

Ctrl-C or a scheduler's SIGTERM stops it after the current step, saved, with the command that
goes on (common.Interrupt).

Read top to bottom:
1. trajectories: the target Jacobi-decodes the training prompts (jacobi.collect_trajectories);
   every state y^(0) .. y* of every block is kept, in out_dir/trajectories.pt:
       record = {"prompt": (P,) ids, "answer": (A,) ground truth + EOS, "states": [(S_k, b_k)]}
2. the losses: consistency_loss and ar_loss, the paper's equations, and
   distillation_loss_reference, the loss of a batch with one plain forward per sequence;
3. the packed batch: pack_row and distillation_loss compute the same in one forward per batch;
4. the loop: AdamW from the target's weights; every eval_interval steps the CLLM is evaluated on
   val prompts and ckpt.pt keeps the best one within the target's quality (the quality guard);
5. the report: target vs CLLM on held-out test prompts (extras/table.py).
"""

import copy
import os
import time
from dataclasses import asdict, dataclass, replace
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F

from common import (Interrupt, check_context, configure, encode_prompts, fingerprint,
                    load_checkpoint, load_model, note_changed_settings, optimizer_step,
                    refuse_to_overwrite, run, save_checkpoint, set_lr, setup_device,
                    tokenizer_fingerprint)
from data.common import (ensure_prepared, generation_length, load_encoding, load_meta, load_records,
                         trajectory_length)
from extras import ddp
from extras.jacobi_forcing import noisy_streams
from extras.quality import (QUALITY_TOLERANCE, REPEAT_LIMIT, describe, evaluate, guard, stop_line,
                            tolerance_of, unfit_target)
from extras.table import cost_line, report
from extras.trajectories import load_or_collect
from model import pack


@dataclass
class CLLMConfig:
    out_dir: str = "out-cllm-arith"  # the CLLM: out_dir/ckpt.pt, last.pt, trajectories.pt
    target_dir: str = "pretrained/arith-target"  # the target: target_dir/ckpt.pt
    dataset: str = "arith"           # data/<dataset>, made by data/<dataset>/prepare.py
    init_from: Literal["target", "resume"] = "target"  # the target's weights, or out_dir/last.pt
    # 1. trajectories
    n: int = 16                      # Jacobi block size
    guess: Literal["prefix", "repeat"] = "prefix"  # the initial guess y^(0) (jacobi.initial_guess)
    num_prompts: int = 4000          # training prompts to collect trajectories on
    traj_max_new_tokens: int = 0     # tokens decoded per prompt; 0: 95% of the data's answers fit
    collect_batch: int = 64          # prompts decoded side by side
    repeat_limit: int = REPEAT_LIMIT  # drop a prompt whose output repeats a token this many times
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
    warmup_iters: int = 50           # linear warm-up steps
    lr_decay_iters: int = 0          # cosine reaches min_lr here; 0: at max_iters
    grad_clip: float = 1.0           # clip the gradient norm to this (0: no clipping)
    # 4. evaluation: which checkpoint is the CLLM, and the final table
    eval_interval: int = 200         # Jacobi-decode the val prompts every this many steps
    val_prompts: int = 50            # val prompts of each evaluation
    test_prompts: int = 200          # test prompts of the final table (0: no table), where the
                                     # CLLM is paired with its target prompt by prompt
    max_new_tokens: int = 0          # tokens decoded per prompt there; 0: from the data
    force: bool = False              # distil a target that the check before collection calls unfit
    log_interval: int = 25           # a progress line every this many steps
    device: str = "auto"             # auto: cuda when there is one, else cpu
    compile: bool = False            # torch.compile the model (a GPU setting)
    autocast: Literal["auto", "bfloat16", "float32"] = "auto"  # training precision: auto =
                                     # bf16 autocast on CUDA, float32 on CPU; bfloat16 on a CPU too
    seed: int = 1337                 # the trajectories' guesses, the batches, the states drawn
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
                                     # * n tokens, in the evaluations and the table (0: none)
    lookup: bool = False             # the table also has prompt lookup, the training-free peer
    max_loss_rise: float = QUALITY_TOLERANCE["answer_loss"]  # the guard (extras/quality.py)
                                     # accepts this much more answer loss than the target's,
    max_quality_drop: float = QUALITY_TOLERANCE["quality"]  # this much less task quality,
    max_repeat_rise: float = QUALITY_TOLERANCE["repeated"]  # and this much more repetition
    guard_patience: int = 5          # stop after this many unacceptable evaluations that do not
                                     # recover (0: never); distilling arith dips for up to 5
    grad_accum: int = 1              # micro-steps per step (extras/ddp.py)


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


def consistency_mask(state, target, horizon=0, blocks=None):
    """(b - 1,) which logits of a block count: the logit at token i predicts token i + 1 from
    inputs y_0 .. y_i; up to the first token where state and target differ the inputs are the
    same, so those positions are masked. horizon > 0 keeps only that many logits from the first
    wrong token on (the paper: all). (The authors' code keeps one more position, the logit
    that predicts the first differing token: its inputs are still the same and its KL is 0, so it
    only adds to the count the mean divides by.)

    blocks: the lengths of the blocks that state is made of, for Jacobi Forcing's mask: then
    (b,) each block counts from its own first wrong token to its end, its last logit (that
    predicts the next block's first token) included, and a right block after a wrong one counts
    nothing."""
    if blocks is not None:  # (each block with one shared token appended: its mask covers all b logits)
        return torch.cat([consistency_mask(torch.cat([s, s[-1:]]), torch.cat([t, s[-1:]]), horizon)
                          for s, t in zip(state.split(blocks), target.split(blocks))])
    differ = (state[:-1] != target[:-1]).long()
    first = int(differ.argmax()) if differ.any() else len(differ)
    i = torch.arange(len(differ))
    return (i >= first) & ((i < first + horizon) if horizon else True)


def kept_columns(record, choice, y, yhat, cfg):
    """The positions of y whose logits the consistency loss counts: consistency_mask over y, for
    a Jacobi Forcing stream block by block."""
    blocks = [len(s[-1]) for s in record["states"][choice[0]:]] if cfg.recipe == "jacobi_forcing" else None
    return consistency_mask(y, yhat, cfg.horizon, blocks).nonzero().flatten()


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
    of the row replaces the reference's 1 + 2 * len(picks) forwards (1 + 4K with the defaults:
    K blocks, 2 states each).
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


def collate(rows, device):
    """Pad packed rows to one batch. Padding attends only to itself (a query that sees nothing
    would make softmax NaN) and has no label. Consistency columns become (row, column) pairs."""
    B, T = len(rows), max(len(r.tokens) for r in rows)
    tokens = torch.zeros(B, T, dtype=torch.long)
    positions = torch.zeros(B, T, dtype=torch.long)
    attn = torch.eye(T, dtype=torch.bool).repeat(B, 1, 1)
    labels = torch.full((B, T), -1, dtype=torch.long)
    student, teacher = [], []
    for b, r in enumerate(rows):
        L = len(r.tokens)
        tokens[b, :L], positions[b, :L], attn[b, :L, :L], labels[b, :L] = r.tokens, r.positions, r.attn, r.labels
        student.append(torch.stack([torch.full_like(r.student, b), r.student], 1))
        teacher.append(torch.stack([torch.full_like(r.teacher, b), r.teacher], 1))
    student, teacher = torch.cat(student), torch.cat(teacher)
    return [t.to(device) for t in (tokens, positions, attn, labels, student, teacher)]


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


def sample_choices(record, k, generator):
    """Which states a step trains on, the CLLM recipe: for every block, k distinct
    non-fixed-point states drawn uniformly (fewer if it has fewer), each seen after the clean
    prefix prompt + y*_<k. The paper draws one; more put more of each packed row to use."""
    return [(b, [j]) for b, s in enumerate(record["states"])
            for j in torch.randperm(len(s) - 1, generator=generator)[:k].tolist()]


def choose_states(records, cfg, generator):
    """For each record, the choices (k, js) that one step trains on (see consistency_pair)."""
    if cfg.recipe == "cllm":
        return [sample_choices(r, cfg.states_per_block, generator) for r in records]
    return [noisy_streams(r, cfg.states_per_block, cfg.noise_window, generator) for r in records]


# ----------------------------------------------------------------------------------------------
# 4. the loop

def check_settings(cfg, meta, context, say):
    """What the target's context and the data allow, checked before any work: each failure is an
    error that says what to change."""
    if cfg.val_prompts < 1:
        raise ValueError("val_prompts must be at least 1: the guard chooses the CLLM by them")
    decoded = min(cfg.traj_max_new_tokens, cfg.max_new_tokens)
    if cfg.n > decoded:
        raise ValueError(f"a Jacobi block of n={cfg.n} tokens is longer than the {decoded} tokens "
                         f"decoded per prompt (traj_max_new_tokens {cfg.traj_max_new_tokens}, "
                         f"max_new_tokens {cfg.max_new_tokens}): no block would be full; use "
                         f"--n={decoded} or less")
    longest = max(cfg.traj_max_new_tokens, cfg.max_new_tokens)
    check_context(meta, context, longest, f"the target's context of {context} tokens",
                  "train a target with a larger --block_size (python train.py)", say,
                  setting="traj_max_new_tokens" if longest > cfg.max_new_tokens else "max_new_tokens")


def load_previous_round(cfg, target_id, device, say):
    """The CLLM of the previous round (Jacobi Forcing's progressive rounds): previous_round/ckpt.pt
    collects this round's trajectories and is its starting point. It must come from target_dir,
    which the guard and the table still judge against."""
    model, ckpt = load_model(os.path.join(cfg.previous_round, "ckpt.pt"), device, cfg.dataset, say)
    if ckpt.get("target") != target_id:
        raise ValueError(f"{cfg.previous_round}/ckpt.pt was not distilled from {cfg.target_dir}: a round "
                         "goes on from a CLLM of the same target (--target_dir)")
    return model


def main(argv):
    cfg = configure(CLLMConfig(), argv)
    device, autocast = setup_device(cfg.device, cfg.autocast)
    world, device = ddp.init(device)
    say = print if world.master else lambda *a, **k: None
    per_process = ddp.per_process_batch(cfg.batch_size, cfg.grad_accum, world)
    refuse_to_overwrite(cfg.out_dir, cfg.init_from)
    # a fresh clone prepares data/arith here (~5 s); under torchrun it must be there already
    meta = ensure_prepared(cfg.dataset) if world.size == 1 else load_meta(cfg.dataset)
    target, target_ckpt = load_model(os.path.join(cfg.target_dir, "ckpt.pt"), device, cfg.dataset, say)
    enc = load_encoding(cfg.dataset)
    context = target.config.block_size
    cfg = replace(cfg, max_new_tokens=cfg.max_new_tokens or generation_length(meta, context),
                  traj_max_new_tokens=cfg.traj_max_new_tokens or trajectory_length(meta, context, cfg.n))
    check_settings(cfg, meta, context, say)
    interrupt = Interrupt("train_cllm.py", argv, world.size, world.master)  # Ctrl-C, SIGTERM
    torch.manual_seed(cfg.seed + world.rank)
    target_id = fingerprint(target.state_dict())  # which target the trajectories and CLLM come from
    source = load_previous_round(cfg, target_id, device, say) if cfg.previous_round else target
    tokenizer = tokenizer_fingerprint(cfg.dataset)  # which tokenizer the CLLM decodes with
    val_records = load_records(cfg.dataset, "val")[:cfg.val_prompts] if world.master else []
    val_prompts = encode_prompts(enc, val_records, target, cfg.max_new_tokens, device, "val prompts")

    # 0. is the target worth distilling? Its evaluation is also the first point of the curve
    first = unfit = eval_secs = None
    if world.master and cfg.init_from == "target":
        t = time.time()
        first = evaluate(target, enc, val_prompts, val_records, cfg, meta["metric"], cfg.max_new_tokens, device)
        unfit = unfit_target(first, val_records, enc, cfg.max_new_tokens, meta["metric"])
        eval_secs = time.time() - t
    if ddp.all_gather(unfit, world)[0] and not cfg.force:
        raise ValueError(unfit)

    # 1. the trajectories of the target (or of the previous round's CLLM), collected once
    records = load_or_collect(cfg, source, fingerprint(source.state_dict()), enc, world, interrupt)
    if not records:
        raise ValueError("no usable trajectories (every prompt was dropped as repetitive)")

    # the CLLM starts from the target's weights (the previous round's; or last.pt of an earlier run)
    tolerance = tolerance_of(asdict(cfg))
    last_path, best_path = os.path.join(cfg.out_dir, "last.pt"), os.path.join(cfg.out_dir, "ckpt.pt")
    batch_gen = torch.Generator().manual_seed(cfg.seed)  # the same on every process
    iter_num, curve, train_secs, stopped, last_eval = 0, [], 0.0, None, -1
    if cfg.init_from == "resume":
        model, checkpoint = load_checkpoint(last_path, device)
        note_changed_settings(checkpoint["config"], cfg)
        iter_num, curve, train_secs = checkpoint["iter_num"], checkpoint["curve"], checkpoint["train_secs"]
        last_eval = curve[-1]["iter"]
        if world.master and guard(curve, tolerance, cfg.guard_patience)[2]:  # the guard stopped it
            stopped = stop_line(curve, cfg.guard_patience, tolerance)
            print(f"{cfg.out_dir} was stopped by the guard: {stopped}")
        stopped = ddp.all_gather(stopped, world)[0]
        batch_gen.set_state(checkpoint["batch_rng"])
        ddp.restore_rng(checkpoint["torch_rng"], world)
    else:
        model = copy.deepcopy(source)
    model.train()
    optimizer = model.configure_optimizers(0.0, cfg.learning_rate, device.type)
    if cfg.init_from == "resume":
        optimizer.load_state_dict(checkpoint["optimizer"])
    train_model = ddp.wrap(torch.compile(model) if cfg.compile else model, world, device)
    loss = (f"{cfg.recipe} recipe, {cfg.consistency} consistency + {cfg.ar_weight} * AR ({cfg.ar_target})"
            if cfg.states_per_block else "the AR loss alone (states_per_block=0), a control: ckpt.pt "
            "is chosen by tokens/forward as for a CLLM; compare its last.pt with the CLLM's iteration")
    say(f"distilling on {len(records)} prompts ({sum(len(r['states']) for r in records)} blocks): "
        f"{loss}, from iter {iter_num} to {cfg.max_iters}")

    def model_state():
        """What ckpt.pt holds: the weights, the model's shape, the settings, the curve so far."""
        return dict(model=model.state_dict(), model_args=asdict(model.config), iter_num=iter_num,
                    config=asdict(cfg), dataset=cfg.dataset, kind="cllm", target=target_id,
                    tokenizer=tokenizer, curve=curve)

    def save_last(state, rng):
        """last.pt: state and everything else needed to continue exactly from this step."""
        save_checkpoint(last_path, dict(state, optimizer=optimizer.state_dict(), train_secs=train_secs,
                                        batch_rng=batch_gen.get_state(), torch_rng=rng))

    def evaluate_and_save():
        """Evaluate on the val prompts; last.pt always, ckpt.pt when the guard has a new best."""
        nonlocal stopped, last_eval, eval_secs, first
        last_eval = iter_num
        rng = ddp.all_gather(torch.get_rng_state(), world)  # every process's RNG, for resuming
        if world.master:
            if first is not None:  # iteration 0 of a fresh run: the target's evaluation, above
                e, first = first, None
            else:
                t = time.time()
                e = evaluate(model, enc, val_prompts, val_records, cfg, meta["metric"], cfg.max_new_tokens,
                             device)
                eval_secs = time.time() - t
            curve.append(dict(iter=iter_num, train_minutes=round(train_secs / 60, 2), **e))
            best, problems, stop = guard(curve, tolerance, cfg.guard_patience)
            print(describe(curve[-1], meta["metric"], len(val_records), eval_secs,
                           None if best == len(curve) - 1 else curve[best]["iter"], problems))
            state = model_state()
            if iter_num > 0:
                save_last(state, rng)
            if best == len(curve) - 1:  # the CLLM: the most tokens/forward, quality kept (point 0 of
                # the curve is the target's evaluation, so there ckpt.pt is the target)
                save_checkpoint(best_path, state if iter_num else dict(state, model=target.state_dict()))
            if stop:
                stopped = stop_line(curve, cfg.guard_patience, tolerance)
                print(stopped)
            model.train()  # (evaluate leaves it in eval mode)
        stopped = ddp.all_gather(stopped, world)[0]  # rank 0 decides

    def exit_if_interrupted():
        """After Ctrl-C or SIGTERM (to any process: all stop at the same step): last.pt at this
        step, and the line that says how to go on (before the first step: nothing to save, the
        same command goes on from the trajectories)."""
        signum = ddp.first_of(interrupt.signal, world)
        if not signum:
            return
        if iter_num:  # (at 0, after a signal late in the collection, nothing is trained)
            rng = ddp.all_gather(torch.get_rng_state(), world)  # every process's RNG, for resuming
            if world.master:
                save_last(model_state(), rng)
        ddp.finish(world)
        where = (f"stopped at iteration {iter_num} of {cfg.max_iters}, saved in {last_path}" if iter_num
                 else f"stopped before the first step, the trajectories saved in {cfg.out_dir}")
        interrupt.exit(signum, where, resume=iter_num > 0)

    t0, last_log, start, start_secs = time.time(), iter_num, iter_num, train_secs
    with interrupt:
        while iter_num < cfg.max_iters and not stopped:
            exit_if_interrupted()
            if iter_num % cfg.eval_interval == 0 and last_eval != iter_num:
                evaluate_and_save()
                t0, last_log = time.time(), iter_num
                if stopped:
                    break
            lr = set_lr(optimizer, iter_num, cfg, cfg.max_iters)
            step_start = time.time()
            idx = torch.randint(len(records), (cfg.batch_size,), generator=batch_gen).tolist()
            picked = [records[i] for i in idx]
            choices = choose_states(picked, cfg, batch_gen)  # drawn for the whole batch by every process
            mine = ddp.my_share(list(zip(picked, choices)), world, per_process * cfg.grad_accum)
            rows = [pack_row(r, c, cfg, context) for r, c in mine]
            counts = ddp.all_sum([sum(len(r.student) for r in rows),  # the whole batch's positions
                                  sum(int((r.labels != -1).sum()) for r in rows)], world)
            terms = torch.zeros(2, device=device)  # read at the log lines only
            for micro, sync in ddp.micro_steps(train_model, world, cfg.grad_accum):
                part = rows[micro * per_process:(micro + 1) * per_process]
                shares = (sum(len(r.student) for r in part) / max(counts[0], 1),
                          sum(int((r.labels != -1).sum()) for r in part) / max(counts[1], 1))
                with autocast, sync:
                    loss, l_c, l_ar = distillation_loss(train_model, collate(part, device), cfg, shares)
                    (loss * world.size).backward()  # DDP averages over the processes; the shares sum
                terms += torch.stack([l_c.detach().float(), l_ar.detach().float()])
            optimizer_step(model, optimizer, cfg.grad_clip)
            train_secs += time.time() - step_start
            iter_num += 1
            if iter_num == start + 5 and world.master:  # what the rest will cost, a few steps in
                tests = len(load_records(cfg.dataset, "test")[:cfg.test_prompts])  # (or a smaller split)
                print(cost_line(cfg, iter_num, (train_secs - start_secs) / 5, eval_secs, tests))
            if iter_num % cfg.log_interval == 0 or iter_num == cfg.max_iters:
                l_c, l_ar = ddp.all_sum(terms.tolist(), world)  # the whole batch's means
                dt = (time.time() - t0) / (iter_num - last_log)
                t0, last_log = time.time(), iter_num
                say(f"iter {iter_num}: loss {l_c + cfg.ar_weight * l_ar:.4f} (consistency {l_c:.4f}, "
                    f"ar {l_ar:.4f}), lr {lr:.2e}, time {dt * 1000:.0f}ms, "
                    f"eta {(cfg.max_iters - iter_num) * dt / 60:.1f} min")
        if not stopped:
            if last_eval != iter_num:
                evaluate_and_save()
            exit_if_interrupted()  # (a signal during that evaluation)

    # 5. the report, with the checkpoint the guard kept
    results = {}
    if world.master:
        results = report(cfg, target, target_ckpt, enc, meta, curve, stopped, cfg.max_new_tokens, device)
    ddp.finish(world)
    return results


if __name__ == "__main__":
    run(main)
