"""
Extra (a learner may skip it): stopping a distillation run and going on from where it stopped.
train_cllm.py writes out_dir/last.pt after every evaluation and when Ctrl-C or SIGTERM stops it
(common.Interrupt); --init_from=resume continues from it exactly: the same weights, optimizer
state, curve, batches and random draws as a run that never stopped (tests/test_cllm.py; the torch
RNG restored is the CPU's, so on CUDA dropout would draw differently).
"""

import os

import torch

from common import read_checkpoint, save_checkpoint
from extras import ddp
from extras.configurator import note_changed_settings


def save_last(checkpoint, optimizer, progress, world):
    """out_dir/last.pt: checkpoint (what ckpt.pt would hold), the optimizer, the progress and every
    process's RNG. All processes call it; rank 0 writes."""
    rng = ddp.all_gather(torch.get_rng_state(), world)
    if world.master:
        save_checkpoint(os.path.join(checkpoint["config"]["out_dir"], "last.pt"),
                        dict(checkpoint, optimizer=optimizer.state_dict(), train_secs=progress.train_secs,
                             batch_rng=progress.batch_gen.get_state(), torch_rng=rng))


def resume(cfg, model, optimizer, progress, world):
    """Load out_dir/last.pt into model, optimizer and progress, and restore every process's RNG."""
    saved = read_checkpoint(os.path.join(cfg.out_dir, "last.pt"))
    note_changed_settings(saved["config"], cfg)
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    progress.iter_num, progress.curve, progress.train_secs = saved["iter_num"], saved["curve"], saved["train_secs"]
    progress.batch_gen.set_state(saved["batch_rng"])
    ddp.restore_rng(saved["torch_rng"], world)


def exit_if_interrupted(interrupt, cfg, checkpoint, optimizer, progress, world):
    """After Ctrl-C or SIGTERM (to any process: all stop at the same step): last.pt at this step
    (checkpoint: a function that gives what ckpt.pt would hold), and the line that says how to go
    on. Before the first step nothing is saved: the same command goes on from the trajectories."""
    signum = ddp.first_of(interrupt.signal, world)
    if not signum:
        return
    if progress.iter_num:  # (at 0, after a signal late in the collection, nothing is trained)
        save_last(checkpoint(), optimizer, progress, world)
    ddp.finish(world)
    where = (f"stopped at iteration {progress.iter_num} of {cfg.max_iters}, saved in "
             f"{os.path.join(cfg.out_dir, 'last.pt')}" if progress.iter_num else
             f"stopped before the first step, the trajectories saved in {cfg.out_dir}")
    interrupt.exit(signum, where, resume=progress.iter_num > 0)
