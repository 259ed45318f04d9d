"""
Consistency distillation (CLLM paper, section 3.2): fine-tune the target model on its own Jacobi
trajectories so that it maps any intermediate state of a block to the block's fixed point, and so
gets several tokens right per forward pass while its greedy output stays the same.

    python train_cllm.py                           # the whole default pipeline on a CPU
    python train_cllm.py config/cllm_arith_long.py # a longer distillation
    python train_cllm.py --init_from=resume        # continue out_dir/ckpt.pt exactly

1. collect: the target decodes the training prompts with Jacobi; every state y^(0) .. y* of every
   block is kept (trajectories.pt in out_dir, reused when the settings match).
2. distil: loss = consistency + ar_weight * AR, from the target's weights.
3. report: target vs CLLM on held-out prompts: tokens per forward, tokens/s, speedup, quality.

On a fresh clone `python train_cllm.py` first prepares data/arith and trains the target
(python data/arith/prepare.py; python train.py) when they are missing.
"""

import copy
import hashlib
import importlib
import json
import os
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

import train
from bench import environment, markdown_table, measure, quality_measure
from configurator import configure, run
from data.common import dataset_dir, load_encoding, load_meta, load_records, score
from jacobi import block_trajectory, eos_end, initial_guess, jacobi_decode


@dataclass
class CLLMConfig:
    out_dir: str = "out-cllm-arith"
    target_dir: str = "out-arith"    # the target: target_dir/ckpt.pt, made by train.py
    dataset: str = "arith"
    init_from: str = "target"        # "target" (start from its weights) or "resume"
    # 1. trajectories
    n: int = 16                      # Jacobi block size
    init: str = "prefix"             # initial guess y^(0): see jacobi.initial_guess
    num_prompts: int = 4000          # training prompts to collect trajectories on
    traj_max_new_tokens: int = 96
    collect_batch: int = 64          # prompts decoded side by side
    repeat_limit: int = 10           # drop a prompt whose output repeats a token this many times
    # 2. distillation
    consistency: str = "global"      # "global": target y*; "local": target the next state
    ar_weight: float = 3.0           # loss = consistency + ar_weight * AR
    ar_target: str = "ground_truth"  # AR labels: "ground_truth" (the dataset's answer) or
                                     # "fixed_point" (the target's own output y*)
    label_smoothing: float = 0.0
    states_per_block: int = 3        # states sampled per block and step (the paper: 1)
    batch_size: int = 16             # prompts per step; each packs all of its blocks in one row
    max_iters: int = 1200
    learning_rate: float = 1e-3
    min_lr: float = 1e-4
    warmup_iters: int = 50
    lr_decay_iters: int = 0          # 0: max_iters
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0
    # evaluation
    eval_interval: int = 200
    eval_prompts: int = 50           # held-out (val) prompts for the periodic Jacobi evaluation
    max_new_tokens: int = 96
    final_prompts: int = 500         # held-out (test) prompts for the final table
    log_interval: int = 25
    device: str = "auto"
    compile: bool = False
    seed: int = 1337


# ----------------------------------------------------------------------------------------------
# 1. Jacobi trajectories of the target

