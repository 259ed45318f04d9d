# Tests of train.py: a few iterations on CPU, exact resume, gradient accumulation, clear errors.
# Run: python -m pytest -q tests/test_train.py
import os
import shlex
import signal
from functools import partial

import pytest
import torch

import train
from common import get_lr, load_checkpoint
from conftest import settings, signal_at_step, small_arith


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return small_arith(tmp_path_factory.mktemp("data"), 300, 20, 20)


def tiny_args(dataset, out_dir, **overrides):
    return settings(dict(dataset=dataset, out_dir=str(out_dir), n_layer=1, n_head=2, n_embd=32,
                         block_size=128, batch_size=4, max_iters=6, lr_decay_iters=6, warmup_iters=2,
                         eval_interval=2, eval_iters=2, log_interval=1, test_prompts=2, val_prompts=2,
                         max_new_tokens=8, dropout=0.1),
                    **overrides)


def test_train_writes_a_checkpoint_that_resumes_exactly(dataset, tmp_path, capsys, monkeypatch):
    """A run stopped at an evaluation (as by a kill after it) and one stopped by SIGTERM and then
    SIGINT between evaluations (at 3; at 4, before the evaluation due there) resume to the weights
    and the best checkpoint of a straight run, bit for bit: dropout's random state included."""
    train.main(tiny_args(dataset, tmp_path / "straight"))
    out = capsys.readouterr().out
    assert "iter 6: loss" in out and "held-out answer loss" in out and "val accuracy" in out
    train.main(tiny_args(dataset, tmp_path / "split", max_iters=3))
    train.main(tiny_args(dataset, tmp_path / "split", init_from="resume"))
    for how, signum in (("scratch", signal.SIGTERM), ("resume", signal.SIGINT)):
        with monkeypatch.context() as m:
            signal_at_step(m, train, 3 if how == "scratch" else 1, signum)
            with pytest.raises(SystemExit) as stop:
                train.main(tiny_args(dataset, tmp_path / "stopped", init_from=how))
        assert stop.value.code == 128 + signum
        line = capsys.readouterr().out.splitlines()[-1]
        at = 3 if how == "scratch" else 4
        assert line.startswith(f"{signum.name}: stopped at iteration {at} of 6, saved in ")
        same = [a for a in tiny_args(dataset, tmp_path / "stopped") if not a.startswith("--init_from")]
        command = shlex.join(["python", "train.py", *same, "--init_from=resume"])
        assert line.endswith(f"; go on with: {command}")
    train.main(tiny_args(dataset, tmp_path / "stopped", init_from="resume"))
    assert "step 4: train loss" in capsys.readouterr().out  # the evaluation the stop postponed
    a = torch.load(tmp_path / "straight" / "ckpt.pt", weights_only=False)
    for run in ("split", "stopped"):
        b = torch.load(tmp_path / run / "ckpt.pt", weights_only=False)
        assert a["iter_num"] == b["iter_num"] == 6
        for k, v in a["model"].items():
            assert torch.equal(v, b["model"][k]), (run, k)
        last = torch.load(tmp_path / run / "last.pt", weights_only=False)["model"]
        assert all(torch.equal(v, last[k]) for k, v in a["model"].items())
    assert not os.path.exists(tmp_path / "split" / "ckpt.pt.tmp")
    model, ckpt = load_checkpoint(str(tmp_path / "split" / "ckpt.pt"))
    assert not model.training and ckpt["config"]["dataset"] == dataset


def test_two_micro_steps_are_one_step_on_the_whole_batch(dataset, tmp_path, monkeypatch):
    """grad_accum=2 runs the batch in two halves of 4 windows, each loss divided by 2: the
    gradient of the step, and the weights after it, are those of one step on all 8 windows, up
    to float32 rounding (the same terms added in another grouping: a relative ~1e-7 of the
    gradient; we allow 1e-5 of each tensor's largest entry). A gradient scaled by 2 (a missing
    division), which AdamW's update hides (it divides by the gradient's RMS), fails here."""
    grads, step = [], train.optimizer_step

    def recording(model, optimizer, grad_clip):
        grads.append([p.grad.clone() for p in model.parameters()])
        step(model, optimizer, grad_clip)
    monkeypatch.setattr(train, "optimizer_step", recording)
    for accum in (1, 2):  # no dropout: its masks would be drawn in another order
        train.main(tiny_args(dataset, tmp_path / f"accum{accum}", batch_size=8, grad_accum=accum,
                             max_iters=1, dropout=0.0, val_prompts=0, test_prompts=0))
    assert len(grads) == 2
    for whole, halves in zip(*grads):
        torch.testing.assert_close(halves, whole, rtol=0, atol=1e-5 * whole.abs().max().item())
    a = torch.load(tmp_path / "accum1" / "last.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "accum2" / "last.pt", weights_only=False)["model"]
    for k in a:  # the first update moves a weight by about lr = 3e-3 / 2 (warm-up): 1% of it
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1.5e-5)


def test_lr_schedule():
    lr = partial(get_lr, learning_rate=1.0, min_lr=0.1, warmup_iters=10)
    assert lr(0, decay_iters=110) == pytest.approx(0.1)
    assert lr(9, decay_iters=110) == pytest.approx(1.0)
    assert lr(60, decay_iters=110) == pytest.approx(0.55)
    assert lr(110, decay_iters=110) == pytest.approx(0.1) == lr(500, decay_iters=110)
    assert lr(35, decay_iters=60) == pytest.approx(0.55)  # a run cut short decays sooner


def test_clear_errors(dataset, tmp_path):
    with pytest.raises(ValueError, match="unknown setting 'max_iter'"):
        train.main(["--max_iter=3"])
    with pytest.raises(FileNotFoundError, match="is not prepared"):
        train.main([f"--dataset={tmp_path / 'missing'}", f"--out_dir={tmp_path / 'o'}"])
    with pytest.raises(ValueError, match="has no last.pt to resume from: start afresh"):
        train.main(tiny_args(dataset, tmp_path / "empty", init_from="resume"))
    with pytest.raises(ValueError, match="fewer than block_size"):
        train.main(tiny_args(dataset, tmp_path / "big", block_size=100000))
