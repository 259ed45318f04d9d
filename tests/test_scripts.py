# Smoke tests of sample.py and bench.py on a tiny CLLM, and of the --show picture.
# Run: python -m pytest -q tests/test_scripts.py
import json
import os
import shutil

import pytest
import torch

import bench
import sample


def test_token_kinds():
    fixed = torch.tensor([1, 2, 3, 4, 5])
    state = torch.tensor([1, 2, 9, 4, 8])
    stationary = torch.tensor([False, False, False, True, False])
    # 1 committed; 2 right but not committed yet; 9 wrong; 4 stationary; 8 wrong
    assert sample.token_kinds(state, fixed, 1, stationary) == ["committed", "right", "wrong",
                                                               "stationary", "wrong"]
    assert sample.token_kinds(fixed, fixed, 2, stationary) == ["committed"] * 2 + ["right"] * 3


def test_show_prints_what_the_decoder_committed(capsys):
    """--show on a model whose output ignores its context: block 0 commits 1 token on the first
    pass (its guesses were wrong) and the other 7 on the second, which changes nothing."""
    from test_jacobi import constant_model
    from jacobi import jacobi_decode
    _, stats = jacobi_decode(constant_model(), torch.tensor([1, 2, 4, 5]), 8, n=8)

    class Digits:  # an "encoding" that writes token t as the digit t
        decode = staticmethod(lambda ts: "".join(map(str, ts)))
    sample.show_trajectory(Digits, stats, colour=False)
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "block 0: 2 forward passes for 8 tokens, committing 1 + 7"
    assert out[2] == "  y(1) 3{3333333}  (1/8 committed)"
    assert out[3].startswith("  pass 2 changes nothing: it confirms the fixed point and commits the last 7")


def test_sample_modes(tiny_cllm, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("NO_COLOR", "1")
    sample.main([f"--model_dir={tiny_cllm}", "--num_samples=2", "--max_new_tokens=12"])
    greedy = capsys.readouterr().out
    sample.main([f"--model_dir={tiny_cllm}", "--jacobi", "--n=4", "--num_samples=2", "--max_new_tokens=12"])
    jacobi = capsys.readouterr().out
    # the same prompts and the same generations; only the stats lines differ
    strip = lambda out: [line for line in out.splitlines() if not line.startswith("tokens ")]
    assert strip(greedy) == strip(jacobi) and greedy.count("tokens/forward") == 2
    sample.main([f"--model_dir={tiny_cllm}", "--show", "--num_samples=1", "--max_new_tokens=8"])
    out = capsys.readouterr().out  # (no --n: the n the CLLM was trained and chosen with, 4)
    assert "--- target: Jacobi decoding, n=4 ---" in out and "--- CLLM" in out
    kept = torch.load(os.path.join(tiny_cllm, "ckpt.pt"), weights_only=False)["iter_num"]
    assert ("the target itself (the guard kept no distilled checkpoint" in out) == (kept == 0)
    assert "y(0)" in out and "\033[" not in out  # plain markers, no colour codes
    prompt = tmp_path / "p.txt"
    prompt.write_text("Question: Ava has 3 apples. How many apples does Ava have?\nAnswer:\n")
    sample.main([f"--model_dir={tiny_cllm}", "--compare", f"--start=FILE:{prompt}", "--max_new_tokens=12"])
    out = capsys.readouterr().out
    assert "identical outputs; Jacobi speedup" in out and "MISMATCH" not in out


def test_sample_without_a_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="python train_cllm.py"):
        sample.main([f"--model_dir={tmp_path}"])


def test_bench_trained_and_random(tiny_cllm, tmp_path, capsys):
    out = tmp_path / "b.json"
    bench.main([f"--model_dir={tiny_cllm}", "--test_prompts=2", "--max_new_tokens=8",
                "--ns=[2, 4]", "--warmup=1", f"--json_out={out}"])
    printed = capsys.readouterr().out
    assert "| CLLM | Jacobi n=4 |" in printed and "| target | AR |" in printed
    results = json.loads(out.read_text())["results"]
    assert results["CLLM"]["Jacobi n=2"]["exact"] == "2/2"
    assert "quality" in results["target"]["AR"] and "answer_loss" in results["target"]["AR"]
    bench.main(["--random", "--test_prompts=2", "--max_new_tokens=6", "--ns=[4]", "--warmup=0",
                f"--json_out={out}"])
    assert "| random | Jacobi n=4 |" in capsys.readouterr().out


