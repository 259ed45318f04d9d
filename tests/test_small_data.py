# Small data: train.py trains until the val answer loss (the val loss without val prompts) stops
# improving (patience, an evaluation every epoch), train_cllm.py checks the target before distilling it, caps the trajectories of outputs
# that never end, and says early what the run will cost.
# Run: python -m pytest -q tests/test_small_data.py
import math
import os
import re
from types import SimpleNamespace

import pytest
import torch

import train
import train_cllm
from conftest import settings, small_arith
from data.common import load_tokens, trajectory_length
from extras.quality import unfit_target
from extras.table import cost_line


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return small_arith(tmp_path_factory.mktemp("small"), 40, 10, 4)


def small_target_args(data, out_dir, **overrides):
    return settings(dict(dataset=data, out_dir=out_dir, n_layer=1, n_head=2, n_embd=32, block_size=128,
                         batch_size=8, max_iters=2000, learning_rate=1e-2, min_lr=1e-2, warmup_iters=1,
                         eval_iters=2, log_interval=1000, val_prompts=0, test_prompts=0, patience=3),
                    **overrides)


def test_training_stops_when_the_val_loss_stops_improving(small, tmp_path, capsys):
    """40 records at a high learning rate overfit within a few dozen epochs: training stops long
    before max_iters, after `patience` evaluations without a better val loss, one epoch apart,
    and ckpt.pt holds the best one."""
    out = str(tmp_path / "target")
    train.main(small_target_args(small, out))
    log = capsys.readouterr().out
    per_epoch = math.ceil(len(load_tokens(small, "train")) / (8 * 128))  # counted from the data
    assert f"an evaluation every {per_epoch} iterations (one epoch)" in log
    stop = re.search(r"stopped at iteration (\d+): 3 evaluations without a better val loss; "
                     r"the best, ([\d.]+) at iteration (\d+), is ckpt.pt", log)
    assert stop, log
    stopped, best, best_iter = int(stop[1]), float(stop[2]), int(stop[3])
    assert stopped < 2000 and stopped == best_iter + 3 * per_epoch
    vals = [float(v) for v in re.findall(r"val loss ([\d.]+)", log)]
    assert min(vals) == best and vals.index(best) == len(vals) - 4  # then 3 worse ones
    saved = torch.load(os.path.join(out, "ckpt.pt"), weights_only=False)
    assert saved["iter_num"] == best_iter
    assert "iter 2000" not in log


def test_the_val_answer_loss_judges_when_there_are_val_prompts(small, tmp_path, capsys):
    """With val prompts, ckpt.pt and the stop are judged by the loss of the val answers given their
    prompts, not by the loss over the whole text: the best printed val answer loss is the one
    ckpt.pt holds, and it is the answer loss of ckpt.pt's model on those prompts, computed again
    here (extras/quality.answer_loss, checked by hand in tests/test_quality.py)."""
    from common import load_checkpoint
    from data.common import generation_length, load_encoding, load_meta, load_records
    from extras.quality import answer_loss
    out = str(tmp_path / "target")
    train.main(small_target_args(small, out, val_prompts=4))
    log = capsys.readouterr().out
    stop = re.search(r"stopped at iteration (\d+): 3 evaluations without a better val answer loss; "
                     r"the best, ([\d.]+) at iteration (\d+), is ckpt.pt", log)
    assert stop, log
    judged = [float(v) for v in re.findall(r"val answer loss ([\d.]+)", log)]
    assert min(judged) == float(stop[2]) and judged.index(min(judged)) == len(judged) - 4
    model, saved = load_checkpoint(os.path.join(out, "ckpt.pt"))
    assert saved["iter_num"] == int(stop[3])
    records = load_records(small, "val")[:4]
    again = answer_loss(model, load_encoding(small), records, generation_length(load_meta(small), 128), "cpu")
    assert again == pytest.approx(saved["val_judged"], rel=1e-6) and round(again, 4) == float(stop[2])


def test_max_iters_still_bounds_training_and_says_so(small, tmp_path, capsys):
    train.main(small_target_args(small, str(tmp_path / "t"), max_iters=3, learning_rate=1e-3,
                                 min_lr=1e-3))
    log = capsys.readouterr().out
    assert "stopped at" not in log and "max_iters, with the val loss still improving" in log  # (val_prompts=0)


def test_an_unfit_target_is_refused_before_its_trajectories(tiny_target, tmp_path, capsys):
    """The tiny target has learned nothing: the run stops with one line that says what was
    measured and what to do, before collecting anything; --force distils it anyway."""
    data, target = tiny_target
    out = tmp_path / "cllm"
    args = [f"--dataset={data}", f"--target_dir={target}", f"--out_dir={out}", "--n=4",
            "--num_prompts=4", "--batch_size=2", "--max_iters=0", "--val_prompts=3",
            "--max_new_tokens=8", "--test_prompts=0", "--repeat_limit=1000"]
    with pytest.raises(ValueError, match=r"the target has not learned its task \(accuracy 0, .*on 3 val "
                                         r"prompts\).*--force distils it anyway"):
        train_cllm.main(args)
    assert "collecting" not in capsys.readouterr().out and not os.path.exists(out / "trajectories.pt")
    train_cllm.main(args + ["--force"])
    assert "collecting Jacobi trajectories" in capsys.readouterr().out