@torch.no_grad()
def collect_trajectories(model, prompts, n, max_new_tokens, eos_id=None, init="prefix", seeds=None):
    """Jacobi-decode many prompts side by side; return, per prompt, its [BlockTrajectory].

    The same states as jacobi_decode(model, prompt, ..., seed=seeds[i], return_trajectory=True),
    computed for a whole batch at once: every row sits at its own positions in one KV cache
    (input_pos (B, T)), and each iteration re-runs every row's whole block, so that rows that
    converged early keep final keys and values while the others go on.
    """
    device, context = next(model.parameters()).device, model.config.block_size
    seeds = seeds if seeds is not None else [0] * len(prompts)
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    seqs = [p.to(device) for p in prompts]
    budgets = [min(max_new_tokens, context - len(p)) for p in prompts]
    trajectories = [[] for _ in prompts]
    active = [i for i in range(len(prompts)) if budgets[i] > 0]
    cache = model.make_cache(batch_size=len(active))
    # prefill all but each prompt's last token, right-padded (pad slots are overwritten later)
    width = max((len(seqs[i]) - 1 for i in active), default=0)
    if width > 0:
        rows = [torch.cat([seqs[i][:-1], seqs[i].new_zeros(width - len(seqs[i]) + 1)]) for i in active]
        model(torch.stack(rows), input_pos=torch.arange(width, device=device), cache=cache)
    while active:
        starts = [len(seqs[i]) for i in active]
        sizes = [min(n, len(prompts[i]) + budgets[i] - len(seqs[i])) for i in active]
        y = torch.zeros(len(active), n, dtype=torch.long, device=device)
        for r, i in enumerate(active):
            y[r, :sizes[r]] = initial_guess(seqs[i], sizes[r], init, generators[i])
        last = torch.stack([seqs[i][-1] for i in active])
        # inputs: the last final token, then the guesses; a row's padding sits at later positions
        pos = torch.stack([torch.arange(s - 1, s - 1 + n) for s in starts]).clamp(max=context - 1)
        valid = torch.arange(n)[None, :] < torch.tensor(sizes)[:, None]  # (A, n)
        valid, pos = valid.to(device), pos.to(device)
        states = [[y[r, :sizes[r]].clone()] for r in range(len(active))]
        converged = torch.zeros(len(active), dtype=torch.bool, device=device)
        for _ in range(n + 1):  # n passes to converge at the latest, one more to see it
            x = torch.cat([last[:, None], y[:, :-1]], dim=1)  # (A, n)
            logits, _ = model(x, input_pos=pos, cache=cache)
            y_next = logits.argmax(-1)  # (A, n): the Jacobi update of every row at once
            changed = ((y_next != y) & valid).any(1) & ~converged
            converged |= ~changed
            y = torch.where(changed[:, None], y_next, y)
            for r in changed.nonzero().flatten().tolist():
                states[r].append(y[r, :sizes[r]].clone())
            if converged.all():
                break
        assert converged.all(), "a Jacobi block did not converge in n iterations"
        keep = []
        for r, i in enumerate(active):
            fixed = y[r, :sizes[r]]
            end = eos_end(fixed, eos_id)
            trajectories[i].append(block_trajectory(seqs[i], states[r], end or sizes[r]))
            seqs[i] = torch.cat([seqs[i], fixed[:end]])
            if not end and len(seqs[i]) < len(prompts[i]) + budgets[i]:
                keep.append(r)
        active = [active[r] for r in keep]
        if len(keep) < len(converged):
            cache.keep_rows(torch.tensor(keep, dtype=torch.long, device=device))
    return trajectories