def test_bench_compares_cllms_of_one_target_with_jacobi_forcings_decoders(tiny_target, tiny_cllm, tmp_path,
                                                                          capsys):
    """--compare_dirs puts more CLLMs of the same target in the table (named by their folder),
    --multiblock adds Jacobi Forcing's decoders at every n; a model of another target is refused."""
    data, target = tiny_target
    other = str(tmp_path / "other")
    shutil.copytree(tiny_cllm, other)
    out = tmp_path / "b.json"
    bench.main([f"--model_dir={tiny_cllm}", f"--compare_dirs=['{other}']", "--multiblock", "--ns=[2, 4]",
                "--test_prompts=2", "--max_new_tokens=8", "--warmup=0", f"--json_out={out}"])
    printed = capsys.readouterr().out
    assert "| other | multi-block n=2 |" in printed and "| CLLM | multi-block + recycling n=4 |" in printed
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"target", "CLLM", "other"}
    assert all(row["exact"] == "2/2" for m in results.values() for k, row in m.items() if k != "AR")
    with pytest.raises(ValueError, match="not distilled from the target"):
        bench.main([f"--model_dir={tiny_cllm}", f"--compare_dirs=['{target}']", f"--json_out={out}"])
    with pytest.raises(ValueError, match="two models named 'other'"):
        bench.main([f"--model_dir={tiny_cllm}", f"--compare_dirs=['{other}', '{other}/']", f"--json_out={out}"])


def test_bench_with_the_ar_only_control(tiny_target, tiny_cllm, tmp_path, capsys):
    """--control_dir adds the AR-only control (the CLLM's run with --states_per_block=0, its
    last.pt) as a model of the table; the CLLM is compared with both on the same prompts and judged
    against the control. A folder that holds no control of this CLLM is refused."""
    import train_cllm
    data, target = tiny_target
    control = str(tmp_path / "control")
    train_cllm.main([f"--dataset={data}", f"--target_dir={target}", f"--out_dir={control}", "--n=4",
                     "--num_prompts=8", "--traj_max_new_tokens=16", "--batch_size=4", "--max_iters=2",
                     "--val_prompts=2", "--max_new_tokens=16", "--test_prompts=0",
                     "--repeat_limit=1000", "--force", "--states_per_block=0"])
    capsys.readouterr()
    out = tmp_path / "b.json"
    bench.main([f"--model_dir={tiny_cllm}", f"--control_dir={control}", "--test_prompts=3",
                "--max_new_tokens=8", "--warmup=0", f"--json_out={out}"])
    printed = capsys.readouterr().out
    assert "| control | AR |" in printed
    assert "CLLM vs target, accuracy on the same 3 prompts:" in printed
    assert "CLLM vs control, accuracy on the same 3 prompts:" in printed
    pairs = json.loads(out.read_text())["results"]["CLLM"]["AR"]["paired"]
    assert set(pairs) == {"target", "control"} and pairs["control"]["prompts"] == 3
    with pytest.raises(ValueError, match="is not an AR-only control"):
        bench.main([f"--model_dir={tiny_cllm}", f"--control_dir={tiny_cllm}", "--test_prompts=1",
                    f"--json_out={out}"])


