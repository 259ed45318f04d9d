"""
arith: grade-school word problems with worked, step-by-step solutions, our offline analogue of
GSM8K. Each solution ends with a line `#### <answer>`; accuracy = the final answer of a generation
equals the true one.

    python data/arith/prepare.py                     # ~50k train, 500 val, 500 test problems
    python data/arith/prepare.py --num_train=2000    # a small slice

Problems come from templates (add, subtract, multiply, divide with whole results, compare), with
varied names, objects and numbers. The numbers are kept easy (sums below 200, one-digit factors,
subtractions that never borrow) so that a ~1M-parameter model learns the arithmetic on a laptop
CPU in minutes; each solution still has two or three worked steps, some 40 tokens, for Jacobi
decoding to work on.
"""

import os
import random
import sys
from dataclasses import asdict, dataclass
from typing import Literal

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))  # run from anywhere

from common import run
from data.common import is_prepared, split_of, write_dataset
from data.tokenizer import GPT2_PATTERN, SPLIT_PATTERN
from extras.configurator import configure


@dataclass
class ArithConfig:
    num_train: int = 50000   # training problems (pretraining text and distillation prompts)
    num_val: int = 500       # val problems (evaluations along the way)
    num_test: int = 500      # test problems (the held-out tables)
    vocab_size: int = 1024   # BPE vocabulary, end-of-text token included
    digits: Literal["single", "grouped"] = "single"  # "single": every digit its own token; "grouped": GPT-2's split
    seed: int = 1337         # the problems drawn: the same seed, the same data and tokenizer
    name: str = "arith"      # written to data/<name>/


NAMES = ["Ava", "Ben", "Cara", "Dan", "Ella", "Finn", "Gina", "Hugo", "Ivy", "Jack", "Kira",
         "Leo", "Mia", "Nate", "Olga", "Paul", "Quinn", "Rosa", "Sam", "Tara", "Umar", "Vera",
         "Will", "Xena", "Yusuf", "Zoe", "Omar", "Lena", "Raj", "Nora"]
OBJECTS = ["apples", "marbles", "stickers", "pencils", "books", "cookies", "shells", "cards",
           "coins", "stamps", "candies", "balloons", "buttons", "crayons", "eggs", "flowers",
           "toy cars", "beads", "lemons", "rocks", "ribbons", "muffins", "nuts", "feathers"]


def smaller_without_borrow(r, total):
    """A number in [1, total) whose every digit is at most total's: total - it never borrows.
    None for 10, 100, ..: they have no such number."""
    if str(total).strip("0") == "1":
        return None
    while True:
        z = int("".join(str(r.randint(0, int(d))) for d in str(total)))
        if 0 < z < total:
            return z


def buy_and_give(r, a, b, obj):
    x, y = r.randint(5, 60), r.randint(2, 40)
    z = smaller_without_borrow(r, x + y)
    if z is None:
        return None
    q = (f"{a} has {x} {obj}. {a} buys {y} more {obj} and then gives {z} {obj} to {b}. "
         f"How many {obj} does {a} have now?")
    s = (f"{a} starts with {x} {obj}.\nAfter buying {y} more, {a} has {x} + {y} = {x + y}.\n"
         f"After giving {z} to {b}, {a} has {x + y} - {z} = {x + y - z}.")
    return q, s, x + y - z


def boxes(r, a, b, obj):
    k, m, x = r.randint(2, 9), r.randint(2, 9), r.randint(1, 30)
    q = (f"{a} has {k} boxes of {obj}. Each box holds {m} {obj}. {a} also has {x} loose {obj}. "
         f"How many {obj} does {a} have in all?")
    s = (f"{k} boxes of {m} {obj} make {k} * {m} = {k * m}.\n"
         f"With the {x} loose {obj}, {a} has {k * m} + {x} = {k * m + x}.")
    return q, s, k * m + x


def share(r, a, b, obj):
    k, each, x = r.randint(2, 9), r.randint(2, 9), r.randint(1, 30)
    t = k * each
    q = (f"{a} has {t} {obj} and shares them equally among {k} friends. Then each friend finds "
         f"{x} more {obj}. How many {obj} does each friend have now?")
    s = (f"Each friend gets {t} / {k} = {each}.\n"
         f"After finding {x} more, each friend has {each} + {x} = {each + x}.")
    return q, s, each + x


def compare(r, a, b, obj):
    x, y = r.randint(5, 50), r.randint(5, 50)
    z = smaller_without_borrow(r, x + y)
    if z is None:
        return None
    q = (f"{a} collects {x} {obj} in the morning and {y} {obj} in the afternoon. {b} collects "
         f"{z} {obj}. How many more {obj} does {a} have than {b}?")
    s = (f"{a} collects {x} + {y} = {x + y} {obj}.\n"
         f"{a} has {x + y} - {z} = {x + y - z} more than {b}.")
    return q, s, x + y - z


def together(r, a, b, obj):
    x, y = r.randint(3, 50), r.randint(2, 40)
    q = (f"{a} has {x} {obj}. {b} has {y} more {obj} than {a}. "
         f"How many {obj} do they have together?")
    s = (f"{b} has {x} + {y} = {x + y} {obj}.\n"
         f"Together they have {x} + {x + y} = {x + x + y}.")
    return q, s, x + x + y


def weekly(r, a, b, obj):
    k, m = r.randint(2, 9), r.randint(3, 9)
    y = smaller_without_borrow(r, k * m)
    if y is None:
        return None
    q = (f"{a} makes {m} {obj} every day for {k} days, then gives {y} of them to {b}. "
         f"How many {obj} does {a} keep?")
    s = (f"In {k} days {a} makes {k} * {m} = {k * m} {obj}.\n"
         f"After giving {y} to {b}, {a} keeps {k * m} - {y} = {k * m - y}.")
    return q, s, k * m - y


TEMPLATES = [buy_and_give, boxes, share, compare, together, weekly]


def make_problem(r):
    """One record: prompt = the question and 'Answer:', answer = the worked solution."""
    problem = None
    while problem is None:  # a template returns None for numbers it cannot use: draw again
        a, b = r.sample(NAMES, 2)
        problem = r.choice(TEMPLATES)(r, a, b, r.choice(OBJECTS))
    question, steps, result = problem
    return {"prompt": f"Question: {question}\nAnswer:\n", "answer": f"{steps}\n#### {result}"}


def make_records(cfg):
    """Draw problems until every split is full; a question never lands in two splits."""
    r = random.Random(cfg.seed)
    want = {"train": cfg.num_train, "val": cfg.num_val, "test": cfg.num_test}
    total = sum(want.values())
    records, seen = {s: [] for s in want}, set()
    while any(len(records[s]) < want[s] for s in want):
        rec = make_problem(r)
        if rec["prompt"] in seen:
            continue
        seen.add(rec["prompt"])
        split = split_of(rec["prompt"], cfg.num_val / total, cfg.num_test / total)
        if len(records[split]) < want[split]:
            records[split].append(rec)
    return records


def prepare(argv=()):
    cfg = configure(ArithConfig(), argv)
    settings = asdict(cfg)
    if is_prepared(cfg.name, settings):
        print(f"data/{cfg.name} is already prepared with these settings")
        return
    records = make_records(cfg)
    pattern = SPLIT_PATTERN if cfg.digits == "single" else GPT2_PATTERN
    write_dataset(cfg.name, records, cfg.vocab_size, metric="accuracy", pattern=pattern,
                  source=f"generated by data/arith/prepare.py from {len(TEMPLATES)} templates",
                  settings=settings)


if __name__ == "__main__":
    run(prepare)
