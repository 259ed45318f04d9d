"""
Extra (a learner may skip it): the states that Jacobi Forcing (Hu, Kou et al. 2025, the same
lab's successor to CLLMs) trains on, for `python train_cllm.py --recipe=jacobi_forcing`.

The CLLM recipe shows the model states of one block at a time, each after the clean prefix
prompt + y*_<k. Jacobi Forcing shows it a *noisy stream*: a state of every block, block k seen
after the prompt and the earlier *noisy* blocks, which is what a decoder meets when it refines
several blocks at once. The loss is train_cllm.py's: a stream is one choice (0, [j_1, j_2, ..])
for train_cllm.consistency_pair, and its consistency is masked block by block
(train_cllm.kept_columns). How this departs from Jacobi Forcing's released recipe is listed in
docs/recipes.md. load_previous_round starts a second round from a first round's CLLM.
"""

import os

import torch

from common import load_model


def noise_ratio(state, fixed):
    """The noise of a state: the share of its block from the first wrong token on."""
    wrong = (state != fixed).nonzero()
    return (len(state) - int(wrong[0])) / len(state) if len(wrong) else 0.0


def noisy_streams(record, k, window, generator):
    """k noisy streams for one record, each a state of every block. Progressive noise: block j
    aims at the noise ratio t = schedule[(phase + j) mod window], schedule = linspace(0, 1,
    window), and takes the state whose noise_ratio is nearest t. The phase is drawn per stream:
    Jacobi Forcing's answers have ~32 blocks and a fixed phase, ours ~3, which would always train
    the first block clean."""
    if not record["states"]:
        return []
    schedule = torch.linspace(0, 1, window).tolist()
    ratios = [[noise_ratio(state, s[-1]) for state in s] for s in record["states"]]  # per block
    streams = []
    for _ in range(k):
        phase = int(torch.randint(window, (1,), generator=generator))
        js = []
        for b, r in enumerate(ratios):
            t = schedule[(phase + b) % window]
            noise = [abs(x - t) for x in r]
            js.append(noise.index(min(noise)))
        streams.append((0, js))
    return streams


def load_previous_round(cfg, target_id, device, say):
    """Jacobi Forcing's progressive rounds (--previous_round): the previous round's CLLM,
    previous_round/ckpt.pt, collects this round's trajectories and is its starting point. It must
    come from target_dir, which the guard and the table still judge against."""
    model, ckpt = load_model(os.path.join(cfg.previous_round, "ckpt.pt"), device, cfg.dataset, say)
    if ckpt.get("target") != target_id:
        raise ValueError(f"{cfg.previous_round}/ckpt.pt was not distilled from {cfg.target_dir}: a round "
                         "goes on from a CLLM of the same target (--target_dir)")
    return model
