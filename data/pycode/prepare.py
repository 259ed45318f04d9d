"""
pycode: real Python, our analogue of Code-Search-Net Python. Functions with a docstring from the
standard library of the running CPython (read from its source files on disk; tests, IDLE's tests
and site-packages are skipped). Prompt = signature + docstring, answer = the body.

    python data/pycode/prepare.py

Records are split by source file (5% of the files val, 5% test), so held-out functions come from
modules the model never saw. The pretraining streams hold the records and, after them, the whole
source files of their split. Quality: held-out loss, and the fraction of generated bodies that
parse (`ast`) when appended to their prompt.
"""

import ast
import os
import platform
import sys
import sysconfig
import textwrap
from dataclasses import asdict, dataclass

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))  # run from anywhere

from common import run
from data.common import is_prepared, split_of, write_dataset
from extras.configurator import configure


@dataclass
class PycodeConfig:
    vocab_size: int = 2048     # BPE vocabulary, end-of-text token included
    max_chars: int = 3000      # longer functions are left out
    max_files: int = 0         # 0: every file; else the first N (sorted), for a quick slice
    val_frac: float = 0.05     # share of the records for val
    test_frac: float = 0.05    # share of the records for test
    name: str = "pycode"       # written to data/<name>/


SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__",
             "_vendor", "ensurepip"}


def stdlib_files(root):
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        files += [os.path.join(dirpath, f) for f in sorted(filenames)
                  if f.endswith(".py") and not f.startswith("test_")]
    return sorted(files)


def functions(source):
    """(prompt, answer) for every function with a docstring and a body in a module's source."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return
    lines = source.splitlines(keepends=True)
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        if ast.get_docstring(node) is None or len(node.body) < 2:
            continue
        head = lines[node.lineno - 1:node.body[0].end_lineno]  # def line .. end of docstring
        body = lines[node.body[0].end_lineno:node.end_lineno]
        text = textwrap.dedent("".join(head + body)).splitlines(keepends=True)  # methods too
        prompt, answer = "".join(text[:len(head)]), "".join(text[len(head):])
        try:
            ast.parse(prompt + answer)
        except SyntaxError:
            continue  # e.g. dedent could not remove a method's indentation
        yield prompt, answer


def make_records(cfg, root):
    files = stdlib_files(root)
    if cfg.max_files:
        files = files[:cfg.max_files]
    records = {"train": [], "val": [], "test": []}
    whole_files = {"train": [], "val": [], "test": []}
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as f:
            source = f.read()
        split = split_of(os.path.relpath(path, root), cfg.val_frac, cfg.test_frac)
        whole_files[split].append(source)
        for prompt, answer in functions(source):
            if len(prompt) + len(answer) <= cfg.max_chars and answer.strip():
                records[split].append({"prompt": prompt, "answer": answer})
    return records, whole_files, len(files)


def prepare(argv=()):
    cfg = configure(PycodeConfig(), argv)
    root = sysconfig.get_paths()["stdlib"]
    settings = dict(asdict(cfg), python=platform.python_version())
    if is_prepared(cfg.name, settings):
        print(f"data/{cfg.name} is already prepared with these settings")
        return
    records, whole_files, n_files = make_records(cfg, root)
    if not all(records.values()):
        raise ValueError(f"too few files for every split ({ {k: len(v) for k, v in records.items()} }): "
                         "raise max_files")
    write_dataset(cfg.name, records, cfg.vocab_size, metric="parse", settings=settings,
                  extra_text={"train": whole_files["train"], "val": whole_files["val"]},
                  source=f"functions with docstrings from {n_files} files of the CPython "
                         f"{platform.python_version()} standard library at {root}")


if __name__ == "__main__":
    run(prepare)
