# Bad input gets one clear line that says what to do, before anything expensive runs; nothing
# is lost when a run is killed; progress shows at once also through a pipe.
# Run: python -m pytest -q tests/test_errors.py
import os
import queue
import subprocess
import sys
import threading

import pytest
import torch

import bench
import sample
import train
import train_cllm
from common import load_checkpoint, save_checkpoint, setup_device
from extras import trajectories
from data.custom.prepare import prepare as prepare_custom
from test_cllm import cllm_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("main,args,match", [
    (sample.main, ["--n=0"], "n must be at least 1, got 0"),
    (sample.main, ["--n=-3"], "n must be at least 1"),
    (sample.main, ["--max_new_tokens=-1"], "max_new_tokens must be at least 0"),
    (bench.main, ["--ns=[16, 0]"], "ns must be at least 1"),
    (bench.main, ["--dtype=float16"], "dtype must be one of 'float32', 'bfloat16'"),
    (train_cllm.main, ["--n=0"], "n must be at least 1"),
    (train_cllm.main, ["--recipe=jf"], "recipe must be one of 'cllm', 'jacobi_forcing'"),
    (train_cllm.main, ["--batch_size=0"], "batch_size must be at least 1"),
    (train.main, ["--init_from=nothing"], "init_from must be one of 'scratch', 'resume', 'gpt2'"),
    (train.main, ["--max_iter=3"], "unknown setting 'max_iter'"),
])
def test_bad_settings_are_refused_before_any_work(main, args, match, tmp_path):
    # out_dir/cllm_dir point at nothing: the settings are checked before a file is read
    where = {sample.main: "--out_dir", bench.main: "--cllm_dir"}.get(main, "--out_dir")
    with pytest.raises(ValueError, match=match):
        main([f"{where}={tmp_path / 'nothing'}", *args])


def test_cuda_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ValueError, match="sees no CUDA GPU: use --device=cpu"):
        setup_device("cuda")


@pytest.mark.parametrize("content", [b"", b"not a checkpoint\n", "truncated"])
def test_unreadable_checkpoints(tiny_cllm, tmp_path, content):
    folder = tmp_path / "run"
    folder.mkdir()
    if content == "truncated":
        content = open(os.path.join(tiny_cllm, "ckpt.pt"), "rb").read()[:5000]
    (folder / "ckpt.pt").write_bytes(content)
    for main, key in ((sample.main, "out_dir"), (bench.main, "cllm_dir")):
        with pytest.raises(ValueError, match=r"ckpt.pt is not a readable checkpoint of this project"):
            main([f"--{key}={folder}"])
    with pytest.raises(ValueError, match="is not a readable checkpoint"):
        sample.main([f"--ckpt={folder / 'ckpt.pt'}"])


def test_a_checkpoint_for_another_vocabulary(tiny_target, tmp_path):
    data, target = tiny_target
    model, ckpt = load_checkpoint(os.path.join(target, "ckpt.pt"))
    ckpt["model_args"]["vocab_size"] += 1  # as if the dataset had been prepared again since
    bigger = train.GPT(train.GPTConfig(**ckpt["model_args"]))
    save_checkpoint(str(tmp_path / "ckpt.pt"), dict(ckpt, model=bigger.state_dict()))
    with pytest.raises(ValueError, match="trained with another tokenizer than"):
        sample.main([f"--out_dir={tmp_path}"])


def test_a_dataset_with_a_missing_file(tiny_target, tmp_path):
    import shutil
    data, target = tiny_target
    broken = str(tmp_path / "arith")
    shutil.copytree(data, broken)
    os.remove(os.path.join(broken, "train.bin"))
    with pytest.raises(FileNotFoundError, match="is incomplete: .*train.bin is missing"):
        train.main([f"--dataset={broken}", f"--out_dir={tmp_path / 'out'}"])


def test_prompt_and_data_files_that_are_not_utf8(tiny_cllm, tmp_path):
    bad = tmp_path / "p.txt"
    bad.write_bytes("Question: caf\xe9?\n".encode("latin-1"))
    with pytest.raises(ValueError, match="is not UTF-8 text"):
        sample.main([f"--out_dir={tiny_cllm}", f"--start=FILE:{bad}"])
    with pytest.raises(ValueError, match="is not UTF-8 text.*iconv"):
        prepare_custom([f"--input={bad}", f"--name={tmp_path / 'x'}"])


def test_unreadable_trajectory_file(tiny_target, tmp_path):
    data, target = tiny_target
    out = tmp_path / "cllm"
    out.mkdir()
    (out / "trajectories.pt").write_bytes(b"\x80\x02 half a file")
    with pytest.raises(ValueError, match="trajectories.pt is not a readable trajectory file.*delete it"):
        train_cllm.main(cllm_args(data, target, str(out)))


