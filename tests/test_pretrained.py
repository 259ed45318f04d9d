# The models shipped in pretrained/: small, loadable, tied to the tokenizer that
# data/arith/prepare.py rebuilds, and still exact and fast. A change to model.py or to the arith data
# that breaks them fails here (remake them with bash scripts/make_pretrained.sh).
# Run: python -m pytest -q tests/test_pretrained.py
import json
import os
import shlex
from dataclasses import asdict

import pytest
import torch

from common import SHIPPED, fingerprint, load_checkpoint, tokenizer_fingerprint
from data.arith.prepare import prepare
from data.common import generation_length, load_encoding, load_meta, load_records
from extras.decoders import sliding_window_jacobi_decode
from extras.quality import mean_score
from jacobi import greedy_decode, jacobi_decode
from train import TrainConfig
from train_cllm import CLLMConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET, CLLM = (os.path.join(ROOT, SHIPPED[k]) for k in ("out-arith", "out-cllm-arith"))


def manifest(folder):
    with open(os.path.join(folder, "manifest.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def arith(tmp_path_factory):
    """data/arith as data/arith/prepare.py makes it with its defaults, in a folder of its own."""
    path = str(tmp_path_factory.mktemp("shipped") / "arith")
    prepare([f"--name={path}"])
    return path


@pytest.mark.parametrize("folder", [TARGET, CLLM])
def test_shipped_files_are_small_and_load_as_float32(folder):
    path = os.path.join(folder, "ckpt.pt")
    assert os.path.getsize(path) <= 2_000_000
    stored = torch.load(path, weights_only=False)["model"]
    assert {t.dtype for t in stored.values()} == {torch.float16}
    model, checkpoint = load_checkpoint(path)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert manifest(folder)["bytes"] == os.path.getsize(path)
    assert checkpoint["dataset"] == "arith" and checkpoint["kind"] == manifest(folder)["kind"]


def test_prepare_rebuilds_the_tokenizer_the_shipped_models_need(arith):
    """The default arith data has the tokenizer the models were trained with (prepare.py is
    deterministic), and its vocabulary has the models' size."""
    got = tokenizer_fingerprint(arith)
    for folder in (TARGET, CLLM):
        checkpoint = torch.load(os.path.join(folder, "ckpt.pt"), weights_only=False)
        assert checkpoint["tokenizer"] == manifest(folder)["tokenizer_fingerprint"] == got
        assert checkpoint["model_args"]["vocab_size"] == load_meta(arith)["vocab_size"]


def test_the_shipped_cllm_comes_from_the_shipped_target():
    target, _ = load_checkpoint(os.path.join(TARGET, "ckpt.pt"))
    cllm = torch.load(os.path.join(CLLM, "ckpt.pt"), weights_only=False)
    assert cllm["target"] == fingerprint(target.state_dict())
    assert cllm["config"]["target_dir"] == SHIPPED["out-arith"]


def test_the_shipped_cllm_decodes_exactly_and_fast(arith):
    """On 20 test prompts: Jacobi and the sliding window give the CLLM's AR tokens, at >= 4 and
    >= 5 tokens per forward (the manifest: 4.5 and 6.0 on all 500)."""
    enc, records = load_encoding(arith), load_records(arith, "test")[:20]
    target, _ = load_checkpoint(os.path.join(TARGET, "ckpt.pt"))
    cllm, checkpoint = load_checkpoint(os.path.join(CLLM, "ckpt.pt"))
    n, max_new = checkpoint["config"]["n"], generation_length(load_meta(arith), cllm.config.block_size)
    tokens = jacobi_forwards = window_forwards = 0
    for r in records:
        prompt = torch.tensor(enc.encode_ordinary(r["prompt"]))
        greedy = greedy_decode(cllm, prompt, max_new, enc.eot_token)
        out, stats = jacobi_decode(cllm, prompt, max_new, n, enc.eot_token)
        window, wstats = sliding_window_jacobi_decode(cllm, prompt, max_new, n, 2, enc.eot_token)
        assert out.tolist() == greedy.tolist() == window.tolist()
        tokens += len(greedy)
        jacobi_forwards, window_forwards = jacobi_forwards + stats.forwards, window_forwards + wstats.forwards
    assert tokens / jacobi_forwards >= 4 and tokens / window_forwards >= 5


def test_the_shipped_target_has_learned_its_task(arith):
    """The target trained to its plateau answers >= 98% of the first 100 test problems right (the
    manifest: 1.000 on all 500), scored by the dataset's own rule on its greedy outputs."""
    enc, records = load_encoding(arith), load_records(arith, "test")[:100]
    model, _ = load_checkpoint(os.path.join(TARGET, "ckpt.pt"))
    max_new = generation_length(load_meta(arith), model.config.block_size)
    outputs = [greedy_decode(model, torch.tensor(enc.encode_ordinary(r["prompt"])), max_new, enc.eot_token)
               for r in records]
    assert mean_score("accuracy", records, outputs, enc) >= 0.98


# settings whose default 0 means "derive it from the data": a run saves the value it derived
DERIVED = ("block_size", "max_new_tokens", "traj_max_new_tokens")


def differing_defaults(made, command, defaults):
    """{setting: (what made the model, today's default)} for every setting of a shipped model's
    run that is neither given on its command line nor today's default (nor derived from the data
    where the default says so)."""
    given = dict(arg[2:].split("=", 1) for arg in shlex.split(command)[2:])
    today = asdict(defaults)
    differ = {}
    for key in sorted(set(made) | set(today)):
        if key in given:
            assert str(made[key]) == given[key], f"{key}: the run saved {made[key]!r}, the command gives {given[key]}"
        elif not (key in DERIVED and today.get(key) == 0) and made.get(key, "missing") != today.get(key, "missing"):
            differ[key] = [made.get(key, "missing"), today.get(key, "missing")]
    return differ


@pytest.mark.parametrize("folder, defaults", [(TARGET, TrainConfig()), (CLLM, CLLMConfig())])
def test_the_manifest_holds_the_command_and_todays_defaults(folder, defaults):
    """The manifest's last command, run with today's defaults, has every setting that made the
    shipped model; a default changed since fails here until the model is remade (bash
    scripts/make_pretrained.sh) or the manifest lists it under defaults_differ."""
    m = manifest(folder)
    command = m["made_by"].split("&&")[-1].strip()
    assert command.startswith(("python train.py", "python train_cllm.py"))
    assert differing_defaults(m["settings"], command, defaults) == m.get("defaults_differ", {})


def test_a_changed_default_is_caught():
    """The check above, on a default changed by hand: it reports the setting and both values."""
    made = asdict(CLLMConfig())
    assert differing_defaults(made, "python train_cllm.py", CLLMConfig()) == {}
    assert differing_defaults(made, "python train_cllm.py", CLLMConfig(ar_weight=1.0)) == {
        "ar_weight": [made["ar_weight"], 1.0]}
    assert differing_defaults(dict(made, n=8), "python train_cllm.py --n=8", CLLMConfig()) == {}
