"""
Extra (a learner may skip it): the bookkeeping around collecting trajectories. The method is
train_cllm.collect_batch, a call into jacobi.collect_trajectories (the target, or the previous
round's CLLM, Jacobi-decodes many prompts side by side, every state of every block kept); this
file saves the records in out_dir/trajectories.pt, reused while the source model and the settings
match, resumes a killed collection, and splits the work between processes under torchrun.

    out_dir/trajectories.pt   {"meta": what they came from, "stats": ..., "prompts": [record]}
    record                    {"prompt": (P,) token ids, "answer": (A,) the ground truth + EOS,
                               "states": [(S_k, b_k) int32 per block k: y^(0) .. y*]}

Finished batches are saved to trajectories.partial<rank>.pt every half minute and when Ctrl-C or
SIGTERM stops the collection, so that a rerun goes on from there instead of starting again.
"""

import glob
import os
import time

import torch

from common import encode_prompts, fingerprint, save_checkpoint, tokenizer_fingerprint
from data.common import load_records
from extras import ddp

SAVE_EVERY = 30.0  # seconds between saves of the finished batches


def trajectory_meta(cfg, source_id):
    """What a trajectory file must match to be reused."""
    return dict(target=source_id, dataset=cfg.dataset, tokenizer=tokenizer_fingerprint(cfg.dataset),
                n=cfg.n, guess=cfg.guess, num_prompts=cfg.num_prompts,
                max_new_tokens=cfg.traj_max_new_tokens, repeat_limit=cfg.repeat_limit, seed=cfg.seed)


def read(path, meta):
    """A saved trajectory file (or partial file), checked against meta."""
    try:
        data = torch.load(path, weights_only=False)
        saved = data["meta"]
    except Exception as e:  # truncated, not a torch file, or from another version of this script
        raise ValueError(f"{path} is not a readable trajectory file ({type(e).__name__}: {e}): "
                         "delete it to collect the trajectories again") from None
    diff = {k: (saved.get(k), v) for k, v in meta.items() if saved.get(k) != v}
    if diff:
        raise ValueError(f"{path} does not match this run (setting: (file, now)): {diff}. "
                         f"Delete it to collect again, or use another --out_dir")
    return data


def load_or_collect(cfg, source, enc, world, interrupt, collect_batch):
    """The records of the first num_prompts training prompts, collected by
    collect_batch(cfg, source, enc, records, ids, first) (train_cllm.collect_batch), or read from
    out_dir/trajectories.pt when it matches the source model, tokenizer and settings.
    Under torchrun each process collects every world.size-th batch; all get the whole list, and
    rank 0 writes the same file one process would. After Ctrl-C or SIGTERM (common.Interrupt) the
    finished batches are saved, and the same command goes on from them."""
    path = os.path.join(cfg.out_dir, "trajectories.pt")
    partial = os.path.join(cfg.out_dir, f"trajectories.partial{world.rank}.pt")
    meta = trajectory_meta(cfg, fingerprint(source.state_dict()))
    say = print if world.master else lambda *a, **k: None
    if os.path.isfile(path):
        data = read(path, meta)
        say(f"reusing {path}: {data['stats']}")
        return data["prompts"]
    records = load_records(cfg.dataset, "train")[:cfg.num_prompts]
    ids = encode_prompts(enc, records, source, cfg.traj_max_new_tokens, "cpu", "training prompts", say)
    batches = {}  # first prompt of a batch: (kept records, dropped count)
    partial_meta = dict(meta, collect_batch=cfg.collect_batch)  # batches are keyed by their start
    partials = sorted(glob.glob(os.path.join(cfg.out_dir, "trajectories.partial*.pt")))
    for f in partials:
        batches.update(read(f, partial_meta)["batches"])  # what a killed run had finished
    starts = range(0, len(records), cfg.collect_batch)
    todo = [s for s in starts if s not in batches]
    rounds = [todo[i:i + world.size] for i in range(0, len(todo), world.size)]  # ddp: one batch each
    say(f"collecting Jacobi trajectories on {len(records)} training prompts "
          f"(n={cfg.n}, batches of {cfg.collect_batch})"
          + (f", {len(batches)} batches already done before" if batches else ""))
    mine = {}
    t0 = last_save = time.time()
    with interrupt:
        for count, firsts in enumerate(rounds, 1):
            signum = ddp.first_of(interrupt.signal, world)  # ddp: all stop at the same round
            if signum:
                save_checkpoint(partial, dict(meta=partial_meta, batches={**batches, **mine}))
                ddp.finish(world)
                saved = len(batches) + (count - 1) * world.size
                interrupt.exit(signum, f"stopped collecting trajectories, {saved} of {len(starts)} batches "
                                       f"done and saved in {cfg.out_dir}", resume=False)
            if world.rank < len(firsts):
                first = firsts[world.rank]
                chunk = slice(first, first + cfg.collect_batch)
                mine[first] = collect_batch(cfg, source, enc, records[chunk], ids[chunk], first)
            secs = time.time() - t0
            n_blocks = sum(len(p["states"]) for kept, _ in mine.values() for p in kept)  # (this process's)
            say(f"collect: batches {len(batches) + min(count * world.size, len(todo))}/{len(starts)}, "
                f"{n_blocks / secs:.0f} blocks/s, "
                f"eta {(len(rounds) - count) * secs / count / 60:.1f} min")
            if time.time() - last_save > SAVE_EVERY and count < len(rounds):
                save_checkpoint(partial, dict(meta=partial_meta, batches={**batches, **mine}))
                last_save = time.time()
    for done in ddp.all_gather(mine, world):  # ddp: every process's batches
        batches.update(done)
    prompts = [p for s in starts for p in batches[s][0]]
    n_blocks, secs = sum(len(p["states"]) for p in prompts), time.time() - t0
    stats = dict(prompts=len(prompts), blocks=n_blocks, dropped_prompts=sum(batches[s][1] for s in starts),
                 seconds=round(secs, 1), blocks_per_s=round(n_blocks / max(secs, 1e-9), 1))
    say(f"collected {stats}")
    if not prompts:
        raise ValueError("no usable trajectories: every prompt's output repeats a token repeat_limit times "
                         "(a target that collapses; docs/own-data.md)")
    if world.master:
        save_checkpoint(path, dict(meta=meta, stats=stats, prompts=prompts))
    ddp.barrier(world)  # (the others keep theirs until the file is written)
    for f in [partial] + (partials if world.master else []):  # (and those of a run with more processes)
        try:
            os.remove(f)
        except FileNotFoundError:  # (never written, or removed by another process)
            pass
    return prompts
