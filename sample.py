"""
Sample from a model with greedy AR decoding or with Jacobi decoding, and watch the Jacobi fixed
point form. Without a run of your own it loads the CLLM shipped in pretrained/arith-cllm.

    python sample.py --jacobi                # Jacobi decoding, in blocks of the CLLM's own n (--n)
    python sample.py --show                  # every pass of every block, target then CLLM
    python sample.py --compare               # AR and Jacobi on the same prompt: same tokens? speed
    python sample.py                         # greedy AR
    python sample.py --jacobi --start="Question: Ava has 12 apples. ...\nAnswer:\n"  # or FILE:path
    python sample.py --model_dir=pretrained/arith-target   # the target model instead of the CLLM

A model knows only prompts like its training data's: the arith models, the six templates of
data/arith/prepare.py, each a question that ends in a line "Answer:". sample.py says when a
--start prompt does not look like the data's (\n in --start is a new line).

In --show, each line is one state of a block, the state after each forward pass: green tokens
are committed (the decoder has accepted them), cyan tokens are right but not yet committed (the
next pass commits them), yellow tokens are stationary (right, and staying so, while a token
before them is still wrong), red tokens are wrong. Without a colour terminal (or with NO_COLOR
set) the same is written with markers around each run of tokens: committed as is, {right},
[stationary], ~wrong~. Timings are taken after a warm-up decode of each model.
"""

import os
import sys
from dataclasses import dataclass

import torch

from common import (decode_text, encode_prompts, find_checkpoint, kept_target, load_model, own_n, run,
                    setup_device)
from data.common import generation_length, load_encoding, load_meta, load_records
from extras.configurator import configure
from extras.table import timed
from jacobi import greedy_decode, jacobi_decode, stationary_tokens


@dataclass
class SampleConfig:
    model_dir: str = "out-cllm-arith"  # the model to load: the out_dir of train_cllm.py or train.py
                                      # (its ckpt.pt); the shipped CLLM until you have run train_cllm.py
    ckpt: str = ""                    # a checkpoint path instead of model_dir/ckpt.pt
    jacobi: bool = False              # Jacobi decoding instead of greedy AR
    n: int = 0                        # Jacobi block size; 0: the checkpoint's own (common.own_n)
    AT_LEAST = dict(n=0)              # (not a setting: n = 0 is allowed here)
    show: bool = False                # print every Jacobi iteration (implies --jacobi)
    compare: bool = False             # AR and Jacobi on the same prompt
    start: str = ""                   # a prompt (\n: a new line), or FILE:path; empty: test prompts
    num_samples: int = 2              # test prompts to decode when --start is empty
    max_new_tokens: int = 0           # 0: from the data (data/common.generation_length)
    seed: int = 0                     # which held-out prompts, and the Jacobi initial guesses
    device: str = "auto"              # auto: cuda when there is one, else cpu


COLOURS = {"committed": "\033[32m", "right": "\033[36m", "stationary": "\033[33m", "wrong": "\033[31m"}
MARKERS = {"committed": "{}", "right": "{{{}}}", "stationary": "[{}]", "wrong": "~{}~"}


def use_colour():
    return sys.stdout.isatty() and not os.environ.get("NO_COLOR")


def token_kinds(state, fixed_point, committed, stationary):
    """What each token of a state is: 'committed' (the first `committed` tokens, which the decoder
    has accepted), 'right' (in the right prefix, not yet committed), 'stationary' (a row of
    jacobi.stationary_tokens) or 'wrong'."""
    right = (state == fixed_point).tolist()
    prefix = right.index(False) if False in right else len(right)
    return ["committed" if i < committed else "right" if i < prefix else
            "stationary" if stationary[i] else "wrong" for i in range(len(right))]


def show_state(enc, tokens, kinds, colour):
    """One state as text: each run of tokens of one kind coloured, or wrapped in its marker."""
    runs = []
    for t, kind in zip(tokens, kinds):
        if runs and runs[-1][0] == kind:
            runs[-1][1].append(t)
        else:
            runs.append((kind, [t]))
    out = ""
    for kind, ts in runs:
        text = enc.decode(ts).replace("\n", "\u23ce")  # a visible newline
        out += f"{COLOURS[kind]}{text}\033[0m" if colour else MARKERS[kind].format(text)
    return out


def show_trajectory(enc, stats, colour):
    """Every block, state by state, with what the decoder had committed after each pass: the
    picture of the paper's Figure 1, from jacobi_decode's own statistics."""
    first_pass = 0
    for k, (start, states, length) in enumerate(stats.passes):
        states = torch.stack(states)[:, :length]  # y^(0), then the state after each pass
        accepted = stats.accepted[first_pass:first_pass + len(states) - 1]
        first_pass += len(accepted)
        committed = [sum(accepted[:j]) for j in range(len(states))]
        stationary = stationary_tokens(states)
        print(f"block {k}: {len(accepted)} forward passes for {length} tokens, committing "
              f"{' + '.join(map(str, accepted))}")
        for j, state in enumerate(states):
            if j and torch.equal(state, states[j - 1]):
                print(f"  pass {j} changes nothing" + (": it confirms the fixed point and commits the "
                      f"last {accepted[-1]}" if j == len(states) - 1 else "") + f" ({committed[j]}/{length})")
                continue
            kinds = token_kinds(state, states[-1], committed[j], stationary[j])
            print(f"  y({j}) {show_state(enc, state.tolist(), kinds, colour)}"
                  + (f"  ({committed[j]}/{length} committed)" if j else "  (the guess)"))


