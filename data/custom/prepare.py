"""
Your own data: a jsonl file of {"prompt": ..., "answer": ...} records, or a plain text file.

    python data/custom/prepare.py --input=my_data.jsonl --name=mydata
    python data/custom/prepare.py --input=notes.txt --name=notes
    python data/custom/prepare.py --input=my_data.jsonl --name=mydata_gpt2 --tokenizer=gpt2
    python train.py --dataset=mydata --out_dir=out-mydata

Plain text is cut into paragraphs at blank lines; a paragraph of two or more lines becomes a
record whose prompt is its first line and whose answer is the rest. Records are split by a hash of
the prompt (5% val, 5% test, at least one each). Quality is held-out loss unless the answers end
in `#### <number>` (--metric=accuracy) or are Python function bodies (--metric=parse).
"""

import json
import os
import sys
from dataclasses import asdict, dataclass
from typing import Literal

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))  # run from anywhere

from common import run
from data.common import SPLITS, is_prepared, split_of, write_dataset
from extras.configurator import configure


@dataclass
class CustomConfig:
    input: str = ""            # path to a .jsonl or a text file
    name: str = "custom"       # written to data/<name>/
    vocab_size: int = 2048     # BPE vocabulary, end-of-text token included
    metric: Literal["loss", "accuracy", "parse", "exact"] = "loss"  # see data/common.py score
    tokenizer: Literal["bpe", "gpt2"] = "bpe"  # "bpe": our own, trained here; "gpt2": GPT-2's (for GPT-2 weights;
                               # tiktoken downloads it once, so this needs internet)
    val_frac: float = 0.05     # share of the records for val
    test_frac: float = 0.05    # share of the records for test


def read_jsonl(path):
    records = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: bad JSON on line {n}: {e.msg} (column {e.colno})") from None
            if not isinstance(rec, dict) or not all(isinstance(rec.get(k), str) for k in ("prompt", "answer")):
                raise ValueError(f"{path}: line {n} must be an object with string fields "
                                 '"prompt" and "answer"')
            if not rec["prompt"].strip() or not rec["answer"].strip():
                raise ValueError(f"{path}: line {n} has an empty prompt or answer")
            records.append({"prompt": rec["prompt"], "answer": rec["answer"]})
    return records


def read_text(path):
    with open(path, encoding="utf-8") as f:
        paragraphs = f.read().split("\n\n")
    records = []
    for p in paragraphs:
        lines = p.strip("\n").splitlines(keepends=True)
        if len(lines) >= 2:
            records.append({"prompt": lines[0], "answer": "".join(lines[1:])})
    return records


def split_records(records, cfg):
    split = {s: [] for s in SPLITS}
    for r in records:
        split[split_of(r["prompt"], cfg.val_frac, cfg.test_frac)].append(r)
    for s in ("val", "test"):  # a small file still gets a held-out record in each
        if not split[s] and len(split["train"]) > 1:
            split[s].append(split["train"].pop())
    for s in ("val", "test"):  # ... and a training record
        if not split["train"] and len(split[s]) > 1:
            split["train"].append(split[s].pop())
    return split


def prepare(argv=()):
    cfg = configure(CustomConfig(), argv)
    if not cfg.input:
        raise ValueError("give the data file: python data/custom/prepare.py --input=my_data.jsonl "
                         "--name=mydata")
    if not os.path.isfile(cfg.input):
        raise FileNotFoundError(f"input file {cfg.input!r} not found")
    settings = dict(asdict(cfg), input_size=os.path.getsize(cfg.input),
                    input_mtime=os.path.getmtime(cfg.input))
    if is_prepared(cfg.name, settings):
        print(f"data/{cfg.name} is already prepared from {cfg.input}")
        return
    try:
        records = read_jsonl(cfg.input) if cfg.input.endswith(".jsonl") else read_text(cfg.input)
    except UnicodeDecodeError as e:
        raise ValueError(f"{cfg.input} is not UTF-8 text ({e.reason} at byte {e.start}): convert it "
                         f"first, e.g. iconv -f latin1 -t utf-8 {cfg.input} > utf8.txt") from None
    if len(records) < 3:
        raise ValueError(f"{cfg.input}: {len(records)} usable records; at least 3 are needed "
                         "(train, val and test)" + ("" if cfg.input.endswith(".jsonl") else
                         "; a text file needs paragraphs of two or more lines, blank lines between"))
    write_dataset(cfg.name, split_records(records, cfg), cfg.vocab_size, metric=cfg.metric,
                  source=f"prepared from {os.path.abspath(cfg.input)}", settings=settings,
                  gpt2_tokenizer=cfg.tokenizer == "gpt2")


if __name__ == "__main__":
    run(prepare)
