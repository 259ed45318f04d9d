# The device check, on a CPU: the model, its KV cache, the training losses and a training step run
# on a fake accelerator, so that a tensor left on the CPU fails here, not at the first step of a
# GPU run. Also: the training precision setting (common.setup_device).
# Run: python -m pytest -q tests/test_device.py
#
# How: FakeTensorMode (torch._subclasses.fake_tensor) makes tensors that have a device, a shape and
# a dtype but no data, and an op on tensors of two devices raises, as it does on a GPU (a CPU
# scalar, a 0-dim tensor, may meet any device there too). The fake device is "lazy" rather than
# "cuda": on a CPU-only torch (this one) a fake CUDA tensor can be made, but not indexed, read or
# given a gradient, and nn.Linear cannot initialise one (the build has no CUDA device guard and no
# CUDA generator); the rule "one op, one device" is the same for any device that is not the CPU.
# A fake tensor has no value to read: where the code reads one (int(), bool(), .item(), each a
# wait for the device on a GPU) the test answers it (Reads). So a loop that decides what to do
# from the values it reads, as jacobi_decode's acceptance does, cannot run here: the decoding
# tests run on a real GPU (pytest --device=cuda, scripts/gpu_run.sh), and here only the model
# calls that decoding makes.
from contextlib import nullcontext

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.overrides import TorchFunctionMode

import train
import train_cllm
from common import optimizer_step, setup_device
from extras.quality import answer_loss
from jacobi import jacobi_decode
from model import GPT, GPTConfig, pack

FAKE = torch.device("lazy", 0)  # the fake accelerator (with an index, as a GPU tensor has)
CONFIG = GPTConfig(block_size=64, vocab_size=50, n_layer=2, n_head=2, n_embd=32)


class Reads(TorchFunctionMode):
    """Answers the reads of tensor values (int(), bool(), .item()) inside the block from a list, in
    order, and checks that the code made exactly those reads: fake tensors hold no values."""
    READS = (torch.Tensor.__int__, torch.Tensor.__index__, torch.Tensor.__bool__,
             torch.Tensor.__float__, torch.Tensor.item)

    def __init__(self, *answers):
        super().__init__()
        self.answers = list(answers)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.READS:
            assert self.answers, f"an unexpected read of a tensor's value ({func.__name__})"
            return self.answers.pop(0)
        return func(*args, **(kwargs or {}))

    def __exit__(self, *exc):
        super().__exit__(*exc)
        assert exc[0] is not None or not self.answers, f"reads that never came: {self.answers}"


@pytest.fixture
def fake():
    """Inside the test, every new tensor is fake; real tensors made before (the CPU data a loop
    starts from) are taken in as fake CPU tensors."""
    with FakeTensorMode(allow_non_fake_inputs=True):
        yield


def fake_model(train_mode=False):
    """A tiny GPT built on the fake device (built there, not moved: .to() inside FakeTensorMode
    swaps every parameter for a fake one, and the tied embedding and lm_head come out as two)."""
    with torch.device(FAKE):
        model = GPT(CONFIG)
    return model.train(train_mode)


def on_device(*tensors):
    return [t.to(FAKE) for t in tensors]


def test_the_check_catches_a_cpu_tensor_meeting_the_device(fake):
    model = fake_model()
    assert model.lm_head.weight.device == FAKE
    with pytest.raises(RuntimeError, match="found at least two devices"):
        model(torch.zeros(1, 5, dtype=torch.long))  # tokens left on the CPU
    with pytest.raises(ValueError, match="the prompt is on cpu but the model on lazy:0"):
        jacobi_decode(model, torch.zeros(5, dtype=torch.long), 8, n=4)  # the decoders' own check


def test_plain_forward_and_loss(fake):
    model = fake_model()
    idx, targets = on_device(torch.zeros(2, 12, dtype=torch.long), torch.zeros(2, 12, dtype=torch.long))
    logits, loss = model(idx, targets)
    assert logits.device == loss.device == FAKE and logits.shape == (2, 12, CONFIG.vocab_size)


def test_packed_row(fake):
    """model.pack builds a row on the CPU; moved to the device, it runs with explicit positions
    and a mask. The forward reads one value: the last position (is it inside the context?)."""
    segments = [(torch.arange(10), 0, 0), (torch.arange(4), 6, 6), (torch.arange(3), 8, 8)]
    tokens, positions, attn, _ = pack(segments)
    model = fake_model()
    tokens, positions, attn = on_device(tokens, positions, attn)
    with Reads(10):
        logits, _ = model(tokens[None], input_pos=positions, attn_mask=attn)
    assert logits.device == FAKE


