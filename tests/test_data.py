# Tests of the dataset builders (data/*/prepare.py) and of data/common.py, on small slices.
# Run: python -m pytest -q tests/test_data.py
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest

from conftest import small_arith
from data.common import (final_answer, load_encoding, load_meta, load_records, load_tokens,
                         parses, score)
from data.custom.prepare import prepare as prepare_custom
from data.pycode.prepare import prepare as prepare_pycode

OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b,
       "/": lambda a, b: a // b}


@pytest.fixture(scope="module")
def arith(tmp_path_factory):
    return small_arith(tmp_path_factory.mktemp("data"), 400, 30, 30)


def test_arith_splits_and_no_leakage(arith):
    meta = load_meta(arith)
    assert meta["records"] == {"train": 400, "val": 30, "test": 30}
    train = {r["prompt"] for r in load_records(arith, "train")}
    test = load_records(arith, "test")
    assert not any(r["prompt"] in train for r in test)
    assert meta["mean_answer_tokens"] > 25  # worked steps: tens of tokens


def test_arith_solutions_are_correct_arithmetic(arith):
    for r in load_records(arith, "train"):
        steps = re.findall(r"(\d+) ([-+*/]) (\d+) = (\d+)", r["answer"])
        assert len(steps) >= 2
        for a, op, b, c in steps:
            assert OPS[op](int(a), int(b)) == int(c), r["answer"]
            if op == "/":
                assert int(a) % int(b) == 0
        assert final_answer(r["answer"]) == int(steps[-1][3])


def test_arith_streams_decode_to_the_records(arith):
    enc, meta = load_encoding(arith), load_meta(arith)
    stream = load_tokens(arith, "train")
    assert stream.dtype == np.uint16 and len(stream) == meta["tokens"]["train"]
    docs = enc.decode(stream.tolist()).split("<|endoftext|>")
    recs = load_records(arith, "train")
    assert docs[:-1] == [r["prompt"] + r["answer"] for r in recs] and docs[-1] == ""


def test_prepare_is_idempotent_and_deterministic(arith, tmp_path, capsys):
    mtime = os.path.getmtime(os.path.join(arith, "train.bin"))
    small_arith(Path(arith).parent, 400, 30, 30)
    assert "already prepared" in capsys.readouterr().out
    assert os.path.getmtime(os.path.join(arith, "train.bin")) == mtime
    again = small_arith(tmp_path, 400, 30, 30)
    for f in ("train.bin", "test.jsonl", "tokenizer.tiktoken"):
        assert open(os.path.join(arith, f), "rb").read() == open(os.path.join(again, f), "rb").read()


def test_pycode_slice(tmp_path):
    path = str(tmp_path / "pycode")
    prepare_pycode([f"--name={path}", "--max_files=120", "--vocab_size=512"])
    meta = load_meta(path)
    assert meta["settings"]["python"] and all(meta["records"].values())
    for r in load_records(path, "test"):
        assert r["prompt"].startswith(("def ", "async def "))
        assert parses(r["prompt"], r["answer"])
        assert score("parse", r, r["answer"]) == 1.0
    enc = load_encoding(path)
    assert enc.decode(load_tokens(path, "val").tolist()).count("<|endoftext|>") > meta["records"]["val"]


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_custom_jsonl_and_text(tmp_path):
    src = write_lines(tmp_path / "d.jsonl", [json.dumps({"prompt": f"Q{i}: ", "answer": f"A{i}"})
                                             for i in range(40)])
    prepare_custom([f"--input={src}", f"--name={tmp_path / 'mine'}", "--vocab_size=300"])
    meta = load_meta(str(tmp_path / "mine"))
    assert sum(meta["records"].values()) == 40 and all(meta["records"].values())
    src = write_lines(tmp_path / "t.txt", ["Title one", "body one", "", "Title two", "body two",
                                           "more", "", "single line paragraph", "", "T3", "b3"])
    prepare_custom([f"--input={src}", f"--name={tmp_path / 'txt'}", "--vocab_size=300"])
    recs = sum((load_records(str(tmp_path / "txt"), s) for s in ("train", "val", "test")), [])
    assert sorted(r["prompt"] for r in recs) == ["T3\n", "Title one\n", "Title two\n"]


@pytest.mark.parametrize("lines,match", [
    (['{"prompt": "a", "answer": "b"}', '{"prompt": "a", "answer": '], "bad JSON on line 2"),
    (['{"prompt": "a", "answer": "b"}', '{"prompt": "", "answer": "b"}'], "line 2 has an empty"),
    (['{"prompt": "a"}'], 'line 1 must be an object with string fields'),
    (['{"prompt": "a", "answer": "b"}'], "1 usable records; at least 3"),
])
def test_custom_bad_input(tmp_path, lines, match):
    src = write_lines(tmp_path / "d.jsonl", lines)
    with pytest.raises(ValueError, match=match):
        prepare_custom([f"--input={src}", f"--name={tmp_path / 'x'}"])


def test_custom_missing_file_and_missing_dataset(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        prepare_custom([f"--input={tmp_path / 'nope.jsonl'}"])
    with pytest.raises(ValueError, match="give the data file"):
        prepare_custom([])
    with pytest.raises(FileNotFoundError, match="is not prepared.*prepare.py"):
        load_meta(str(tmp_path / "nothing"))


def test_scores():
    rec = {"prompt": "Q", "answer": "2 + 3 = 5.\n#### 5"}
    assert score("accuracy", rec, "x\n#### 5") == 1.0
    assert score("accuracy", rec, "x\n#### 6") == 0.0
    assert score("accuracy", rec, "no answer") == 0.0
    rec = {"prompt": "def f(x):\n    '''doc'''\n", "answer": "    return x\n"}
    assert score("parse", rec, "    return x\n") == 1.0
    assert score("parse", rec, "    return (x\n") == 0.0
    assert score("loss", rec, "anything") is None
