# Shared helpers of the test suite. Run everything with: python -m pytest -q
import pytest
import torch

from model import GPT, GPTConfig


def make_model(seed=0, vocab_size=50, block_size=64, n_layer=2, n_head=2, n_embd=32, scale=1.0):
    """A tiny random GPT in float32, eval mode. scale > 1 sharpens its logits (chaotic output)."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=block_size, vocab_size=vocab_size, n_layer=n_layer,
                          n_head=n_head, n_embd=n_embd))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(scale)
    return model.eval()


@pytest.fixture(scope="session")
def tiny():
    return make_model()