def test_cached_decoding_steps(fake):
    """The model calls of greedy and Jacobi decoding (a prefill, one-token steps, a block run
    again at the same offset) and of batched collection (a position per row, finished rows
    dropped): the cache is made on the model's device and every call stays there."""
    model = fake_model()
    cache = model.make_cache()
    assert cache.k[0].device == FAKE
    prompt, block = on_device(torch.zeros(1, 12, dtype=torch.long), torch.zeros(1, 5, dtype=torch.long))
    logits, _ = model(prompt, input_pos=range(12), cache=cache)
    token = logits[0, -1].argmax()
    logits, _ = model(token.view(1, 1), input_pos=range(12, 13), cache=cache)
    for _ in range(2):  # a block of guesses, then the same slots again
        logits, _ = model(block, input_pos=range(12, 17), cache=cache)
    assert logits.device == FAKE
    rows = model.make_cache(batch_size=3)
    model(torch.zeros(3, 8, dtype=torch.long).to(FAKE), input_pos=range(8), cache=rows)
    pos = torch.stack([torch.arange(p, p + 4) for p in (5, 8, 6)]).to(FAKE)  # (B, T)
    with Reads(11):  # the last position
        logits, _ = model(torch.zeros(3, 4, dtype=torch.long).to(FAKE), input_pos=pos, cache=rows)
    rows.keep_rows(torch.tensor([2, 0]).to(FAKE))
    assert logits.device == rows.k[0].device == FAKE and rows.k[0].size(0) == 2


def record():
    """A trajectory record as train_cllm.py loads it from trajectories.pt (CPU tensors): a prompt,
    its answer, and two blocks of Jacobi states."""
    return dict(prompt=torch.tensor([1, 2, 3, 4]), answer=torch.tensor([5, 6, 7, 8, 9]),
                states=[torch.tensor([[9, 9, 9, 9], [5, 9, 9, 9], [5, 6, 7, 9], [5, 6, 7, 8]],
                                     dtype=torch.int32),
                        torch.tensor([[3, 3], [9, 0]], dtype=torch.int32)])


@pytest.mark.parametrize("consistency,ar_target", [("global", "ground_truth"), ("local", "fixed_point")])
def test_a_distillation_step(consistency, ar_target):
    """train_cllm.py's step: rows packed on the CPU, collated onto the device, the packed loss
    (reads: the last position, and whether any AR label is set), backward, clipping, AdamW."""
    cfg = train_cllm.CLLMConfig(consistency=consistency, ar_target=ar_target)
    g = torch.Generator().manual_seed(0)
    records = [record(), record()]
    rows = [train_cllm.pack_row(r, c, cfg, CONFIG.block_size)  # real CPU tensors, as in the loop
            for r, c in zip(records, train_cllm.choose_states(records, cfg, g))]
    last = max(int(r.positions.max()) for r in rows)
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = fake_model(train_mode=True)
        optimizer = model.configure_optimizers(0.0, 1e-3, FAKE.type)
        batch = train_cllm.collate(rows, FAKE)
        assert all(t.device == FAKE for t in batch)
        with Reads(last, True):
            loss, l_c, l_ar = train_cllm.distillation_loss(model, batch, cfg)
        assert loss.device == l_c.device == l_ar.device == FAKE
        loss.backward()
        assert model.lm_head.weight.grad.device == FAKE
        optimizer_step(model, optimizer, grad_clip=1.0)


def test_a_pretraining_step():
    """train.py's step: windows cut from the token stream (numpy, CPU) onto the device."""
    import numpy as np
    data = np.arange(200, dtype=np.uint16) % CONFIG.vocab_size
    # the loop passes the starts as a CPU tensor, whose values numpy reads: ints here, as fake
    # tensors have no values to read
    starts = train.random_starts(data, 16, 3, torch.Generator().manual_seed(0)).tolist()
    with FakeTensorMode(allow_non_fake_inputs=True):
        x, y = train.get_batch(data, starts, 16, FAKE)
        model = fake_model(train_mode=True)
        optimizer = model.configure_optimizers(0.1, 1e-3, FAKE.type)
        _, loss = model(x, y)
        loss.backward()
        optimizer_step(model, optimizer, grad_clip=1.0)
        assert x.device == y.device == loss.device == FAKE


def test_answer_loss_builds_its_inputs_on_the_device(fake):
    """extras/quality.answer_loss, which every evaluation runs: two reads per record (the loss,
    the count of answer tokens)."""
    class Digits:  # an "encoding" that reads each character as a digit token
        eot_token = 9
        encode_ordinary = staticmethod(lambda text: [int(c) for c in text])
    records = [dict(prompt="1234", answer="56"), dict(prompt="12", answer="345")]
    with Reads(1.0, 3, 2.0, 4):
        loss = answer_loss(fake_model(), Digits, records, max_new_tokens=8, device=FAKE)
    assert loss == (1.0 + 2.0) / (3 + 4)


def test_setup_device_precision():
    """Training precision: nothing changes by default on a CPU; --autocast=bfloat16 runs the
    training steps in the GPU's bf16 autocast on a CPU too (scripts/gpu_run.sh --smoke)."""
    device, ctx = setup_device("cpu")
    assert device.type == "cpu" and isinstance(ctx, nullcontext)
    assert isinstance(setup_device("cpu", "float32")[1], nullcontext)
    _, ctx = setup_device("cpu", "bfloat16")
    with ctx:
        y = torch.nn.functional.linear(torch.randn(2, 3), torch.randn(4, 3))
    assert y.dtype == torch.bfloat16
