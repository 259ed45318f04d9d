"""
Extra (a learner may skip it): GPT-2 weights from a local folder in the Hugging Face layout
(config.json and model.safetensors or pytorch_model.bin), without the transformers package.

    python train.py --init_from=gpt2 --gpt2_dir=gpt2 --dataset=<a dataset prepared with --tokenizer=gpt2>

Nothing downloads at run time; on a machine with internet, fetch the files once, e.g.
`huggingface-cli download gpt2 --local-dir gpt2`. model.py keeps GPT-2's parameter names, so the
only work is to map the names and transpose GPT-2's Conv1D weights.
"""

import json
import os

import torch

from model import GPT, GPTConfig


def load_gpt2(path):
    """Load GPT-2 weights from a local directory in the Hugging Face layout.

    The directory holds config.json and model.safetensors (or pytorch_model.bin), e.g. what
    `huggingface-cli download gpt2 --local-dir gpt2` writes on a machine with internet.
    No `transformers` needed: read the config, map the names, transpose GPT-2's Conv1D weights.
    """
    config = GPTConfig(**_read_gpt2_config(path))
    sd = _read_weights(path)
    sd = {k.removeprefix("transformer."): v for k, v in sd.items()}
    sd = {k: v for k, v in sd.items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
    model = GPT(config)
    ours = {k.removeprefix("transformer."): v for k, v in model.state_dict().items()}
    ours.pop("lm_head.weight")  # tied to wte
    sd.pop("lm_head.weight", None)
    missing, unexpected = sorted(set(ours) - set(sd)), sorted(set(sd) - set(ours))
    if missing or unexpected:
        raise ValueError(f"{path}: not a GPT-2 checkpoint: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    with torch.no_grad():
        for k, w in sd.items():
            if k.endswith(conv1d):
                w = w.t()  # GPT-2's Conv1D stores (in, out); nn.Linear wants (out, in)
            if w.shape != ours[k].shape:
                raise ValueError(f"{path}: {k} has shape {tuple(w.shape)}, "
                                 f"expected {tuple(ours[k].shape)}")
            ours[k].copy_(w.float())
    return model


# ----------------------------------------------------------------------------------------------
# reading a Hugging Face GPT-2 directory without the transformers package

def _read_gpt2_config(path):
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{path}: no config.json. Expected a Hugging Face GPT-2 directory "
                                "(config.json + model.safetensors or pytorch_model.bin); see README")
    try:
        with open(cfg_path) as f:
            hf = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path}: not valid JSON ({e})") from None
    arch = hf.get("model_type")
    if arch != "gpt2":
        raise ValueError(f"{cfg_path}: model_type is {arch!r}; only GPT-2 ('gpt2') is supported")
    try:
        return dict(block_size=hf.get("n_positions", hf.get("n_ctx")), vocab_size=hf["vocab_size"],
                    n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"])
    except KeyError as e:
        raise ValueError(f"{cfg_path}: missing key {e}") from None


_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "F64": torch.float64}


def _read_weights(path):
    st, pt = os.path.join(path, "model.safetensors"), os.path.join(path, "pytorch_model.bin")
    if os.path.isfile(st):
        return _read_safetensors(st)
    if os.path.isfile(pt):
        return torch.load(pt, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{path}: neither model.safetensors nor pytorch_model.bin found")


def _read_safetensors(file):
    """The safetensors format: 8-byte little-endian header size, a JSON header, raw tensor bytes."""
    with open(file, "rb") as f:
        data = f.read()
    try:
        n = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + n])
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{file}: not a safetensors file ({e})") from None
    body = memoryview(data)[8 + n:]
    sd = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _SAFETENSORS_DTYPES:
            raise ValueError(f"{file}: {name} has unsupported dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        t = torch.frombuffer(bytearray(body[begin:end]), dtype=_SAFETENSORS_DTYPES[info["dtype"]])
        sd[name] = t.reshape(info["shape"])
    return sd