def stats_line(tokens, forwards, secs=None):
    return (f"tokens {tokens}, forward passes {forwards}, tokens/forward {tokens / max(forwards, 1):.2f}"
            + (f", {tokens / secs:.1f} tokens/s" if secs else ""))


def prompts_to_run(cfg, dataset):
    if cfg.start.startswith("FILE:"):
        try:
            with open(cfg.start[5:], encoding="utf-8") as f:
                return [f.read()]
        except UnicodeDecodeError as e:
            raise ValueError(f"{cfg.start[5:]} is not UTF-8 text ({e.reason} at byte {e.start}): "
                             "save the prompt as UTF-8") from None
    if cfg.start:
        return [cfg.start.replace("\\n", "\n")]
    records = load_records(dataset, "test")
    g = torch.Generator().manual_seed(cfg.seed)
    return [records[i]["prompt"] for i in torch.randperm(len(records), generator=g)[:cfg.num_samples]]


def check_format(text, records):
    """A note when a prompt does not start and end the way every prompt of the data does: the
    model has seen nothing else, and its output will not be an answer."""
    prompts = [r["prompt"] for r in records]
    head, tail = os.path.commonprefix(prompts), os.path.commonprefix([p[::-1] for p in prompts])[::-1]
    if text.startswith(head) and text.endswith(tail):
        return None
    return (f"note: every prompt of the data starts with {head!r} and ends with {tail!r}, this one "
            "does not: the model has seen nothing like it, and its output will not be an answer. A "
            f"prompt that works:\n{prompts[0]}")


def main(argv):
    cfg = configure(SampleConfig(), argv)
    device, _ = setup_device(cfg.device)
    path = cfg.ckpt or find_checkpoint(cfg.model_dir)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}: make one with `python train_cllm.py` "
                                "(a CLLM) or `python train.py` (a target), or point --model_dir/--ckpt "
                                "at one")
    model, ckpt = load_model(path, device)  # (and the dataset it needs, prepared if missing)
    dataset = ckpt["dataset"]
    enc = load_encoding(dataset)
    models = [("model", model)]
    target_path = os.path.join(ckpt["config"].get("target_dir", ""), "ckpt.pt")
    if cfg.show and ckpt.get("kind") == "cllm" and os.path.isfile(target_path):
        name = "CLLM (the target itself, iteration 0)" if kept_target(ckpt) else "CLLM"
        models = [("target", load_model(target_path, device, dataset)[0]), (name, model)]
    own = own_n(ckpt["config"])
    n, guess = cfg.n or own, ckpt["config"].get("guess", "prefix")  # (the guess it was trained with)
    if (cfg.jacobi or cfg.show or cfg.compare) and ckpt.get("kind") == "cllm" and n != own:
        print(f"note: this CLLM was chosen by its Jacobi tokens per forward at n={own}")
    colour = use_colour()
    max_new_tokens = cfg.max_new_tokens or generation_length(load_meta(dataset), model.config.block_size)
    texts = prompts_to_run(cfg, dataset)
    if cfg.start:
        note = check_format(texts[0], load_records(dataset, "test"))
        if note:
            print(note)
    prompts = encode_prompts(enc, [dict(prompt=t) for t in texts], model, max_new_tokens, device)
    for i, (text, prompt) in enumerate(zip(texts, prompts)):
        if i == 0:
            for _, m in models:  # warm-up: a first call pays one-time costs that timing must not see
                greedy_decode(m, prompt, 8)
                jacobi_decode(m, prompt, 8, n)
        print("=" * 80 + f"\n{text}", end="" if text.endswith("\n") else "\n")
        for name, m in models:
            greedy = lambda: greedy_decode(m, prompt, max_new_tokens, enc.eot_token)
            jacobi = lambda: jacobi_decode(m, prompt, max_new_tokens, n, enc.eot_token, guess, cfg.seed)
            if cfg.compare:
                ar, ar_secs = timed(greedy, device)
                (jt, stats), j_secs = timed(jacobi, device)
                print(decode_text(enc, ar))
                print(f"AR:     {stats_line(len(ar), len(ar), ar_secs)}")
                print(f"Jacobi: {stats_line(stats.tokens, stats.forwards, j_secs)}")
                if torch.equal(ar, jt):
                    print(f"identical outputs; Jacobi speedup {ar_secs / j_secs:.2f}x")
                else:
                    print("!!! MISMATCH: Jacobi and AR outputs differ (in float32 they must not; "
                          f"bf16/fp16 can flip near-ties) !!!\nJacobi: {decode_text(enc, jt)!r}")
            elif cfg.jacobi or cfg.show:
                (tokens, stats), secs = timed(jacobi, device)
                if cfg.show:
                    print(f"--- {name}: Jacobi decoding, n={n} ---")
                    show_trajectory(enc, stats, colour)
                print(decode_text(enc, tokens))  # (--show is for reading, not timing)
                print(stats_line(stats.tokens, stats.forwards, None if cfg.show else secs))
            else:
                tokens, secs = timed(greedy, device)
                print(decode_text(enc, tokens))
                print(stats_line(len(tokens), len(tokens), secs))


if __name__ == "__main__":
    run(main)
