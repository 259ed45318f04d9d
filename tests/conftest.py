# Shared helpers of the test suite. Run everything with: python -m pytest -q
# The decoding tests also run on a GPU, in float32 with TF32 off: python -m pytest -q --device=cuda
# tests/test_model.py tests/test_jacobi.py tests/test_decoders.py (scripts/gpu_run.sh does). Those
# tests build every input and read every output through the helpers below (make_model,
# random_prompt, random_tokens, tensor), which put tensors on DEVICE, so that they run on any device.
import itertools
import os
import signal
from contextlib import contextmanager

import pytest
import torch

from model import GPT, GPTConfig

DEVICE = torch.device("cpu")  # set by --device


def pytest_addoption(parser):
    parser.addoption("--device", default="cpu", help="where the models of the decoding tests run")


def pytest_configure(config):
    global DEVICE
    DEVICE = torch.device(config.getoption("--device"))
    # One CPU thread: the tests' models are tiny, too small to split across threads, and on a busy
    # 2-core machine two threads wait for each other (measured: the whole suite 3 min instead of 10)
    torch.set_num_threads(1)
    if DEVICE.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # exactness is a float32 promise
        torch.backends.cudnn.allow_tf32 = False


def make_model(seed=0, vocab_size=50, block_size=64, n_layer=2, n_head=2, n_embd=32, scale=1.0):
    """A tiny random GPT in float32, eval mode, on DEVICE. scale > 1 sharpens its logits (chaotic
    output)."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=block_size, vocab_size=vocab_size, n_layer=n_layer,
                          n_head=n_head, n_embd=n_embd))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(scale)
    return model.to(DEVICE).eval()


def random_prompt(length, seed, vocab_size=50):
    """A random prompt on DEVICE, the same on any device for a seed."""
    return random_tokens((length,), torch.Generator().manual_seed(seed), vocab_size)


def random_tokens(shape, generator, vocab_size=50):
    """Random token ids of a shape on DEVICE, drawn on the CPU from a torch.Generator: the same ids
    on any device (a GPU's generator would draw others)."""
    return torch.randint(vocab_size, shape, generator=generator).to(DEVICE)


def tensor(data, **kwargs):
    """torch.tensor(data) on DEVICE."""
    return torch.tensor(data, device=DEVICE, **kwargs)


def settings(defaults, **overrides):
    """A script's command line: {**defaults, **overrides} as ["--key=value", ...]."""
    return [f"--{k}={v}" for k, v in {**defaults, **overrides}.items()]


def small_arith(folder, num_train, num_val, num_test):
    """A small arith dataset, made by data/arith/prepare.py in folder/arith: its path."""
    from data.arith.prepare import prepare
    path = str(folder / "arith")
    prepare(settings(dict(name=path, num_train=num_train, num_val=num_val, num_test=num_test)))
    return path


def signal_at_step(monkeypatch, module, step, signum):
    """Send this process signum during optimizer step number `step` (counted from 1) of module's
    loop, as Ctrl-C or a scheduler would: the loop's handler takes it, the step finishes."""
    calls, optimizer_step = [], module.optimizer_step

    def stepping(*args):
        calls.append(1)
        if len(calls) == step:  # (without a handler of the loop's own it would end the tests)
            assert signal.getsignal(signum) not in (signal.SIG_DFL, signal.default_int_handler)
            os.kill(os.getpid(), signum)
        optimizer_step(*args)
    monkeypatch.setattr(module, "optimizer_step", stepping)


@contextmanager
def recorded_forwards(model):
    """The positions (input_pos) of every forward pass of model made inside the block: a count of
    a decoder's forward passes that does not rely on the statistics the decoder keeps itself."""
    calls = []
    hook = model.register_forward_pre_hook(lambda m, args, kwargs: calls.append(kwargs["input_pos"]),
                                           with_kwargs=True)
    try:
        yield calls
    finally:
        hook.remove()


def committed_per_pass(passes, prompt_len, n_tokens):
    """How many tokens each decoding pass committed, read off the positions of the passes alone.
    Every pass after the first starts at the last token committed so far (run again: its cache slot
    was computed from a guess, see jacobi_decode), so pass i committed up to passes[i + 1].start + 1;
    the last one, up to the end of the output."""
    done = [p.start + 1 for p in passes[1:]] + [prompt_len + n_tokens] if passes else []
    return [b - a for a, b in zip([prompt_len] + done, done)]


def passes_per_block(passes):
    """Forward passes per Jacobi block, read off their positions: every pass of a block runs up to
    the block's end, and each block ends further on than the one before."""
    return [len(list(group)) for _, group in itertools.groupby(p.stop for p in passes)]


@pytest.fixture(scope="session")
def tiny():
    return make_model()


@pytest.fixture(scope="session")
def tiny_target(tmp_path_factory):
    """A tiny arith dataset and a (barely) trained tiny target: (dataset path, target out_dir)."""
    import train
    root = tmp_path_factory.mktemp("pipeline")
    data = small_arith(root, 200, 10, 10)
    train.main([f"--dataset={data}", f"--out_dir={root / 'target'}", "--n_layer=1", "--n_head=2",
                "--n_embd=32", "--batch_size=8", "--max_iters=20", "--eval_interval=1000",
                "--eval_iters=1", "--test_prompts=0", "--warmup_iters=2"])
    return data, str(root / "target")


@pytest.fixture(scope="session")
def tiny_cllm(tiny_target, tmp_path_factory):
    """A tiny CLLM distilled from tiny_target: its out_dir."""
    import train_cllm
    data, target = tiny_target
    out = str(tmp_path_factory.mktemp("cllm") / "cllm")
    train_cllm.main([f"--dataset={data}", f"--target_dir={target}", f"--out_dir={out}", "--n=4",
                     "--num_prompts=8", "--traj_max_new_tokens=16", "--batch_size=4", "--max_iters=2",
                     "--val_prompts=2", "--max_new_tokens=16", "--test_prompts=2",
                     "--repeat_limit=1000", "--force"])
    return out