def fingerprint(*parts):
    """A short hash of tensors and files: which target and tokenizer a trajectory file came from."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, dict):  # a state dict
            for k in sorted(part):
                h.update(k.encode())
                h.update(part[k].detach().cpu().contiguous().numpy().tobytes())
        else:
            with open(part, "rb") as f:
                h.update(f.read())
    return h.hexdigest()[:16]


def longest_run(tokens):
    """Length of the longest run of one token repeated."""
    best = run_len = 1 if len(tokens) else 0
    for a, b in zip(tokens, tokens[1:]):
        run_len = run_len + 1 if a == b else 1
        best = max(best, run_len)
    return best


def load_or_collect(cfg, target, target_id, enc):
    """The trajectories of the target on the first num_prompts training prompts, from
    out_dir/trajectories.pt when it matches the current target, tokenizer and settings."""
    path = os.path.join(cfg.out_dir, "trajectories.pt")
    meta = dict(target=target_id, dataset=cfg.dataset,
                tokenizer=fingerprint(os.path.join(dataset_dir(cfg.dataset), "tokenizer.tiktoken")),
                n=cfg.n, init=cfg.init, num_prompts=cfg.num_prompts,
                max_new_tokens=cfg.traj_max_new_tokens, repeat_limit=cfg.repeat_limit, seed=cfg.seed)
    if os.path.isfile(path):
        data = torch.load(path, weights_only=False)
        diff = {k: (data["meta"].get(k), v) for k, v in meta.items() if data["meta"].get(k) != v}
        if diff:
            raise ValueError(f"{path} does not match this run (setting: (file, now)): {diff}. "
                             f"Delete it to collect again, or use another --out_dir")
        print(f"reusing {path}: {data['stats']}")
        return data["prompts"]
    records = load_records(cfg.dataset, "train")[:cfg.num_prompts]
    print(f"collecting Jacobi trajectories of the target on {len(records)} training prompts "
          f"(n={cfg.n}, batches of {cfg.collect_batch})")
    t0, prompts, dropped, n_records = time.time(), [], 0, 0
    for start in range(0, len(records), cfg.collect_batch):
        batch = records[start:start + cfg.collect_batch]
        ids = [train.encode_prompt(enc, r["prompt"], target, cfg.traj_max_new_tokens, "cpu") for r in batch]
        trajs = collect_trajectories(target, ids, cfg.n, cfg.traj_max_new_tokens, enc.eot_token,
                                     cfg.init, seeds=[cfg.seed + start + i for i in range(len(batch))])
        for r, prompt, blocks in zip(batch, ids, trajs):
            output = torch.cat([b.fixed_point for b in blocks]).tolist() if blocks else []
            if longest_run(output) >= cfg.repeat_limit:
                dropped += 1  # degenerate: a run of one token, which teaches collapse
                continue
            answer = enc.encode_ordinary(r["answer"]) + [enc.eot_token]
            prompts.append(dict(prompt=prompt, answer=torch.tensor(answer),
                                states=[b.states.to(torch.int32).cpu() for b in blocks]))
            n_records += len(blocks)
        done, secs = start + len(batch), time.time() - t0
        print(f"collect: prompts {done}/{len(records)}, {n_records} records, "
              f"{n_records / secs:.0f} records/s, eta {(len(records) - done) * secs / done / 60:.1f} min")
    stats = dict(prompts=len(prompts), records=n_records, dropped_prompts=dropped,
                 seconds=round(time.time() - t0, 1), records_per_s=round(n_records / (time.time() - t0), 1))
    print(f"collected {stats}")
    os.makedirs(cfg.out_dir, exist_ok=True)
    train.save_checkpoint(path, dict(meta=meta, stats=stats, prompts=prompts))
    return prompts


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
    """The state the model should map state j to: the fixed point (global) or the next (local)."""
    if kind == "global":
        return len(states) - 1
    if kind == "local":
        return j + 1
    raise ValueError(f"consistency must be 'global' or 'local', got {kind!r}")


def consistency_mask(state, target):
    """(b - 1,) which logits of a block count: the logit at token i predicts token i + 1 from
    inputs y_0 .. y_i; up to the first token where state and target differ the inputs are the
    same, so those positions are masked (the authors' mask). Padding never enters a block."""
    differ = (state[:-1] != target[:-1]).long()
    first = int(differ.argmax()) if differ.any() else len(differ)
    return torch.arange(len(differ)) >= first


# ----------------------------------------------------------------------------------------------
# packing: one training row holds a prompt's AR term and the consistency terms of all its blocks

def pack_row(prompt, states, choices, answer, cfg, context):
    """One training row: [prompt, y*_1 .. y*_K | ground truth | y_1 .. y_K | local targets].

    The first segment is the prompt and the fixed points of all K blocks, causal: its logits give
    the AR term and the global consistency targets. Each other segment holds one sequence that
    continues a prefix of the first one (a sampled state y_k continues prompt + y*_<k), with the
    positions it would have in its own sequence and a mask that lets it see that prefix and itself
    causally. So one forward pass does the work of 1 + K separate ones (tests/test_cllm.py checks
    that they agree). choices[k]: the indices of the sampled states of block k (none for a block
    whose first guess was already its fixed point).

    Returns tokens (T,), positions (T,), attention mask (T, T), AR labels (T,), and the columns
    of the consistency pairs: student (C,), teacher (C,).
    """
    P = len(prompt)
    fixed = [s[-1].long() for s in states]
    main = torch.cat([prompt.long(), *fixed])  # prompt + y*_1 .. y*_K
    starts = [P + sum(len(f) for f in fixed[:k]) for k in range(len(fixed))]  # block k's position
    segments = [(main, 0, 0)]  # (tokens, position of the first, how many first columns it sees)
    labels = [torch.full((len(main),), -1, dtype=torch.long)]
    if cfg.ar_target == "fixed_point":
        labels[0][P - 1:-1] = main[P:]
    elif cfg.ar_target == "ground_truth":
        gt = answer[:context - P].long()
        labels[0][P - 1] = gt[0]
        segments.append((gt, P, P))
        labels.append(torch.cat([gt[1:], torch.tensor([-1])]))
    else:
        raise ValueError(f"ar_target must be 'fixed_point' or 'ground_truth', got {cfg.ar_target!r}")
    pairs = []  # (student segment, teacher segment, teacher's first column offset, columns)
    for k, j in ((k, j) for k, picks in enumerate(choices) for j in picks):
        s = states[k]
        t = consistency_target(s, j, cfg.consistency)
        segments.append((s[j].long(), starts[k], starts[k]))
        labels.append(torch.full((len(s[j]),), -1, dtype=torch.long))
        student = len(segments) - 1
        if t == len(s) - 1:
            teacher, offset = 0, starts[k]  # y*_k is already in the first segment
        else:
            segments.append((s[t].long(), starts[k], starts[k]))
            labels.append(torch.full((len(s[t]),), -1, dtype=torch.long))
            teacher, offset = len(segments) - 1, 0
        cols = torch.arange(len(s[j]) - 1)[consistency_mask(s[j], s[t])]
        pairs.append((student, teacher, offset, cols))
    first_col = [0]
    for seg, _, _ in segments:
        first_col.append(first_col[-1] + len(seg))
    T = first_col[-1]
    attn = torch.zeros(T, T, dtype=torch.bool)
    for (seg, _, sees), c in zip(segments, first_col):
        attn[c:c + len(seg), :sees] = True
        attn[c:c + len(seg), c:c + len(seg)] = torch.ones(len(seg), len(seg), dtype=torch.bool).tril()
    student_cols = [first_col[st] + cols for st, _, _, cols in pairs]
    teacher_cols = [first_col[te] + off + cols for _, te, off, cols in pairs]
    empty = torch.zeros(0, dtype=torch.long)
    return (torch.cat([seg for seg, _, _ in segments]),
            torch.cat([torch.arange(p, p + len(seg)) for seg, p, _ in segments]),
            attn, torch.cat(labels),
            torch.cat(student_cols) if pairs else empty, torch.cat(teacher_cols) if pairs else empty)


def collate(rows, device):
    """Pad packed rows to one batch. Padding attends only to itself (a query that sees nothing
    would make softmax NaN) and has no label. Consistency columns become flat (row, column) pairs."""
    B, T = len(rows), max(len(r[0]) for r in rows)
    tokens = torch.zeros(B, T, dtype=torch.long)
    positions = torch.zeros(B, T, dtype=torch.long)
    attn = torch.eye(T, dtype=torch.bool).repeat(B, 1, 1)
    labels = torch.full((B, T), -1, dtype=torch.long)
    student, teacher = [], []
    for b, (tok, pos, mask, lab, s_cols, t_cols) in enumerate(rows):
        L = len(tok)
        tokens[b, :L], positions[b, :L], attn[b, :L, :L], labels[b, :L] = tok, pos, mask, lab
        student.append(torch.stack([torch.full_like(s_cols, b), s_cols], 1))
        teacher.append(torch.stack([torch.full_like(t_cols, b), t_cols], 1))
    student, teacher = torch.cat(student), torch.cat(teacher)
    return [t.to(device) for t in (tokens, positions, attn, labels, student, teacher)]


def sample_choices(prompts_batch, k, generator):
    """For every block, k distinct non-fixed-point states drawn uniformly (fewer if it has fewer).
    The paper draws one; more per block put more of each packed row to use."""
    return [[torch.randperm(len(s) - 1, generator=generator)[:k].tolist() for s in p["states"]]
            for p in prompts_batch]


def distillation_loss(model, batch, cfg):
    """(total, consistency, AR) for one packed batch: consistency + ar_weight * AR."""
    tokens, positions, attn, labels, student, teacher = batch
    logits, _ = model(tokens, input_pos=positions, attn_mask=attn)  # (B, T, V)
    l_c = consistency_loss(logits[student[:, 0], student[:, 1]], logits[teacher[:, 0], teacher[:, 1]])
    l_ar = ar_loss(logits, labels, cfg.label_smoothing)
    return l_c + cfg.ar_weight * l_ar, l_c, l_ar


# ----------------------------------------------------------------------------------------------
# 3. evaluation and the before/after table

@torch.no_grad()
def evaluate_jacobi(model, enc, records, cfg, metric, device):
    """Jacobi-decode held-out prompts: tokens per forward, quality, share of repetitive outputs."""
    model.eval()
    tokens = forwards = repeated = 0
    scores = []
    for r in records:
        prompt = train.encode_prompt(enc, r["prompt"], model, cfg.max_new_tokens, device)
        out, stats = jacobi_decode(model, prompt, cfg.max_new_tokens, cfg.n, enc.eot_token, cfg.init)
        tokens, forwards = tokens + stats.tokens, forwards + stats.forwards
        repeated += longest_run(out.tolist()) >= cfg.repeat_limit
        scores.append(score(metric, r, train.decode_text(enc, out)))
    quality = sum(scores) / len(scores) if scores and scores[0] is not None else None
    return dict(tokens_per_forward=tokens / max(forwards, 1), quality=quality,
                repeated=repeated / max(len(records), 1))


def final_report(target, cllm, enc, records, metric, cfg, device):
    """Target vs CLLM on held-out prompts, AR and Jacobi interleaved per prompt (bench.py)."""
    prompts = [train.encode_prompt(enc, r["prompt"], target, cfg.max_new_tokens, device) for r in records]
    results = measure({"target": target, "CLLM": cllm}, prompts, [cfg.n], cfg.max_new_tokens,
                      enc.eot_token, warmup=2, quality=quality_measure(enc, records, metric, device))
    name = {"accuracy": "accuracy", "parse": "parse rate"}.get(metric, "quality")
    return results, markdown_table(results, name)


# ----------------------------------------------------------------------------------------------

def ensure_target(cfg):
    """Prepare the dataset and train the target when they are missing, saying so."""
    if not os.path.isfile(os.path.join(dataset_dir(cfg.dataset), "meta.json")):
        if cfg.dataset not in ("arith", "pycode"):
            load_meta(cfg.dataset)  # raises the error that says how to prepare it
        print(f"data/{cfg.dataset} is missing: preparing it (by hand: python data/{cfg.dataset}/prepare.py)")
        importlib.import_module(f"data.{cfg.dataset}.prepare").prepare([])
    if not os.path.isfile(os.path.join(cfg.target_dir, "ckpt.pt")):
        config = os.path.join(os.path.dirname(os.path.abspath(__file__)), "config", f"train_{cfg.dataset}.py")
        args = ([config] if os.path.isfile(config) else []) + [f"--dataset={cfg.dataset}",
                                                                f"--out_dir={cfg.target_dir}"]
        print(f"no target model in {cfg.target_dir}: training it first (by hand: python train.py "
              f"{' '.join(args)}; about 7 minutes for arith on 2 CPU cores)")
        train.main(args)


def main(argv):
    cfg = configure(CLLMConfig(), argv)
    for key, allowed in (("consistency", ("global", "local")), ("init_from", ("target", "resume")),
                         ("ar_target", ("fixed_point", "ground_truth")), ("init", ("prefix", "repeat"))):
        if getattr(cfg, key) not in allowed:
            raise ValueError(f"{key} must be one of {allowed}, got {getattr(cfg, key)!r}")
    device, ctx = train.setup_device(cfg.device)
    ensure_target(cfg)
    meta, enc = load_meta(cfg.dataset), load_encoding(cfg.dataset)
    target, target_ckpt = train.load_checkpoint(os.path.join(cfg.target_dir, "ckpt.pt"), device)
    if target_ckpt.get("dataset") not in (None, cfg.dataset):
        raise ValueError(f"the target in {cfg.target_dir} was trained on {target_ckpt['dataset']!r}, "
                         f"not {cfg.dataset!r}: set --dataset or --target_dir")
    torch.manual_seed(cfg.seed)
    target_id = fingerprint(target.state_dict())  # which target the trajectories and CLLM come from
    prompts = load_or_collect(cfg, target, target_id, enc)
    if not prompts:
        raise ValueError("no usable trajectories (every prompt was dropped as repetitive)")

    # 2. distil, from the target's weights or from a checkpoint of this script
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    batch_gen = torch.Generator().manual_seed(cfg.seed)
    iter_num, curve, train_secs = 0, [], 0.0
    if cfg.init_from == "resume":
        model, checkpoint = train.load_checkpoint(ckpt_path, device)
        train.note_changed_settings(checkpoint["config"], cfg)
        iter_num, curve, train_secs = checkpoint["iter_num"], checkpoint["curve"], checkpoint["train_secs"]
        batch_gen.set_state(checkpoint["batch_rng"])
        torch.set_rng_state(checkpoint["torch_rng"])
    else:
        model = copy.deepcopy(target)  # the CLLM starts from the target's weights
    model.train()
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.learning_rate,
                                           (cfg.beta1, cfg.beta2), device.type)
    if cfg.init_from == "resume":
        optimizer.load_state_dict(checkpoint["optimizer"])
    train_model = torch.compile(model) if cfg.compile else model
    eval_records = load_records(cfg.dataset, "val")[:cfg.eval_prompts]
    print(f"distilling {model.num_params() / 1e6:.2f}M parameters on {len(prompts)} prompts "
          f"({sum(len(p['states']) for p in prompts)} blocks), {cfg.consistency} consistency + "
          f"{cfg.ar_weight} * AR ({cfg.ar_target}), from iter {iter_num} to {cfg.max_iters}")

    def evaluate_and_save():
        t = time.time()
        e = evaluate_jacobi(model, enc, eval_records, cfg, meta["metric"], device)
        curve.append(dict(iter=iter_num, train_minutes=round(train_secs / 60, 2), **e))
        q = f"{meta['metric']} {e['quality']:.3f}, " if e["quality"] is not None else ""
        print(f"eval iter {iter_num}: tokens/forward {e['tokens_per_forward']:.2f}, {q}"
              f"repetitive {e['repeated']:.0%} on {len(eval_records)} val prompts "
              f"({time.time() - t:.1f}s)")
        base = curve[0]
        if e["quality"] is not None and base["quality"] is not None and e["quality"] < base["quality"] - 0.1:
            print(f"WARNING: quality fell from {base['quality']:.3f} to {e['quality']:.3f}. An early dip "
                  "usually recovers as the learning rate decays; if it keeps falling, it is a "
                  "collapse: raise ar_weight or lower learning_rate")
        if e["repeated"] > base["repeated"] + 0.1:
            print(f"WARNING: {e['repeated']:.0%} of the outputs repeat one token {cfg.repeat_limit}+ "
                  "times: a collapse into repetition? Raise ar_weight or lower learning_rate")
        if iter_num > 0:
            train.save_checkpoint(ckpt_path, dict(
                model=model.state_dict(), model_args=asdict(model.config),
                optimizer=optimizer.state_dict(), iter_num=iter_num, config=asdict(cfg),
                dataset=cfg.dataset, batch_rng=batch_gen.get_state(), torch_rng=torch.get_rng_state(),
                curve=curve, train_secs=train_secs, kind="cllm",
                target=target_id))

    t0, last_log = time.time(), iter_num
    while iter_num < cfg.max_iters:
        if iter_num % cfg.eval_interval == 0 and not (curve and curve[-1]["iter"] == iter_num):
            evaluate_and_save()
            t0, last_log = time.time(), iter_num
        lr = train.get_lr(iter_num, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        model.train()  # (evaluation leaves it in eval mode)
        step_start = time.time()
        idx = torch.randint(len(prompts), (cfg.batch_size,), generator=batch_gen).tolist()
        picked = [prompts[i] for i in idx]
        rows = [pack_row(p["prompt"], p["states"], c, p["answer"], cfg, model.config.block_size)
                for p, c in zip(picked, sample_choices(picked, cfg.states_per_block, batch_gen))]
        with ctx:
            loss, l_c, l_ar = distillation_loss(train_model, collate(rows, device), cfg)
        train.optimizer_step(model, optimizer, loss, cfg.grad_clip)
        train_secs += time.time() - step_start
        iter_num += 1
        if iter_num % cfg.log_interval == 0 or iter_num == cfg.max_iters:
            dt = (time.time() - t0) / (iter_num - last_log)
            t0, last_log = time.time(), iter_num
            print(f"iter {iter_num}: loss {loss.item():.4f} (consistency {l_c.item():.4f}, "
                  f"ar {l_ar.item():.4f}), lr {lr:.2e}, time {dt * 1000:.0f}ms, "
                  f"eta {(cfg.max_iters - iter_num) * dt / 60:.1f} min")
    if not (curve and curve[-1]["iter"] == iter_num):
        evaluate_and_save()

    # 3. the table
    test_records = load_records(cfg.dataset, "test")[:cfg.final_prompts]
    results = {}
    if test_records:
        print(f"\nheld-out comparison on {len(test_records)} test prompts "
              f"({environment(device)['device']}, {torch.get_num_threads()} threads):")
        results, table = final_report(target, model, enc, test_records, meta["metric"], cfg, device)
        print(table)
    print("training curve (val prompts): " + ", ".join(
        f"{c['train_minutes']:.1f} min: {c['tokens_per_forward']:.2f} tok/fwd"
        + (f", {c['quality']:.3f}" if c["quality"] is not None else "") for c in curve))
    with open(os.path.join(cfg.out_dir, "results.json"), "w") as f:
        json.dump(dict(config=asdict(cfg), environment=environment(device), results=results,
                       curve=curve), f, indent=1)
    return results


if __name__ == "__main__":
    run(main)