class Digits:
    """An encoding where token t is the digit t and 9 is the end of text."""
    eot_token = 9
    encode_ordinary = staticmethod(lambda text: [int(c) for c in text])


def point(quality=0.8, ended=1.0, loss=0.1):
    return dict(quality=quality, ended=ended, answer_loss=loss)


def test_what_makes_a_target_unfit():
    records = [dict(answer="123"), dict(answer="1234567")]  # answers of 3 and 7 tokens
    assert unfit_target(point(), records, Digits, 8, "accuracy") is None
    assert "accuracy 0" in unfit_target(point(quality=0.0), records, Digits, 8, "accuracy")
    assert unfit_target(point(quality=None), records, Digits, 8, "loss") is None  # no task score
    # with 8 new tokens both answers (and their end of text) fit: ending half of the time is too few
    line = unfit_target(point(ended=0.4), records, Digits, 8, "accuracy")
    assert "40% of its outputs end within 8 tokens, where 100% of the answers do" in line
    # with 5 only the short one fits, so a target that ends half of its outputs does as the data
    assert unfit_target(point(ended=0.5), records, Digits, 5, "accuracy") is None
    assert "answer loss 1.20 nats" in unfit_target(point(loss=1.2), records, Digits, 8, "accuracy")
    assert unfit_target(point(loss=0.99), records, Digits, 8, "accuracy") is None


@pytest.mark.parametrize("p95,longest,n,want", [(59, 60, 16, 60), (64, 148, 16, 64), (20, 148, 16, 32),
                                                (20, 148, 32, 32), (100, 148, 16, 112)])
def test_trajectories_cover_95_percent_of_the_answers_in_whole_blocks(p95, longest, n, want):
    meta = dict(lengths=dict(answer=dict(p95=p95, max=longest)))
    assert trajectory_length(meta, 1024, n) == want


def test_the_cost_line_adds_up():
    """100 steps, 5 done at 0.5 s each; an evaluation (Jacobi + sliding window on 50 prompts) took
    10 s, so a decode 0.1 s; evaluations at 20, 40, 60, 80, 100; the table decodes 200 prompts 5
    times (AR and Jacobi of the target; AR, Jacobi and the window of the CLLM):
    47.5 + 5 * 10 + 200 * 5 * 0.1 = 197.5 s."""
    cfg = SimpleNamespace(max_iters=100, eval_interval=20, blocks=2, lookup=False, val_prompts=50,
                          test_prompts=200)
    timed = [dict(seconds=10.0, prompts=50)]  # the curve: the last evaluation took 10 s
    line = cost_line(cfg, 5, 0.5, timed, 200)
    assert "0.8 min of distillation (0.50 s per step), 5 evaluations 0.8 min" in line
    assert "the table on 200 test prompts 1.7 min: about 3.3 min more" in line
    assert cost_line(cfg, 5, 0.5, [dict(prompts=50)], 200).endswith("then 5 evaluations and the table")
    # a test split of 61 prompts: the table decodes 61, whatever test_prompts asks for
    assert "the table on 61 test prompts 0.5 min: about 2.1 min more" in cost_line(cfg, 5, 0.5, timed, 61)


def test_a_gain_over_the_target_is_called_further_training():
    """The CLLM answers better than its target: the table says the AR loss can account for part
    of it, names the AR-only control and the bench.py command that puts its number in the table,
    and, when the target's best checkpoint is its last iteration, that the target was still
    improving."""
    from extras.table import quality_gain_note
    tolerance = dict(answer_loss=0.05, quality=0.05, repeated=0.05)
    row = lambda q, loss: dict(quality=q, answer_loss=loss)
    better = {"target": {"AR": row(0.76, 0.020)}, "CLLM": {"AR": row(0.83, 0.018)}}
    same = {"target": {"AR": row(0.76, 0.020)}, "CLLM": {"AR": row(0.78, 0.019)}}
    still = dict(iter_num=1500, config=dict(max_iters=1500))
    note = quality_gain_note(still, "accuracy", better, "out-x", tolerance)
    assert "(accuracy 0.760 -> 0.830)" in note and "--states_per_block=0 --out_dir=out-x-control" in note
    assert "python bench.py --model_dir=out-x --control_dir=out-x-control" in note
    assert "still improving when its training ended (iteration 1500)" in note
    assert quality_gain_note(still, "accuracy", same, "out-x", tolerance) is None  # no gain to explain
    plateau = dict(iter_num=420, max_iters=1500, config=dict(max_iters=1500))  # patience ended it
    note = quality_gain_note(plateau, "accuracy", better, "out-x", tolerance)
    assert "--states_per_block=0" in note and "still improving" not in note
    lower_loss = {"target": {"AR": row(None, 2.43)}, "CLLM": {"AR": row(None, 1.90)}}
    assert "(answer loss 2.430 -> 1.900)" in quality_gain_note(dict(iter_num=145, max_iters=145),
                                                               "loss", lower_loss, "out-x", tolerance)