def test_a_killed_collection_goes_on_where_it_stopped(tiny_target, tmp_path, monkeypatch, capsys):
    """Kill the collection after two batches: the rerun collects only the rest, and the file is
    the one an uninterrupted run writes. (No training and no held-out table: only the
    trajectories are tested.)"""
    data, target = tiny_target
    args = lambda out: cllm_args(data, target, out, max_iters=0, val_prompts=1, test_prompts=0)
    train_cllm.main(args(str(tmp_path / "whole")))
    calls, collect_batch = [], trajectories.collect_batch

    def killed_after_two(*args):
        if len(calls) == 2:
            raise KeyboardInterrupt  # as a kill would, mid-collection
        calls.append(args[-1])
        return collect_batch(*args)
    monkeypatch.setattr(trajectories, "collect_batch", killed_after_two)
    monkeypatch.setattr(trajectories, "SAVE_EVERY", 0.0)
    out = str(tmp_path / "killed")
    with pytest.raises(KeyboardInterrupt):
        train_cllm.main(args(out))
    assert os.path.isfile(os.path.join(out, "trajectories.partial0.pt"))
    monkeypatch.setattr(trajectories, "collect_batch", collect_batch)
    capsys.readouterr()
    train_cllm.main(args(out))
    assert "2 batches already done before" in capsys.readouterr().out
    assert not os.path.exists(os.path.join(out, "trajectories.partial0.pt"))
    a = torch.load(tmp_path / "whole" / "trajectories.pt", weights_only=False)
    b = torch.load(os.path.join(out, "trajectories.pt"), weights_only=False)
    assert a["meta"] == b["meta"] and len(a["prompts"]) == len(b["prompts"])
    for p, q in zip(a["prompts"], b["prompts"]):
        assert torch.equal(p["prompt"], q["prompt"])
        assert all(torch.equal(s, t) for s, t in zip(p["states"], q["states"]))


HOLD_AFTER_FIRST_STEP = """
import sys
import common, train
step = train.optimizer_step
calls = []
def held(*args):  # the second step waits for a line on stdin: the test holds the process here
    calls.append(1)
    if len(calls) == 2:
        sys.stdin.readline()
    step(*args)
train.optimizer_step = held
sys.argv = ["train.py", *sys.argv[1:]]
common.run(train.main)
"""


def read_lines(stream):
    """A queue that receives the lines of stream as they arrive (a thread reads them), so that
    the test can wait for a line with a timeout instead of hanging on a stalled child."""
    lines = queue.Queue()

    def pump():
        for line in stream:
            lines.put(line)
        lines.put(None)  # end of output
    threading.Thread(target=pump, daemon=True).start()
    return lines


def test_progress_shows_at_once_through_a_pipe(tiny_target, tmp_path):
    """train.py (through common.run) with its output to a pipe, held by the test in its second
    step: the line of the first step arrives while the process waits, which it can only do if
    the output is line-buffered. All it prints is a few hundred bytes, far below the 8 KB a
    block buffer holds, so a buffered run shows nothing until it ends: the wait times out."""
    data, _ = tiny_target
    cmd = [sys.executable, "-c", HOLD_AFTER_FIRST_STEP, f"--dataset={data}",
           f"--out_dir={tmp_path / 'out'}", "--n_layer=1", "--n_head=2", "--n_embd=32",
           "--block_size=32", "--batch_size=4", "--max_iters=3", "--log_interval=1", "--eval_interval=1000", "--eval_iters=1", "--val_prompts=0",
           "--test_prompts=0"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # buffered by default
    stderr = open(tmp_path / "stderr", "w+")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=stderr, text=True)
    try:
        lines, seen = read_lines(proc.stdout), []
        while not (seen and seen[-1].startswith("iter 1: loss")):
            try:
                line = lines.get(timeout=60)
            except queue.Empty:
                pytest.fail(f"no progress line within 60 s while the process runs; so far: {seen}")
            assert line is not None, f"the process ended early: {seen} {open(tmp_path / 'stderr').read()}"
            seen.append(line)
        assert proc.poll() is None  # still held in step 2: the line came while it was running
        proc.stdin.write("go on\n")
        proc.stdin.close()
        assert proc.wait(timeout=60) == 0, open(tmp_path / "stderr").read()
        rest = []
        while (line := lines.get(timeout=60)) is not None:
            rest.append(line)
        assert any(line.startswith("iter 3: loss") for line in rest), rest
        assert len("".join(seen + rest).encode()) < 2000  # far below a block buffer's 8 KB
    finally:
        proc.kill()
        proc.wait()
        stderr.close()
