# train.py and train_cllm.py under torchrun: 2 CPU processes (gloo) against 1 process.
# Run: python -m pytest -q tests/test_distributed.py
import os
import re
import signal
import subprocess
import sys

import pytest
import torch

import train
from common import load_checkpoint
import train_cllm
from test_cllm import cllm_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def torchrun(script, args, nproc=2):
    """Run a script under torchrun with nproc CPU processes; its output (rank 0 prints). The `--`
    keeps torchrun's own parser off the script's settings (it would take --n=4 for an abbreviation
    of its --nnodes)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           os.path.join(ROOT, script), "--", *args]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def torchrun_stopped(script, args, after, nproc=2):
    """torchrun as above, sent SIGINT once a line that starts with `after` is out, as Ctrl-C in a
    terminal sends it: to torchrun and every process (torchrun passes it on too, so each process
    gets it twice). (its output, torchrun's exit status)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           os.path.join(ROOT, script), "--", *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)  # (its own process group)
    try:
        out = []
        for line in proc.stdout:
            out.append(line)
            if line.startswith(after):
                os.killpg(proc.pid, signal.SIGINT)
                break
        rest, _ = proc.communicate(timeout=120)  # (no process may hang)
    finally:
        proc.kill()
    return "".join(out) + rest, proc.returncode


@pytest.fixture(autouse=True)
def one_thread():
    """The torchrun processes get one thread each; so does the single process they are compared
    with (a matrix product can round differently with another number of threads)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def losses(log):
    return [float(x) for x in re.findall(r"^iter \d+: loss ([\d.]+)", log, re.M)]


def assert_same_weights(path_one, path_two, steps, lr):
    """The weights of two checkpoints agree after `steps` AdamW updates at a learning rate of at
    most lr, up to float32 rounding.

    The tolerance, derived. One process takes the mean loss over the whole batch; 2 processes x 2
    micro-steps add up four partial means (weighted by their shares). The same numbers in another
    order: float32 rounds each addition by up to 6e-8 of its size, so a gradient entry differs by
    ~1e-7 of the terms it adds. AdamW divides each entry by its running RMS: an update moves a
    weight by about lr, and it differs by that same tiny fraction, except for the rare entry
    whose terms nearly cancel, where rounding can flip the sign; the next updates average that
    out. So the weights differ by a small fraction of steps * lr: we allow 1% of it (measured
    here: 1e-4 to 2e-4 of it). A wrong weighting of the partial means, or gradients not averaged
    over the processes, moves weights by whole updates, ~steps * lr: 100 times the tolerance."""
    a = torch.load(path_one, weights_only=False)
    b = torch.load(path_two, weights_only=False)
    assert a["iter_num"] == b["iter_num"] == steps
    for k in a["model"]:
        torch.testing.assert_close(b["model"][k], a["model"][k], rtol=0, atol=0.01 * steps * lr)


def tiny_train_args(data, out_dir):
    return [f"--dataset={data}", f"--out_dir={out_dir}", "--n_layer=1", "--n_head=2", "--n_embd=32",
            "--block_size=128", "--batch_size=8", "--max_iters=12", "--eval_interval=6", "--eval_iters=1",
            "--log_interval=1", "--val_prompts=0", "--test_prompts=2", "--warmup_iters=2",
            "--dropout=0.0"]


def test_train_on_two_processes_matches_one(tiny_target, tmp_path, capsys):
    """The same global batch on 1 process and on 2 processes x 2 micro-steps: the same losses and,
    after 12 updates, the same weights, up to float rounding; one checkpoint, written by rank 0,
    that loads in a single process."""
    data, _ = tiny_target
    train.main(tiny_train_args(data, tmp_path / "one"))
    one = losses(capsys.readouterr().out)
    two = losses(torchrun("train.py", tiny_train_args(data, tmp_path / "two") + ["--grad_accum=2"]))
    assert len(one) == len(two) == 12
    assert one[-1] < one[0] and two[-1] < two[0]  # it learns
    torch.testing.assert_close(torch.tensor(two), torch.tensor(one), rtol=1e-4, atol=1e-5)
    model, ckpt = load_checkpoint(str(tmp_path / "two" / "ckpt.pt"))
    assert not any(k.startswith("module.") for k in ckpt["model"])  # the plain module's weights
    assert sorted(os.listdir(tmp_path / "two")) == ["ckpt.pt", "last.pt"]
    assert_same_weights(tmp_path / "one" / "last.pt", tmp_path / "two" / "last.pt", 12, 3e-3)


def test_distillation_on_two_processes_matches_one(tiny_target, tmp_path, capsys):
    """Trajectories collected by 2 processes are the file 1 process writes; on 2 processes x 2
    micro-steps the distillation losses and, after 4 updates, the weights agree with 1 process's;
    resume works under torchrun, and so does Ctrl-C."""
    data, target = tiny_target
    args = lambda out, **kw: cllm_args(data, target, out, collect_batch=3, **kw)
    train_cllm.main(args(str(tmp_path / "one")))
    one = losses(capsys.readouterr().out)
    log = torchrun("train_cllm.py", args(str(tmp_path / "two"), grad_accum=2))
    two = losses(log)
    assert "| CLLM |" in log and len(one) == len(two) == 4
    torch.testing.assert_close(torch.tensor(two), torch.tensor(one), rtol=1e-4, atol=1e-5)
    assert_same_weights(tmp_path / "one" / "last.pt", tmp_path / "two" / "last.pt", 4, 1e-3)
    a = torch.load(tmp_path / "one" / "trajectories.pt", weights_only=False)
    b = torch.load(tmp_path / "two" / "trajectories.pt", weights_only=False)
    assert a["meta"] == b["meta"] and len(a["prompts"]) == len(b["prompts"]) == 12
    for p, q in zip(a["prompts"], b["prompts"]):
        assert torch.equal(p["prompt"], q["prompt"]) and torch.equal(p["answer"], q["answer"])
        assert all(torch.equal(s, t) for s, t in zip(p["states"], q["states"]))
    # resumed under torchrun, then stopped by a Ctrl-C a few steps in: every process stops after
    # the same step, rank 0 saves it and prints how to go on
    log, status = torchrun_stopped("train_cllm.py", args(str(tmp_path / "two"), init_from="resume",
                                                         max_iters=1000), after="iter 6: loss")
    assert "reusing" in log and "iter 6: loss" in log and "iter 4: loss" not in log
    stop = re.search(r"^SIGINT: stopped at iteration (\d+) of 1000, saved in (\S+); go on with: torchrun "
                     r"--standalone --nproc_per_node=2 train_cllm.py -- .* --init_from=resume$", log, re.M)
    assert stop and status != 0, log
    assert torch.load(stop[2], weights_only=False)["iter_num"] == int(stop[1]) >= 6
    assert f"iter {int(stop[1]) + 1}: loss" not in log
