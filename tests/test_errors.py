# Bad input gets one clear line that says what to do, before anything expensive runs; nothing
# is lost when a run is killed; progress shows at once also through a pipe.
# Run: python -m pytest -q tests/test_errors.py
import os
import queue
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict

import pytest
import torch

import bench
import sample
import train
import train_cllm
from common import check_context, load_checkpoint, save_checkpoint, setup_device
from extras import trajectories
from data.common import load_meta
from data.custom.prepare import prepare as prepare_custom
from test_cllm import cllm_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("main,args,match", [
    (sample.main, ["--n=-3"], "n must be at least 0, got -3"),
    (sample.main, ["--max_new_tokens=-1"], "max_new_tokens must be at least 0"),
    (bench.main, ["--ns=[16, 0]"], "ns must be at least 1"),
    (bench.main, ["--dtype=float16"], "dtype must be one of 'float32', 'bfloat16'"),
    (train_cllm.main, ["--n=0"], "n must be at least 1"),
    (train_cllm.main, ["--recipe=jf"], "recipe must be one of 'cllm', 'jacobi_forcing'"),
    (train_cllm.main, ["--batch_size=0"], "batch_size must be at least 1"),
    (train.main, ["--init_from=nothing"], "init_from must be one of 'scratch', 'resume', 'gpt2'"),
    (train.main, ["--max_iter=3"], "unknown setting 'max_iter'"),
    (train.main, ["--dropout=1.0"], "dropout must be below 1.0, got 1.0"),
    (train.main, ["--patience=-1"], "patience must be at least 0"),
    (train_cllm.main, ["--label_smoothing=1.5"], "label_smoothing must be below 1.0"),
])
def test_bad_settings_are_refused_before_any_work(main, args, match, tmp_path):
    # out_dir/model_dir and dataset point at nothing: the settings are checked before a file is read
    where = {sample.main: "--model_dir", bench.main: "--model_dir"}.get(main, "--out_dir")
    data = [f"--dataset={tmp_path / 'none'}"] if main in (train.main, train_cllm.main) else []
    with pytest.raises(ValueError, match=match):
        main([f"{where}={tmp_path / 'nothing'}", *data, *args])


def test_settings_the_model_or_the_data_cannot_satisfy(tiny_target, tmp_path):
    """Refused before any work, each in a line that says what to change: a width the heads do not
    split, a context that holds too little of the data's records (train.py's own, or the
    target's), a Jacobi block longer than what is decoded per prompt."""
    data, target = tiny_target
    quick = [f"--dataset={data}", "--n_layer=1", "--n_head=2", "--n_embd=32", "--max_iters=0",
             "--val_prompts=0", "--test_prompts=0"]
    with pytest.raises(ValueError, match="n_embd 30 does not split into 4 attention heads .*a multiple"):
        train.main(quick + [f"--out_dir={tmp_path / 'a'}", "--n_embd=30", "--n_head=4"])
    with pytest.raises(ValueError, match="a context of 32 tokens .* cannot hold most of arith's records "
                                         r"\(prompt \+ answer: \d+ tokens at the median.*raise --block_size"):
        train.main(quick + [f"--out_dir={tmp_path / 'b'}", "--block_size=32"])
    with pytest.raises(ValueError, match="a Jacobi block of n=200 tokens is longer than the 16 tokens "
                                         "decoded per prompt .*--n=16 or less"):
        train_cllm.main(cllm_args(data, target, str(tmp_path / "c"), n=200, max_iters=0, test_prompts=0))
    with pytest.raises(ValueError, match=r"a Jacobi block of decode_n=200 tokens is longer than the \d+ tokens "
                                         r"decoded per prompt \(max_new_tokens\).*--decode_n=\d+ or less"):
        train_cllm.main(cllm_args(data, target, str(tmp_path / "c2"), decode_n=200, max_iters=0, test_prompts=0))
    short = train.GPT(train.GPTConfig(block_size=64, vocab_size=load_meta(data)["vocab_size"], n_layer=1,
                                      n_head=2, n_embd=32))
    save_checkpoint(str(tmp_path / "short" / "ckpt.pt"), dict(model=short.state_dict(), dataset=data,
                                                               model_args=asdict(short.config)))
    with pytest.raises(ValueError, match="the target's context of 64 tokens cannot hold most of .*records"):
        train_cllm.main(cllm_args(data, str(tmp_path / "short"), str(tmp_path / "d"), max_iters=0,
                                  test_prompts=0))


