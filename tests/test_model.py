# Tests of model.py: the KV cache, packed rows, the loss, GPT-2 loading.
# Run: python -m pytest -q tests/test_model.py   (on a GPU too: add --device=cuda; every input is
# built with conftest's helpers, on DEVICE, and the tiny model lives there)
import json

import pytest
import torch

from conftest import DEVICE, make_model, random_tokens, tensor
from extras.gpt2 import load_gpt2

ATOL = 1e-5


def test_cached_prefill_then_steps_equal_uncached(tiny):
    idx = random_tokens((1, 30), torch.Generator().manual_seed(1))
    full, _ = tiny(idx)  # (1, 30, V) plain causal forward
    cache = tiny.make_cache()
    logits, _ = tiny(idx[:, :12], input_pos=range(12), cache=cache)  # prefill
    steps = [logits]
    for t in range(12, 30):  # then one token per forward
        logits, _ = tiny(idx[:, t:t + 1], input_pos=range(t, t + 1), cache=cache)
        steps.append(logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=ATOL, rtol=0)


def test_block_at_offset_rerun_over_scratch_slots(tiny):
    """A block re-run at the same positions with other guesses: scratch slots get overwritten and
    the committed prefix is unaffected, so every run equals the uncached forward of its sequence."""
    g = torch.Generator().manual_seed(2)
    prefix = random_tokens((1, 20), g)
    cache = tiny.make_cache()
    tiny(prefix, input_pos=range(20), cache=cache)
    committed_k = cache.k[0][:, :, :20].clone()
    for _ in range(4):
        block = random_tokens((1, 7), g)
        logits, _ = tiny(block, input_pos=range(20, 27), cache=cache)
        full, _ = tiny(torch.cat([prefix, block], dim=1))
        torch.testing.assert_close(logits, full[:, 20:], atol=ATOL, rtol=0)
        assert torch.equal(cache.k[0][:, :, :20], committed_k)


def test_shorter_block_ignores_stale_slots_after_it(tiny):
    """After a 7-token block, a 3-token block at the same offset must not see slots 23..26."""
    g = torch.Generator().manual_seed(3)
    seq = random_tokens((1, 27), g)
    cache = tiny.make_cache()
    tiny(seq, input_pos=range(27), cache=cache)
    short = random_tokens((1, 3), g)
    logits, _ = tiny(short, input_pos=range(20, 23), cache=cache)
    full, _ = tiny(torch.cat([seq[:, :20], short], dim=1))
    torch.testing.assert_close(logits, full[:, 20:], atol=ATOL, rtol=0)


def test_explicit_positions_and_causal_mask_equal_plain_forward(tiny):
    idx = random_tokens((2, 16), torch.Generator().manual_seed(4))
    plain, _ = tiny(idx)
    causal = torch.ones(16, 16, dtype=torch.bool, device=DEVICE).tril()
    masked, _ = tiny(idx, input_pos=torch.arange(16, device=DEVICE), attn_mask=causal)
    torch.testing.assert_close(masked, plain, atol=ATOL, rtol=0)


def test_packed_row_with_shared_prefix_equals_separate_forwards(tiny):
    """Row [prefix, a, b] where a and b both continue the prefix (same positions): one forward
    with a mask gives the logits of the two separate sequences."""
    g = torch.Generator().manual_seed(5)
    prefix, a, b = (random_tokens((k,), g) for k in (10, 5, 5))
    row = torch.cat([prefix, a, b])[None]
    pos = torch.cat([torch.arange(15), torch.arange(10, 15)]).to(DEVICE)
    mask = torch.zeros(20, 20, dtype=torch.bool)
    mask[:15, :15] = torch.ones(15, 15, dtype=torch.bool).tril()  # prefix + a, causal
    mask[15:, :10] = True                                          # b sees the prefix ...
    mask[15:, 15:] = torch.ones(5, 5, dtype=torch.bool).tril()     # ... and itself, not a
    packed, _ = tiny(row, input_pos=pos, attn_mask=mask[None].to(DEVICE))
    sep_a, _ = tiny(torch.cat([prefix, a])[None])
    sep_b, _ = tiny(torch.cat([prefix, b])[None])
    torch.testing.assert_close(packed[:, :15], sep_a, atol=ATOL, rtol=0)
    torch.testing.assert_close(packed[:, 15:], sep_b[:, 10:], atol=ATOL, rtol=0)


def test_loss_ignores_padding_targets(tiny):
    idx = random_tokens((1, 8), torch.Generator().manual_seed(6))
    targets = idx.roll(-1, dims=1)
    targets[0, 5:] = -1
    logits, loss = tiny(idx, targets)
    expected = torch.nn.functional.cross_entropy(logits[0, :5], targets[0, :5])
    torch.testing.assert_close(loss, expected)


