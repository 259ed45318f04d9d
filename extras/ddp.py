"""
Extra (a learner may skip it): more than one process, PyTorch's own way. torchrun starts one
process per device and sets RANK, WORLD_SIZE and LOCAL_RANK; train.py and train_cllm.py then train
with DistributedDataParallel (NCCL on CUDA, gloo on CPU). Without torchrun the world is one
process: nothing is split, gathered or synchronised.

    torchrun --standalone --nproc_per_node=8 train.py config/train_arith_gpu.py

What the scripts do with it (the lines marked `# ddp`; docs/gpu.md has the rest):
- batch_size stays the global batch: every process draws the same batch and takes its own slice
  of it (gradient accumulation splits a slice further), so W processes see one process's batches;
- rank 0 logs, evaluates and writes the checkpoints (the plain module's weights);
- a signal to any process (Ctrl-C, a scheduler's SIGTERM, which torchrun passes on to every
  process) stops them all after the same step (first_of);
- trajectory collection is split by batches, gathered, and written once by rank 0.
"""

import os
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def master(self):
        """The process that logs, evaluates and writes files."""
        return self.rank == 0


def init(device):
    """(World, device) of this process: under torchrun, join the process group and take the
    device of the local rank; else a world of one on `device`."""
    if "RANK" not in os.environ:
        return World(), device
    world = World(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"]))
    if device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    # rank 0 evaluates while the others wait in a collective: give it time
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(hours=1))
    return world, device


def wrap(model, world, device):
    """The module that trains: DistributedDataParallel when there are several processes."""
    if world.size == 1:
        return model
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def per_process_batch(batch_size, grad_accum, world):
    """Windows (or prompts) per process and micro-step: batch_size / (processes * grad_accum)."""
    per_process = batch_size // (world.size * grad_accum)
    if per_process * world.size * grad_accum != batch_size:
        raise ValueError(f"batch_size {batch_size} does not divide into {world.size} processes x "
                         f"{grad_accum} micro-steps (grad_accum): make it a multiple of "
                         f"{world.size * grad_accum}")
    return per_process


def micro_steps(train_model, world, grad_accum):
    """(micro-step, context) for each micro-step of an iteration: the processes average their
    gradients only in the last one (DDP's no_sync in the others)."""
    for micro in range(grad_accum):
        last = micro == grad_accum - 1
        yield micro, (train_model.no_sync() if world.size > 1 and not last else nullcontext())


def micro_batches(rows, train_model, world, grad_accum):
    """(part, shares, context) for each micro-step over this process's packed rows
    (train_cllm.pack_row). shares: the part's share of the whole step's consistency positions and
    AR labels, over all processes, so that the parts' losses add up to the whole batch's."""
    sizes = [(len(r.student), int((r.labels != -1).sum())) for r in rows]  # (positions, labels) per row
    total = all_sum([sum(c for c, _ in sizes), sum(a for _, a in sizes)], world)
    size = len(rows) // grad_accum
    for micro, sync in micro_steps(train_model, world, grad_accum):
        part = slice(micro * size, (micro + 1) * size)
        yield rows[part], (sum(c for c, _ in sizes[part]) / max(total[0], 1),
                           sum(a for _, a in sizes[part]) / max(total[1], 1)), sync


def restore_rng(rng, world):
    """Set this process's torch RNG from a checkpoint's list of every process's states; a run
    resumed on another number of processes takes rank 0's (a documented approximation)."""
    torch.set_rng_state(rng[world.rank] if len(rng) == world.size else rng[0])


def my_share(items, world, per_process):
    """This process's slice of a global batch: items (W * per_process, ...) -> (per_process, ...)."""
    return items[world.rank * per_process:(world.rank + 1) * per_process]


def barrier(world):
    if world.size > 1:
        dist.barrier()


def all_gather(obj, world):
    """[obj of rank 0, obj of rank 1, ..] on every process (any picklable object)."""
    if world.size == 1:
        return [obj]
    out = [None] * world.size
    dist.all_gather_object(out, obj)
    return out


def first_of(obj, world):
    """The first obj that is not None over the processes (rank order), the same on every process:
    what one of them saw (a signal) and all must act on at the same step."""
    return next((o for o in all_gather(obj, world) if o is not None), None)


def all_sum(values, world):
    """Elementwise sum over the processes of a list of numbers (through all_gather, which works
    the same on gloo and NCCL)."""
    return [sum(column) for column in zip(*all_gather(values, world))]


def finish(world):
    """Leave the process group, all processes together: the others wait here while rank 0 makes
    the report. destroy_process_group is meant to be called by every process at about the same
    time; a process that left while rank 0 still ran aborted now and then (SIGABRT, "terminate
    called without an active exception": twice in about a dozen runs of the test suite)."""
    barrier(world)
    if world.size > 1:
        dist.destroy_process_group()