def test_a_context_that_crops_most_prompts():
    """check_context on a dataset of long prompts and short answers: a context of 128 that keeps
    64 prompt tokens when 64 are generated is refused for prompts of 70 tokens at the median."""
    lengths = dict(prompt=dict(p50=70, p95=80, max=90), answer=dict(p50=10, p95=12, max=20),
                   total=dict(p50=80, p95=92, max=110))
    meta = dict(name="long", lengths=lengths)
    with pytest.raises(ValueError, match="leaves a prompt 64 tokens when 64 are generated .*median 70 "
                                         "tokens.*lower --max_new_tokens to 58 at most"):
        check_context(meta, 128, 64, "a context of 128", "raise --block_size")
    check_context(meta, 128, 20, "a context of 128", "raise --block_size")  # (keeps 108)


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
    for main, key in ((sample.main, "model_dir"), (bench.main, "model_dir")):
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
        sample.main([f"--model_dir={tmp_path}"])


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
        sample.main([f"--model_dir={tiny_cllm}", f"--start=FILE:{bad}"])
    with pytest.raises(ValueError, match="is not UTF-8 text.*iconv"):
        prepare_custom([f"--input={bad}", f"--name={tmp_path / 'x'}"])


def test_unreadable_trajectory_file(tiny_target, tmp_path):
    data, target = tiny_target
    out = tmp_path / "cllm"
    out.mkdir()
    (out / "trajectories.pt").write_bytes(b"\x80\x02 half a file")
    with pytest.raises(ValueError, match="trajectories.pt is not a readable trajectory file.*delete it"):
        train_cllm.main(cllm_args(data, target, str(out)))


@pytest.mark.parametrize("stop", ["kill", "SIGTERM"])
def test_a_killed_collection_goes_on_where_it_stopped(tiny_target, tmp_path, monkeypatch, capsys, stop):
    """Stop the collection after two batches, by a kill (the batches saved every SAVE_EVERY
    seconds, 0 here) or by SIGTERM (saved when it stops, with a line that says to rerun the
    command): the rerun collects only the rest, and the file is the one an uninterrupted run
    writes. (No training and no held-out table: only the trajectories are tested.)"""
    data, target = tiny_target
    args = lambda out: cllm_args(data, target, out, max_iters=0, val_prompts=1, test_prompts=0)
    train_cllm.main(args(str(tmp_path / "whole")))
    calls, collect_batch = [], train_cllm.collect_batch

    def stopped_after_two(*args):
        if len(calls) == 2 and stop == "kill":
            raise KeyboardInterrupt  # as a kill would, mid-collection
        calls.append(args[-1])
        if len(calls) == 2 and stop == "SIGTERM":  # as a scheduler would: this batch finishes
            assert signal.getsignal(signal.SIGTERM) != signal.SIG_DFL  # (else it ends the tests)
            os.kill(os.getpid(), signal.SIGTERM)
        return collect_batch(*args)
    monkeypatch.setattr(train_cllm, "collect_batch", stopped_after_two)
    if stop == "kill":
        monkeypatch.setattr(trajectories, "SAVE_EVERY", 0.0)
    out = str(tmp_path / "killed")
    capsys.readouterr()
    with pytest.raises(KeyboardInterrupt if stop == "kill" else SystemExit):
        train_cllm.main(args(out))
    if stop == "SIGTERM":
        assert capsys.readouterr().out.splitlines()[-1] == (
            "SIGTERM: stopped collecting trajectories, 2 of 3 batches done and saved in "
            f"{out}; go on with: python train_cllm.py {shlex.join(args(out))}")
    assert os.path.isfile(os.path.join(out, "trajectories.partial0.pt"))
    monkeypatch.setattr(train_cllm, "collect_batch", collect_batch)
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


def test_a_signal_in_the_last_collection_batch_stops_before_training(tiny_target, tmp_path, monkeypatch,
                                                                     capsys):
    """SIGTERM while the last batch is collected: the collection finishes and is saved, and the run
    stops before its first step without a last.pt (nothing trained: resuming would start from an
    empty curve); the same command goes on, reusing the trajectories."""
    data, target = tiny_target
    out = str(tmp_path / "cllm")
    args = cllm_args(data, target, out, max_iters=2, test_prompts=0)
    calls, collect_batch = [], train_cllm.collect_batch

    def signal_in_the_last(*a):
        calls.append(1)
        if len(calls) == 3:  # the third and last batch
            os.kill(os.getpid(), signal.SIGTERM)
        return collect_batch(*a)
    monkeypatch.setattr(train_cllm, "collect_batch", signal_in_the_last)
    capsys.readouterr()
    with pytest.raises(SystemExit):
        train_cllm.main(args)
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"SIGTERM: stopped before the first step, the trajectories saved in {out}; go on with: "
        f"python train_cllm.py {shlex.join(args)}")
    assert os.path.isfile(os.path.join(out, "trajectories.pt"))
    assert not os.path.exists(os.path.join(out, "last.pt")) and not os.path.exists(os.path.join(out, "ckpt.pt"))
    monkeypatch.setattr(train_cllm, "collect_batch", collect_batch)
    train_cllm.main(args)
    assert "reusing" in capsys.readouterr().out
    assert torch.load(os.path.join(out, "last.pt"), weights_only=False)["curve"][0]["iter"] == 0