def test_the_compiled_model_trains_as_the_eager_one():
    """train.py --compile=True, the GPU run's setting: torch.compile traces the training forward
    and backward in one graph each (fullgraph) and gives the eager model's loss, gradients and
    logits. The aot_eager backend runs the traced graphs with eager kernels, so this checks the
    tracing (dynamo and autograd), which every backend shares, without inductor's C++ build, ~30 s
    on a CPU for kernels a GPU would not use (it builds Triton ones)."""
    torch._dynamo.reset()
    model = make_model(seed=3).train()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    g = torch.Generator().manual_seed(2)
    x, y = random_tokens((3, 20), g), random_tokens((3, 20), g)
    losses, grads = [], []
    for m in (model, compiled):
        _, loss = m(x, y)
        loss.backward()
        losses.append(loss.detach())
        grads.append([p.grad.clone() for p in model.parameters()])
        model.zero_grad()
    torch.testing.assert_close(losses[1], losses[0], atol=ATOL, rtol=0)
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, atol=ATOL, rtol=1e-4)
    with torch.no_grad():  # an eval-mode forward without gradients
        torch.testing.assert_close(compiled.eval()(x)[0], model(x)[0], atol=ATOL, rtol=0)


def test_cache_without_positions_is_refused(tiny):
    with pytest.raises(AssertionError, match="input_pos"):
        tiny(torch.zeros(1, 3, dtype=torch.long, device=DEVICE), cache=tiny.make_cache())


def test_cache_with_a_position_per_row(tiny):
    """Rows of different lengths in one cache: right-padded prefill, then a block per row at
    that row's own offset; each row equals its own uncached forward."""
    g = torch.Generator().manual_seed(10)
    lengths = [5, 12, 9]
    prompts = [random_tokens((L,), g) for L in lengths]
    padded = torch.stack([torch.cat([p, p.new_zeros(12 - len(p))]) for p in prompts])
    cache = tiny.make_cache(batch_size=3)
    tiny(padded, input_pos=range(12), cache=cache)
    blocks = random_tokens((3, 4), g)
    pos = torch.stack([torch.arange(L, L + 4) for L in lengths]).to(DEVICE)  # (B, T)
    logits, _ = tiny(blocks, input_pos=pos, cache=cache)
    for r in range(3):
        full, _ = tiny(torch.cat([prompts[r], blocks[r]])[None])
        torch.testing.assert_close(logits[r], full[0, lengths[r]:], atol=ATOL, rtol=0)
    before = [k.clone() for k in cache.k]
    cache.keep_rows(tensor([2, 0]))
    for layer, k in enumerate(cache.k):
        assert torch.equal(k, before[layer][[2, 0]])


# ----------------------------------------------------------------------------------------------
# extras/gpt2.load_gpt2: checkpoints in the Hugging Face GPT-2 layout, written here by hand
#
# GPT-2's linear layers are Conv1D: y = x @ W + b with W stored (in, out), where nn.Linear stores
# (out, in). The shapes Hugging Face documents (GPT2Attention, GPT2MLP), for width C:
#     attn.c_attn (C, 3C)    attn.c_proj (C, C)    mlp.c_fc (C, 4C)    mlp.c_proj (4C, C)
# attn.c_proj is square, so its shape cannot tell a loader that forgot to transpose it: the tests
# below check what the loaded layers compute, not only their shapes.

def gpt2_shapes(config):
    """Every tensor of a GPT-2 checkpoint and its shape, as Hugging Face documents them."""
    C = config.n_embd
    shapes = {"wte.weight": (config.vocab_size, C), "wpe.weight": (config.block_size, C),
              "ln_f.weight": (C,), "ln_f.bias": (C,)}
    for i in range(config.n_layer):
        for name, shape in [("ln_1.weight", (C,)), ("ln_1.bias", (C,)), ("ln_2.weight", (C,)),
                            ("ln_2.bias", (C,)), ("attn.c_attn.weight", (C, 3 * C)),
                            ("attn.c_attn.bias", (3 * C,)), ("attn.c_proj.weight", (C, C)),
                            ("attn.c_proj.bias", (C,)), ("mlp.c_fc.weight", (C, 4 * C)),
                            ("mlp.c_fc.bias", (4 * C,)), ("mlp.c_proj.weight", (4 * C, C)),
                            ("mlp.c_proj.bias", (C,))]:
            shapes[f"h.{i}.{name}"] = shape
    return shapes


CONV1D_LAYERS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")  # GPT-2's, documented


