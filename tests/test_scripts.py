# Smoke tests of sample.py and bench.py on a tiny CLLM, and of the --show picture.
# Run: python -m pytest -q tests/test_scripts.py
import json

import pytest
import torch

import bench
import sample


def test_token_kinds():
    fixed = torch.tensor([1, 2, 3, 4, 5])
    state = torch.tensor([1, 9, 3, 8, 5])
    later = torch.stack([torch.tensor([1, 2, 3, 7, 5]), fixed])
    # 1 is committed; 9 wrong; 3 right and stays: stationary; 8 wrong; 5 right and stays: stationary
    assert sample.token_kinds(state, fixed, later) == ["committed", "wrong", "stationary", "wrong",
                                                       "stationary"]
    # right now but changed later: not stationary
    later = torch.stack([torch.tensor([1, 2, 0, 4, 5]), fixed])
    assert sample.token_kinds(state, fixed, later)[2] == "wrong"
    assert sample.token_kinds(fixed, fixed, fixed[None]) == ["committed"] * 5


def test_sample_modes(tiny_cllm, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("NO_COLOR", "1")
    sample.main([f"--out_dir={tiny_cllm}", "--num_samples=2", "--max_new_tokens=12"])
    greedy = capsys.readouterr().out
    sample.main([f"--out_dir={tiny_cllm}", "--jacobi", "--n=4", "--num_samples=2", "--max_new_tokens=12"])
    jacobi = capsys.readouterr().out
    # the same prompts and the same generations; only the stats lines differ
    strip = lambda out: [line for line in out.splitlines() if not line.startswith("tokens ")]
    assert strip(greedy) == strip(jacobi) and greedy.count("tokens/forward") == 2
    sample.main([f"--out_dir={tiny_cllm}", "--show", "--n=4", "--num_samples=1", "--max_new_tokens=8"])
    out = capsys.readouterr().out
    assert "--- target: Jacobi decoding" in out and "--- CLLM: Jacobi decoding" in out
    assert "y(0)" in out and "\033[" not in out  # plain markers, no colour codes
    prompt = tmp_path / "p.txt"
    prompt.write_text("Question: Ava has 3 apples. How many apples does Ava have?\nAnswer:\n")
    sample.main([f"--out_dir={tiny_cllm}", "--compare", f"--start=FILE:{prompt}", "--max_new_tokens=12"])
    out = capsys.readouterr().out
    assert "identical outputs; Jacobi speedup" in out and "MISMATCH" not in out


def test_sample_without_a_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="python train_cllm.py"):
        sample.main([f"--out_dir={tmp_path}"])


def test_bench_trained_and_random(tiny_cllm, tmp_path, capsys):
    out = tmp_path / "b.json"
    bench.main([f"--cllm_dir={tiny_cllm}", "--num_prompts=2", "--max_new_tokens=8",
                "--ns=[2, 4]", "--warmup=1", f"--json_out={out}"])
    printed = capsys.readouterr().out
    assert "| CLLM | Jacobi n=4 |" in printed and "| target | AR |" in printed
    results = json.loads(out.read_text())["results"]
    assert results["CLLM"]["Jacobi n=2"]["exact"] == "2/2"
    assert "quality" in results["target"]["AR"] and "answer_loss" in results["target"]["AR"]
    bench.main(["--random", "--num_prompts=2", "--max_new_tokens=6", "--ns=[4]", "--warmup=0",
                f"--json_out={out}"])
    assert "| random | Jacobi n=4 |" in capsys.readouterr().out