HOLD_AFTER_FIRST_STEP = """
import sys
import common, train
step = train.optimizer_step
calls = []
def held(*args):  # the second step waits for a line on stdin: the test holds the process here
    calls.append(1)
    if len(calls) == 2:
        print("held", file=sys.stderr, flush=True)
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
           "--block_size=128", "--batch_size=4", "--max_iters=3", "--log_interval=1", "--eval_interval=1000", "--eval_iters=1", "--val_prompts=0",
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


def held_train(data, out_dir, tmp_path):
    """train.py, through common.run, held in its second step (HOLD_AFTER_FIRST_STEP): (process,
    its settings, its stdout lines, its stderr file)."""
    args = [f"--dataset={data}", f"--out_dir={out_dir}", "--n_layer=1", "--n_head=2", "--n_embd=32",
            "--batch_size=4", "--max_iters=3", "--log_interval=1", "--eval_interval=2", "--eval_iters=1",
            "--val_prompts=0", "--test_prompts=0", "--dropout=0.1"]
    env = dict(os.environ, OMP_NUM_THREADS="1")  # (the tests' own thread count: the same sums)
    stderr = tmp_path / "stderr"
    proc = subprocess.Popen([sys.executable, "-c", HOLD_AFTER_FIRST_STEP, *args], cwd=ROOT, env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(stderr, "w"),
                            text=True)
    wait_for("held", stderr, proc)
    return proc, args, read_lines(proc.stdout), stderr


def wait_for(text, path, proc, timeout=60):
    """Wait until the file at path, a process's stderr, holds text."""
    end = time.time() + timeout
    while text not in path.read_text():
        assert proc.poll() is None and time.time() < end, path.read_text()
        time.sleep(0.05)


def test_ctrl_c_saves_the_step_and_says_how_to_go_on(tiny_target, tmp_path):
    """Ctrl-C (SIGINT from outside) in train.py's second step: the step finishes, last.pt is
    saved, and the last line is the command that goes on; that command (its settings given to
    train.main, as `python train.py` does) ends with the weights of a run never stopped. A second
    Ctrl-C a second later stops at once, in one line, without a traceback, and leaves the
    checkpoints readable."""
    data, _ = tiny_target
    proc, args, lines, stderr = held_train(data, tmp_path / "stopped", tmp_path)
    try:
        proc.send_signal(signal.SIGINT)
        wait_for("SIGINT: saving after this step", stderr, proc)
        proc.stdin.write("go on\n")
        proc.stdin.close()
        assert proc.wait(timeout=60) == 130, stderr.read_text()
        out = []
        while (line := lines.get(timeout=60)) is not None:
            out.append(line)
    finally:
        proc.kill()
    stop = out[-1].strip()
    assert stop.startswith(f"SIGINT: stopped at iteration 2 of 3, saved in {tmp_path}/stopped/last.pt;")
    command = shlex.split(stop.split("; go on with: ")[1])
    assert command == ["python", "train.py", *args, "--init_from=resume"]
    train.main(command[2:])
    train.main([a.replace("stopped", "straight") for a in args])
    a = torch.load(tmp_path / "straight" / "ckpt.pt", weights_only=False)
    b = torch.load(tmp_path / "stopped" / "ckpt.pt", weights_only=False)
    assert a["iter_num"] == b["iter_num"] == 3
    assert all(torch.equal(v, b["model"][k]) for k, v in a["model"].items())

    proc, args, lines, stderr = held_train(data, tmp_path / "twice", tmp_path)
    try:
        proc.send_signal(signal.SIGINT)
        time.sleep(1.2)  # (two within a second are one Ctrl-C passed on twice, as torchrun does)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 130
    finally:
        proc.kill()
    err = stderr.read_text()
    assert err.strip().splitlines()[-1] == "interrupted: stopped at once; the files saved so far are intact"
    assert "Traceback" not in err
    assert load_checkpoint(str(tmp_path / "twice" / "last.pt"))[1]["iter_num"] == 0  # (its evaluation)
