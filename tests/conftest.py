# Shared helpers of the test suite. Run everything with: python -m pytest -q
# The decoding tests also run on a GPU, in float32 with TF32 off: python -m pytest -q --device=cuda
# tests/test_model.py tests/test_jacobi.py tests/test_decoders.py (scripts/gpu_run.sh does).
import pytest
import torch

from model import GPT, GPTConfig

DEVICE = torch.device("cpu")  # set by --device


def pytest_addoption(parser):
    parser.addoption("--device", default="cpu", help="where the models of the decoding tests run")


def pytest_configure(config):
    global DEVICE
    DEVICE = torch.device(config.getoption("--device"))
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
    return torch.randint(vocab_size, (length,), generator=torch.Generator().manual_seed(seed)).to(DEVICE)


@pytest.fixture(scope="session")
def tiny():
    return make_model()


@pytest.fixture(scope="session")
def tiny_target(tmp_path_factory):
    """A tiny arith dataset and a (barely) trained tiny target: (dataset path, target out_dir)."""
    import train
    from data.arith.prepare import prepare
    root = tmp_path_factory.mktemp("pipeline")
    data = str(root / "arith")
    prepare([f"--name={data}", "--num_train=200", "--num_val=10", "--num_test=10"])
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
                     "--repeat_limit=1000"])
    return out
