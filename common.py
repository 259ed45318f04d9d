"""
What the scripts share: interrupts, the device, the learning rate, checkpoints, prompts as tokens.
The scripts (train.py, train_cllm.py, sample.py, bench.py) are leaves: no script imports another
(the tests import them all). Their settings are read by extras/configurator.py.
"""

import hashlib
import math
import os
import shlex
import signal
import sys
import time
from contextlib import nullcontext

import torch

from data.common import dataset_dir, ensure_prepared, load_meta
from model import GPT, GPTConfig


def run(main):
    """Run a script's main(argv). A bad setting, a missing file or a bad input is reported in one
    line that says what to do, not in a traceback; so is Ctrl-C where no loop saves first
    (Interrupt). Output is line-buffered, so that progress shows at once also when it goes to a
    pipe or a file (python train_cllm.py | tee log)."""
    sys.stdout.reconfigure(line_buffering=True)
    try:
        main(sys.argv[1:])
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt as e:
        print(f"interrupted{': ' + str(e) if str(e) else ''}", file=sys.stderr)
        sys.exit(128 + signal.SIGINT)


# ----------------------------------------------------------------------------------------------
# interrupts: a person's Ctrl-C or a scheduler's SIGTERM stops a run between two steps

class Interrupt:
    """Inside `with Interrupt(...) as interrupt:`, SIGINT (Ctrl-C) and SIGTERM (what a scheduler
    sends before it kills a job) only set interrupt.signal. The loop reads it once per step, and
    when it is set saves what it needs to go on and calls interrupt.exit, which prints where the
    run stopped and the command that continues it. A second signal stops at once: checkpoints are
    written atomically (save_checkpoint), so none is left half-written."""

    def __init__(self, script, argv, world_size=1, master=True):
        self.script, self.argv, self.world_size, self.master = script, list(argv), world_size, master
        self.signal, self.at = None, 0.0

    def __enter__(self):
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def handle(self, signum, frame):
        if self.signal is None:
            self.signal, self.at = signal.Signals(signum), time.monotonic()
            if self.master:  # (os.write: print is not safe inside a signal handler)
                os.write(2, f"\n{self.signal.name}: saving after this step (another one stops at "
                            "once)\n".encode())
        elif time.monotonic() - self.at > 1.0:  # (sooner: the same Ctrl-C, passed on by torchrun)
            raise KeyboardInterrupt("stopped at once; the files saved so far are intact")

    def command(self, resume):
        """The command line that goes on: this one, with --init_from=resume when resume."""
        args = ([a for a in self.argv if not a.startswith("--init_from=")] + ["--init_from=resume"]
                if resume else self.argv)
        launcher = (["python", self.script] if self.world_size == 1 else
                    ["torchrun", "--standalone", f"--nproc_per_node={self.world_size}", self.script, "--"])
        return shlex.join(launcher + args)

    def exit(self, signum, where, resume=True):
        """Say where the run stopped and how to go on; exit with the signal's status (128 + its
        number, as a shell reports a process it stopped)."""
        if self.master:
            print(f"{signal.Signals(signum).name}: {where}; go on with: {self.command(resume)}")
        sys.exit(128 + signum)


# ----------------------------------------------------------------------------------------------
# device and optimisation

def setup_device(name, autocast="auto"):
    """(device, autocast context of the training steps). autocast "auto": bf16 autocast on CUDA,
    plain float32 on CPU; "bfloat16": bf16 autocast on either (the CPU's autocast supports bf16,
    so that scripts/gpu_run.sh --smoke trains in the GPU's precision on a CPU); "float32": none."""
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device={name}, but this torch ({torch.__version__}) sees no CUDA GPU: "
                         "use --device=cpu (or auto, which picks a GPU when there is one)")
    device = torch.device("cuda" if name == "auto" and torch.cuda.is_available() else
                          "cpu" if name == "auto" else name)
    # (TF32 stays off on CUDA: float32 decoding must stay exactly float32)
    if autocast == "bfloat16" or (autocast == "auto" and device.type == "cuda"):
        return device, torch.autocast(device.type, dtype=torch.bfloat16)
    return device, nullcontext()


def get_lr(it, learning_rate, min_lr, warmup_iters, decay_iters):
    """Linear warm-up to learning_rate, then cosine decay to min_lr at decay_iters."""
    if it < warmup_iters:
        return learning_rate * (it + 1) / warmup_iters
    ratio = min(1.0, (it - warmup_iters) / max(1, decay_iters - warmup_iters))
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)


