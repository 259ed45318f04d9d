"""
The training data of a CLLM: the target's Jacobi trajectories on the training prompts (paper
section 3.2), cleaned, and saved once per target.

    out_dir/trajectories.pt   {"meta": what they came from, "stats": ..., "prompts": [record]}
    record                    {"prompt": (P,) token ids, "answer": (A,) the ground truth + EOS,
                               "states": [(S_k, b_k) int32 per block k: y^(0) .. y*]}

The target decodes the prompts in batches (jacobi.collect_trajectories). Prompts whose output
repeats one token repeat_limit times are dropped, as the authors do: they teach collapse.
Finished batches are saved to trajectories.partial<rank>.pt every half minute, so that a rerun
after a kill goes on from there instead of starting again.
"""

import glob
import hashlib
import importlib
import os
import time

import torch

import distributed
import train
from data.common import dataset_dir, load_encoding, load_meta, load_records, longest_run
from jacobi import collect_trajectories

SAVE_EVERY = 30.0  # seconds between saves of the finished batches


def fingerprint(*parts):
    """A short hash of state dicts and files: which target and tokenizer a file came from."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, dict):  # a state dict
            for k in sorted(part):
                h.update(k.encode())
                h.update(part[k].detach().cpu().contiguous().numpy().tobytes())
        elif os.path.isfile(part):
            with open(part, "rb") as f:
                h.update(f.read())
        else:
            h.update(part.encode())  # a name, e.g. of a tokenizer that is not a file (gpt2)
    return h.hexdigest()[:16]


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
              f"{' '.join(args)}; the test prompts are measured in the final table)")
        train.main(args + ["--eval_prompts=0"])  # the final table measures it on the test prompts


def load_target(cfg, device, world=distributed.World()):
    """(target model, dataset meta, tokenizer): out_dir's target, checked against the dataset;
    on one process, the dataset is prepared and the target trained first when missing."""
    if world.size == 1:
        ensure_target(cfg)
    elif not os.path.isfile(os.path.join(cfg.target_dir, "ckpt.pt")):  # ddp
        raise ValueError(f"no target in {cfg.target_dir}: under torchrun, train it first (torchrun ... "
                         f"train.py --dataset={cfg.dataset} --out_dir={cfg.target_dir})")
    meta, enc = load_meta(cfg.dataset), load_encoding(cfg.dataset)
    target, target_ckpt = train.load_checkpoint(os.path.join(cfg.target_dir, "ckpt.pt"), device)
    if target_ckpt.get("dataset") not in (None, cfg.dataset):
        raise ValueError(f"the target in {cfg.target_dir} was trained on {target_ckpt['dataset']!r}, "
                         f"not {cfg.dataset!r}: set --dataset or --target_dir")
    train.check_vocabulary(target, meta, os.path.join(cfg.target_dir, "ckpt.pt"))
    return target, meta, enc


def trajectory_meta(cfg, target_id):
    """What a trajectory file must match to be reused."""
    tokenizer = os.path.join(dataset_dir(cfg.dataset), "tokenizer.tiktoken")
    return dict(target=target_id, dataset=cfg.dataset,
                tokenizer=fingerprint(tokenizer if os.path.isfile(tokenizer) else "gpt2"),
                n=cfg.n, init=cfg.init, num_prompts=cfg.num_prompts,
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


def collect_batch(cfg, target, enc, records, ids, first):
    """Trajectories of the prompts ids[i] of records[i] (seed cfg.seed + first + i);
    (kept records, dropped count)."""
    trajs = collect_trajectories(target, ids, cfg.n, cfg.traj_max_new_tokens, enc.eot_token,
                                 cfg.init, seeds=[cfg.seed + first + i for i in range(len(records))])
    kept, dropped = [], 0
    for r, prompt, blocks in zip(records, ids, trajs):
        output = torch.cat([b.fixed_point for b in blocks]).tolist() if blocks else []
        if longest_run(output) >= cfg.repeat_limit:
            dropped += 1  # degenerate: a run of one token, which teaches collapse
            continue
        answer = enc.encode_ordinary(r["answer"]) + [enc.eot_token]
        kept.append(dict(prompt=prompt, answer=torch.tensor(answer),
                         states=[b.states.to(torch.int32).cpu() for b in blocks]))
    return kept, dropped


def load_or_collect(cfg, target, target_id, enc, world=distributed.World()):
    """The trajectories of the target on the first num_prompts training prompts, from
    out_dir/trajectories.pt when it matches the current target, tokenizer and settings.
    Under torchrun each process collects every world.size-th batch; all get the whole list, and
    rank 0 writes the same file one process would."""
    path = os.path.join(cfg.out_dir, "trajectories.pt")
    partial = os.path.join(cfg.out_dir, f"trajectories.partial{world.rank}.pt")
    meta = trajectory_meta(cfg, target_id)
    say = print if world.master else lambda *a, **k: None
    if os.path.isfile(path):
        data = read(path, meta)
        say(f"reusing {path}: {data['stats']}")
        return data["prompts"]
    records = load_records(cfg.dataset, "train")[:cfg.num_prompts]
    ids = train.encode_prompts(enc, records, target, cfg.traj_max_new_tokens, "cpu", "training prompts", say)
    batches = {}  # first prompt of a batch: (kept records, dropped count)
    partial_meta = dict(meta, collect_batch=cfg.collect_batch)  # batches are keyed by their start
    partials = sorted(glob.glob(os.path.join(cfg.out_dir, "trajectories.partial*.pt")))
    for f in partials:
        batches.update(read(f, partial_meta)["batches"])  # what a killed run had finished
    starts = range(0, len(records), cfg.collect_batch)
    todo = [s for s in starts if s not in batches][world.rank::world.size]  # ddp: my share
    say(f"collecting Jacobi trajectories of the target on {len(records)} training prompts "
          f"(n={cfg.n}, batches of {cfg.collect_batch})"
          + (f", {len(batches)} batches already done before" if batches else ""))
    mine = {}
    t0 = last_save = time.time()
    for count, first in enumerate(todo, 1):
        chunk = slice(first, first + cfg.collect_batch)
        mine[first] = collect_batch(cfg, target, enc, records[chunk], ids[chunk], first)
        secs = time.time() - t0
        n_records = sum(len(p["states"]) for kept, _ in mine.values() for p in kept)
        say(f"collect: batches {len(batches) + count * world.size}/{len(starts)}, "
              f"{n_records / secs:.0f} records/s, eta {(len(todo) - count) * secs / count / 60:.1f} min")
        if time.time() - last_save > SAVE_EVERY and count < len(todo):
            train.save_checkpoint(partial, dict(meta=partial_meta, batches={**batches, **mine}))
            last_save = time.time()
    for done in distributed.all_gather(mine, world):  # ddp: every process's batches
        batches.update(done)
    prompts = [p for s in starts for p in batches[s][0]]
    n_records, secs = sum(len(p["states"]) for p in prompts), time.time() - t0
    stats = dict(prompts=len(prompts), records=n_records, dropped_prompts=sum(batches[s][1] for s in starts),
                 seconds=round(secs, 1), records_per_s=round(n_records / max(secs, 1e-9), 1))
    say(f"collected {stats}")
    if world.master:
        train.save_checkpoint(path, dict(meta=meta, stats=stats, prompts=prompts))
    distributed.barrier(world)  # (the others keep theirs until the file is written)
    if os.path.isfile(partial):
        os.remove(partial)
    for f in partials if world.master else []:  # left by a run with more processes
        if os.path.isfile(f):
            os.remove(f)
    return prompts
