# The models shipped in pretrained/: small, loadable, tied to the tokenizer that
# data/arith/prepare.py rebuilds, and still exact and fast. A change to model.py or to the arith data
# that breaks them fails here (remake them with bash scripts/make_pretrained.sh).
# Run: python -m pytest -q tests/test_pretrained.py
import json
import os

import pytest
import torch

from common import SHIPPED, fingerprint, load_checkpoint, tokenizer_fingerprint
from data.arith.prepare import prepare
from data.common import generation_length, load_encoding, load_meta, load_records
from extras.decoders import sliding_window_jacobi_decode
from extras.quality import mean_score
from jacobi import greedy_decode, jacobi_decode

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
    """On 20 test prompts: Jacobi and the sliding window give the CLLM's AR tokens, at >= 3 tokens
    per forward; the target answers >= 70% of them right (the models are not stale)."""
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
    assert tokens / jacobi_forwards >= 3 and tokens / window_forwards >= 3
    outputs = [greedy_decode(target, torch.tensor(enc.encode_ordinary(r["prompt"])), max_new, enc.eot_token)
               for r in records]
    assert mean_score("accuracy", records, outputs, enc) >= 0.7