def set_lr(optimizer, it, cfg, decay_iters):
    """Give every parameter group the learning rate of step it (get_lr with a run's settings)."""
    lr = get_lr(it, cfg.learning_rate, cfg.min_lr, cfg.warmup_iters, cfg.lr_decay_iters or decay_iters)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def optimizer_step(model, optimizer, grad_clip):
    """After backward: clip the gradient norm (grad_clip > 0), step, clear the gradients."""
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


# ----------------------------------------------------------------------------------------------
# checkpoints: one dict with the weights, the model's shape, the settings that made it, and (for
# last.pt) everything needed to continue

def save_checkpoint(path, checkpoint):
    """Write atomically: a crash mid-write leaves the previous checkpoint intact."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    torch.save(checkpoint, path + ".tmp")
    os.replace(path + ".tmp", path)


def read_checkpoint(path):
    """The dict saved at path, or an error that names the file and says what to do."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}: train one with `python train.py` "
                                "(a target) or `python train_cllm.py` (a CLLM)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)  # RNG states stay on CPU
        assert isinstance(checkpoint, dict) and {"model", "model_args"} <= set(checkpoint)
    except Exception as e:
        raise ValueError(f"{path} is not a readable checkpoint of this project ({type(e).__name__}"
                         f"{': ' + str(e)[:100] if str(e) else ''}): truncated by a crash, or made by "
                         "something else? Make it again with `python train.py` or `python "
                         "train_cllm.py`, or point the setting at another") from None
    return checkpoint


def load_checkpoint(path, device="cpu"):
    """(model in eval mode, in float32, checkpoint dict) from a checkpoint of train.py or
    train_cllm.py (or a shipped one, stored in 16 bits)."""
    checkpoint = read_checkpoint(path)
    model = GPT(GPTConfig(**checkpoint["model_args"]))
    model.load_state_dict(checkpoint["model"])  # (copied into float32 parameters)
    return model.to(device).eval(), checkpoint


def tokenizer_fingerprint(dataset):
    """Which tokenizer a prepared dataset has: a model decodes only the data it was trained on."""
    path = os.path.join(dataset_dir(dataset), "tokenizer.tiktoken")
    return fingerprint(path if os.path.isfile(path) else "gpt2")


def check_dataset(model, checkpoint, dataset, path):
    """A checkpoint decodes only the dataset whose tokenizer it was trained with: say what to do
    when it is another."""
    if checkpoint.get("dataset") not in (None, dataset):
        raise ValueError(f"{path} was trained on {checkpoint['dataset']!r}, not {dataset!r}: set "
                         "--dataset, or point at another model")
    meta = load_meta(dataset)
    same = checkpoint.get("tokenizer") in (None, tokenizer_fingerprint(dataset))
    if model.config.vocab_size != meta["vocab_size"] or not same:
        raise ValueError(f"{path} was trained with another tokenizer than data/{meta['name']} has "
                         f"now: the dataset was prepared again since, with other settings? Prepare it "
                         f"with the settings the model was trained on (python data/{meta['name']}/"
                         "prepare.py, defaults), or train the model again")


def load_model(path, device, dataset=None, say=print):
    """(model, checkpoint) of path, checked against the dataset, saying which model it is.
    dataset None: the checkpoint's own, prepared first when it is missing (ensure_prepared)."""
    model, checkpoint = load_checkpoint(path, device)
    if dataset is None:
        dataset = checkpoint.get("dataset", "arith")
        ensure_prepared(dataset)
    check_dataset(model, checkpoint, dataset, path)
    shipped = " (shipped with the repository)" if path.startswith("pretrained") else ""
    kind = ("the target itself (the guard kept no distilled checkpoint of this CLLM run)"
            if kept_target(checkpoint) else f"{checkpoint.get('kind', 'a')} model")
    say(f"loaded {path}{shipped}: {kind}, {model.num_params() / 1e6:.2f}M parameters, "
        f"iteration {checkpoint.get('iter_num')}")
    return model, checkpoint


def kept_target(checkpoint):
    """Whether a CLLM run's ckpt.pt holds the target's weights: its guard kept iteration 0, the
    target's own evaluation, when no distilled checkpoint was within the quality tolerance."""
    return checkpoint.get("kind") == "cllm" and checkpoint.get("iter_num") == 0


def own_n(config):
    """The Jacobi block size a checkpoint's settings decode with unless told otherwise: a CLLM's
    decode_n (the n its checkpoint was chosen by), 16 for a target."""
    return config.get("decode_n") or config.get("n") or 16


SHIPPED = {"out-cllm-arith": "pretrained/arith-cllm", "out-arith": "pretrained/arith-target"}