def test_gpu_run_script_smoke(tmp_path):
    """scripts/gpu_run.sh --smoke: the GPU run's every step, with its settings (bf16 autocast in
    training, the bf16 table; torch.compile is checked by tests/test_model.py), at toy sizes on the
    CPU, so that the script cannot rot while no GPU runs it. Then twice more in the same folder: after a success
    it skips every step; after a distillation that did not finish it resumes it from its last.pt
    and makes the tables again."""
    import subprocess
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "run"

    def run():
        done = subprocess.run(["bash", os.path.join(root, "scripts", "gpu_run.sh"), "--smoke", str(out)],
                              cwd=root, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return done.stdout

    steps = ("tests", "data", "target", "cllm", "bench_float32", "bench_bfloat16")
    log = run()
    for step in steps:
        assert f"=== {step}: estimate " in log and f"=== {step}: ok, " in log, step
    assert "config/train_arith_gpu.py --autocast=bfloat16" in log  # the GPU's settings
    assert " passed" in log and "=== tests: ok" in log  # the tests' summary
    assert "step 20: train loss" in log  # the target's curve, as it came
    curve = json.loads((out / "cllm_results.json").read_text())["curve"]
    assert [c["iter"] for c in curve] == [0, 2, 4]
    exact = {dtype: json.loads((out / f"bench_{dtype}.json").read_text())["results"]["CLLM"]
             ["Jacobi n=16"]["exact"] for dtype in ("float32", "bfloat16")}
    assert exact["float32"] == "4/4" and exact["bfloat16"].endswith("/4")  # (bf16: not guaranteed)
    assert (out / "log.txt").read_text().count("=== target: ok") == 1

    log = run()  # after a success: nothing to do
    assert all(f"=== {step}: skipped" in log for step in steps) and ": estimate " not in log

    (out / "done" / "cllm").unlink()  # as if the distillation had been killed after its last.pt
    log = run()
    assert "=== target: skipped" in log and "--init_from=resume" in log and "=== cllm: ok" in log
    assert "=== bench_float32: ok" in log and "=== bench_bfloat16: ok" in log  # made from it again
    assert (out / "log.txt").read_text().count("=== cllm: ok") == 2  # every attempt's lines kept


def test_plot_curves_draws_one_line_per_run_and_measure(tmp_path):
    """Two runs' results.json -> an SVG that parses, with a solid and a dashed (sliding window)
    tokens/forward line and a quality line per run, and both runs in the legend."""
    import importlib.util
    import xml.etree.ElementTree as ET
    spec = importlib.util.spec_from_file_location("plot_curves", "scripts/plot_curves.py")
    plot_curves = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plot_curves)
    paths = []
    for recipe, lr in (("cllm", 1e-3), ("jacobi_forcing", 2e-3)):
        curve = [dict(iter=i, train_minutes=i / 100, tokens_per_forward=1 + i / 200,
                      window_tokens_per_forward=1 + i / 150, quality=0.8, answer_loss=0.1)
                 for i in (0, 200, 400)]
        path = tmp_path / f"{recipe}.json"
        path.write_text(json.dumps(dict(config=dict(recipe=recipe, learning_rate=lr, ar_weight=3.0),
                                        metric="accuracy", curve=curve)))
        paths.append(str(path))
    out = tmp_path / "curves.svg"
    plot_curves.main(paths + [f"--out={out}"])
    root = ET.parse(out).getroot()
    lines = [e for e in root.iter() if e.tag.endswith("polyline")]
    assert len(lines) == 2 * 3
    assert sum(1 for e in lines if e.get("stroke-dasharray") == "5,3") == 2
    texts = " ".join(e.text or "" for e in root.iter() if e.tag.endswith("text"))
    assert "cllm, lr 0.001, ar_weight 3" in texts and "jacobi_forcing, lr 0.002, ar_weight 3" in texts


def test_a_prompt_unlike_the_data_gets_a_note(tiny_cllm, capsys):
    """A question in the user's own words (no 'Question: ', no 'Answer:' line) gets a note that
    shows a prompt that works; a prompt in the data's format, with \\n typed as two characters,
    gets none."""
    sample.main([f"--model_dir={tiny_cllm}", "--max_new_tokens=4",
                 "--start=Tom has 3 apples and buys 5 more. How many apples does Tom have?"])
    out = capsys.readouterr().out
    assert "note: every prompt of the data starts with 'Question: ' and ends with '?\\nAnswer:\\n'" in out
    assert "A prompt that works:\nQuestion: " in out
    sample.main([f"--model_dir={tiny_cllm}", "--max_new_tokens=4",
                 "--start=Question: Ava has 3 apples. How many apples does Ava have?\\nAnswer:\\n"])
    out = capsys.readouterr().out
    assert "note: every prompt" not in out and "Ava have?\nAnswer:\n" in out


def test_default_folders_fall_back_to_the_shipped_models(tmp_path, monkeypatch):
    from common import SHIPPED, find_checkpoint
    monkeypatch.chdir(tmp_path)  # no out-cllm-arith here: the shipped CLLM
    assert find_checkpoint("out-cllm-arith") == os.path.join(SHIPPED["out-cllm-arith"], "ckpt.pt")
    (tmp_path / "out-cllm-arith").mkdir()
    (tmp_path / "out-cllm-arith" / "ckpt.pt").write_bytes(b"")  # a run of one's own wins
    assert find_checkpoint("out-cllm-arith") == os.path.join("out-cllm-arith", "ckpt.pt")
    assert find_checkpoint("elsewhere") == os.path.join("elsewhere", "ckpt.pt")


def test_the_readme_shows_what_sample_show_prints(capsys, monkeypatch):
    """The README's first screen: every line of its `python sample.py --show` block but the marked
    cuts ("(...") is a line that the command prints today, in the same order (NO_COLOR: markers)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    monkeypatch.chdir(root)  # (the shipped models' paths are relative to the repository)
    monkeypatch.setenv("NO_COLOR", "1")
    readme = open("README.md", encoding="utf-8").read()
    block = "loaded pretrained/arith-cllm" + readme.split("```\nloaded pretrained/arith-cllm")[1].split("```")[0]
    shown = [line for line in block.splitlines() if not line.startswith("(...")]
    sample.main(["--show", "--model_dir=pretrained/arith-cllm"])
    printed = capsys.readouterr().out.splitlines()
    rest = iter(printed)  # each README line found after the one before it
    missing = [line for line in shown if not any(line == p for p in rest)]
    assert len(shown) > 20 and not missing, missing