def hf_state_dict(model, prefix="transformer."):
    """Our weights under Hugging Face GPT-2 names and layout, on the CPU. A Conv1D weight is the
    matrix W with x @ W == layer(x) - bias: read off our nn.Linear by applying it to the identity,
    not from a list of names to transpose (extras/gpt2.py has one; a shared mistake would hide)."""
    sd = {k.removeprefix("transformer."): v.detach().cpu().clone()
          for k, v in model.state_dict().items() if k != "lm_head.weight"}
    for name, layer in model.transformer.named_modules():
        if isinstance(layer, torch.nn.Linear):
            eye = torch.eye(layer.in_features, device=layer.weight.device)
            sd[f"{name}.weight"] = torch.nn.functional.linear(eye, layer.weight).detach().cpu()
    assert {k: tuple(v.shape) for k, v in sd.items()} == gpt2_shapes(model.config)
    sd = {prefix + k: v for k, v in sd.items()}
    for i in range(model.config.n_layer):  # HF keeps its causal-mask buffers in the checkpoint
        sd[f"{prefix}h.{i}.attn.bias"] = torch.ones(1, 1, 4, 4).tril()
    return sd


def write_safetensors(path, sd):
    header, chunks, offset = {}, [], 0
    for name, t in sd.items():
        data = t.detach().cpu().contiguous().numpy().tobytes()
        header[name] = {"dtype": "F32", "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw + b"".join(chunks))


def write_hf_config(path, config):
    (path / "config.json").write_text(json.dumps(dict(
        model_type="gpt2", architectures=["GPT2LMHeadModel"], n_positions=config.block_size,
        vocab_size=config.vocab_size, n_layer=config.n_layer, n_head=config.n_head,
        n_embd=config.n_embd)))


def write_hf_dir(path, model, fmt="safetensors", prefix="transformer."):
    write_hf_config(path, model.config)
    sd = hf_state_dict(model, prefix)
    if fmt == "safetensors":
        write_safetensors(path / "model.safetensors", sd)
    else:
        torch.save(sd, path / "pytorch_model.bin")


@pytest.mark.parametrize("fmt,prefix", [("safetensors", "transformer."), ("safetensors", ""),
                                        ("bin", "transformer.")])
def test_load_gpt2_round_trip(tmp_path, fmt, prefix):
    model = make_model(seed=7, n_embd=48, n_head=3)
    write_hf_dir(tmp_path, model, fmt, prefix)
    loaded = load_gpt2(str(tmp_path)).to(DEVICE).eval()
    assert loaded.config == model.config
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    idx = random_tokens((1, 12), torch.Generator().manual_seed(8))
    assert torch.equal(loaded(idx)[0], model(idx)[0])


def test_load_gpt2_layers_compute_what_gpt2s_conv1d_computes(tmp_path):
    """A checkpoint of random weights in GPT-2's documented shapes, made without our model: every
    loaded layer computes x @ W + b of the Conv1D it came from (a loader that forgot to transpose
    the square attn.c_proj would load it with the right shape and compute x @ W.T + b)."""
    model = make_model(seed=7, n_embd=48, n_head=3)  # only for its config
    g = torch.Generator().manual_seed(11)
    sd = {"transformer." + k: torch.randn(shape, generator=g)
          for k, shape in gpt2_shapes(model.config).items()}
    write_hf_config(tmp_path, model.config)
    write_safetensors(tmp_path / "model.safetensors", sd)
    loaded = load_gpt2(str(tmp_path)).to(DEVICE)
    x = torch.randn(5, 4 * 48, generator=g)
    for i, block in enumerate(loaded.transformer.h):
        for name in CONV1D_LAYERS:
            layer = block.get_submodule(name)
            W, b = sd[f"transformer.h.{i}.{name}.weight"], sd[f"transformer.h.{i}.{name}.bias"]
            inputs = x[:, :W.size(0)]
            expected = inputs @ W + b  # GPT-2's Conv1D
            got = layer(inputs.to(DEVICE)).cpu()
            torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4, msg=f"h.{i}.{name}")
    assert torch.equal(loaded.transformer.wte.weight.cpu(), sd["transformer.wte.weight"])
    assert torch.equal(loaded.lm_head.weight.cpu(), sd["transformer.wte.weight"])  # tied


def test_load_gpt2_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_gpt2(str(tmp_path / "nowhere"))
    model = make_model(seed=9)
    write_hf_dir(tmp_path, model)
    cfg = json.loads((tmp_path / "config.json").read_text())

    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_gpt2(str(tmp_path))

    (tmp_path / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    with pytest.raises(ValueError, match="only GPT-2"):
        load_gpt2(str(tmp_path))

    (tmp_path / "config.json").write_text(json.dumps({**cfg, "n_embd": 64}))
    with pytest.raises(ValueError, match="has shape"):
        load_gpt2(str(tmp_path))

    (tmp_path / "config.json").write_text(json.dumps(cfg))
    sd = hf_state_dict(model)
    del sd["transformer.h.1.mlp.c_fc.weight"]
    write_safetensors(tmp_path / "model.safetensors", sd)
    with pytest.raises(ValueError, match="missing.*h.1.mlp.c_fc.weight"):
        load_gpt2(str(tmp_path))

    (tmp_path / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match="not a safetensors file"):
        load_gpt2(str(tmp_path))

    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="neither model.safetensors"):
        load_gpt2(str(tmp_path))