def find_checkpoint(folder):
    """folder/ckpt.pt; for a default folder that holds no run yet, the model shipped in
    pretrained/ instead (scripts/make_pretrained.sh makes it)."""
    path = os.path.join(folder, "ckpt.pt")
    if not os.path.isfile(path) and folder in SHIPPED:
        return os.path.join(SHIPPED[folder], "ckpt.pt")
    return path


def refuse_to_overwrite(out_dir, init_from):
    """Starting afresh in a folder that holds a run would lose it; resuming needs last.pt. Say
    what to do instead."""
    last, best = os.path.join(out_dir, "last.pt"), os.path.join(out_dir, "ckpt.pt")
    if init_from != "resume" and (os.path.isfile(last) or os.path.isfile(best)):
        raise ValueError(f"{out_dir} already holds a run ({'last.pt' if os.path.isfile(last) else 'ckpt.pt'}): "
                         "continue it with --init_from=resume (a larger --max_iters trains longer), or "
                         "start afresh in another --out_dir (or delete this one)")
    if init_from == "resume" and not os.path.isfile(last) and os.path.isfile(best):
        raise ValueError(f"{out_dir} has no last.pt to resume from (its ckpt.pt is a shipped or exported "
                         "model): start afresh, without --init_from=resume and in another --out_dir")
    if init_from == "resume" and not os.path.isfile(last):
        raise ValueError(f"{out_dir} has no last.pt to resume from: start afresh, without --init_from=resume")


def fingerprint(*parts):
    """A short hash of state dicts, files and names: which model and tokenizer a file came from."""
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


# ----------------------------------------------------------------------------------------------
# prompts and answers as tokens

def prompt_budget(context, max_new_tokens):
    """How many prompt tokens generation keeps: the context minus the tokens to generate, but at
    least half the context."""
    return max(context - max_new_tokens, context // 2)


def encode_prompts(enc, records, model, max_new_tokens, device, what="prompts", say=print):
    """Token ids of every record's prompt, cropped from the left to prompt_budget tokens, saying how
    many prompts were cropped (the model then never sees their beginning)."""
    keep = prompt_budget(model.config.block_size, max_new_tokens)
    ids = [enc.encode_ordinary(r["prompt"]) for r in records]
    lost = [len(i) - keep for i in ids if len(i) > keep]
    if lost:
        say(f"note: {len(lost)} of {len(records)} {what} are longer than {keep} tokens and were cropped "
            f"to their last {keep} (context {model.config.block_size}, max_new_tokens "
            f"{max_new_tokens}), losing {sum(lost) / len(lost):.0f} tokens on average, {max(lost)} at "
            "most: a larger --block_size (train.py) keeps more")
    return [torch.tensor(i[-keep:], dtype=torch.long, device=device) for i in ids]


def check_context(meta, context, max_new_tokens, what, fix, say=print, setting="max_new_tokens"):
    """Refuse a context in which the data's task cannot be learned: the median record (prompt +
    answer) longer than the context, which the model then never sees whole, or the median prompt
    longer than generation keeps (prompt_budget). Note when more than 5% of the records or most
    answers do not fit. what: the context as the message names it; fix: what to change;
    setting: the one that sets max_new_tokens."""
    lengths = meta.get("lengths")
    if not lengths:
        return  # (a dataset prepared by an older version: no lengths to check against)
    total, prompt, answer = lengths["total"], lengths["prompt"], lengths["answer"]
    name = meta["name"]
    if total["p50"] > context:
        raise ValueError(f"{what} cannot hold most of {name}'s records (prompt + answer: "
                         f"{total['p50']} tokens at the median, {total['p95']} for 95%): the model "
                         f"would never see them whole, nor learn to answer; {fix}")
    keep = prompt_budget(context, max_new_tokens)
    if prompt["p50"] > keep:
        raise ValueError(f"{what} leaves a prompt {keep} tokens when {max_new_tokens} are generated "
                         f"({setting}): most of {name}'s prompts are longer (median {prompt['p50']} "
                         f"tokens) and would lose their beginning; lower --{setting} to "
                         f"{context - prompt['p50']} at most, or {fix}")
    if total["p95"] > context:
        say(f"note: more than 5% of {name}'s records are longer than {what}: 95% fit in "
            f"{total['p95']} tokens, the longest has {total['max']}; the model never sees those whole")
    if answer["p50"] > max_new_tokens:
        say(f"note: most of {name}'s answers are longer than the {max_new_tokens} tokens generated "
            f"(median {answer['p50']} tokens, with the end of text): their ends are never generated")


def decode_text(enc, tokens):
    """Text of generated tokens, cut before the end-of-text token."""
    tokens = tokens.tolist()
    if enc.eot_token in tokens:
        tokens = tokens[:tokens.index(enc.eot_token)]
    return enc.decode(tokens)
