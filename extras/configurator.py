"""
Extra (a learner may skip it): the settings of the scripts, nanoGPT-style. Defaults live in one
dataclass at the top of each script, the one source of truth, overridden by config files (plain
Python in config/) and then by --key=value:

    python train.py config/train_arith_gpu.py --max_iters=2000 --compile=False
    python sample.py --jacobi                      # a bare --flag sets a True/False setting
    python train_cllm.py --help                    # every setting, its default and its meaning

Unknown keys, values of the wrong type, a value outside a setting's choices (a Literal type) or
its range (AT_LEAST, BELOW) and a config file that does not parse or run are errors that name the
problem, raised before anything expensive runs. train.py and train_cllm.py then check them against
the model and the data (train.py's check_settings, check_cllm_settings here).
"""

import ast
import difflib
import inspect
import os
import re
import sys
import traceback
from dataclasses import asdict, fields, replace
from typing import Literal, get_args, get_origin

from common import check_context

# The least value of a setting, by name, in every script that has it (for a list, of each item).
AT_LEAST = dict(n=1, decode_n=0, ns=1, max_new_tokens=0, traj_max_new_tokens=0, num_prompts=1, num_samples=1,
                collect_batch=1, batch_size=1, states_per_block=0, noise_window=1, eval_interval=1,
                log_interval=1, eval_iters=1, val_prompts=0, test_prompts=0, max_iters=0,
                warmup_iters=0, lr_decay_iters=0, repeat_limit=2, warmup=0, threads=0, n_layer=1,
                n_head=1, n_embd=1, block_size=0, vocab_size=257, num_train=3, num_val=1, num_test=1,
                learning_rate=0.0, min_lr=0.0, weight_decay=0.0, grad_clip=0.0, dropout=0.0,
                ar_weight=0.0, label_smoothing=0.0, val_frac=0.0, test_frac=0.0, grad_accum=1,
                max_epochs=0.0, max_loss_rise=0.0, max_quality_drop=0.0, max_repeat_rise=0.0,
                guard_patience=0, blocks=0, horizon=0, patience=0, max_chars=1, max_files=0)
# Settings that must stay below a bound: probabilities and fractions.
BELOW = dict(dropout=1.0, label_smoothing=1.0, val_frac=1.0, test_frac=1.0)


# ----------------------------------------------------------------------------------------------
# settings

def _unknown(key, cfg):
    names = [f.name for f in fields(cfg)]
    close = difflib.get_close_matches(key, names, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ValueError(f"unknown setting {key!r}{hint}; --help lists the settings")


def _typed(key, value, default):
    """value, checked against the type of the default (ints are accepted where floats are)."""
    kind = type(default)
    if kind is float and type(value) is int:
        value = float(value)
    if default is not None and type(value) is not kind:
        raise ValueError(f"setting {key!r} must be {kind.__name__}, got {value!r} "
                         f"({type(value).__name__})")
    return value


def _parse_value(key, text, default):
    if isinstance(default, str):
        return text  # strings need no quotes on the command line
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        raise ValueError(f"setting {key!r}: cannot read {text!r} as a Python literal") from None
    return _typed(key, value, default)


def check(cfg):
    """Every setting within its choices and its range (AT_LEAST, or the config class's own
    AT_LEAST where one setting means more there: sample.py's n = 0, the checkpoint's own n)."""
    at_least = {**AT_LEAST, **getattr(cfg, "AT_LEAST", {})}
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if get_origin(f.type) is Literal and value not in get_args(f.type):
            raise ValueError(f"{f.name} must be one of {', '.join(map(repr, get_args(f.type)))}, "
                             f"got {value!r}")
        least = at_least.get(f.name)
        for v in (value if isinstance(value, list) else [value]):
            if least is not None and not (isinstance(v, (int, float)) and v >= least):
                raise ValueError(f"{f.name} must be at least {least}, got {value!r}")
        if f.name in BELOW and not value < BELOW[f.name]:
            raise ValueError(f"{f.name} must be below {BELOW[f.name]}, got {value!r}")
    return cfg


def read_config_file(path):
    """The names a config file assigns. A file that does not parse or run is an error that names
    its line; a config file is plain Python: `name = value` lines."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path!r} not found (settings look like "
                                "--key=value; config files live in config/)")
    try:
        with open(path, encoding="utf-8") as f:
            code = compile(f.read(), path, "exec")
    except UnicodeDecodeError:
        raise ValueError(f"config file {path} is not UTF-8 text") from None
    except SyntaxError as e:
        raise ValueError(f"config file {path}, line {e.lineno}: {e.msg}: "
                         f"{(e.text or '').strip()}") from None
    scope = {}
    try:
        exec(code, scope)
    except Exception as e:
        frame = [f for f in traceback.extract_tb(e.__traceback__) if f.filename == path][-1]
        raise ValueError(f"config file {path}, line {frame.lineno}: {type(e).__name__}: {e}: "
                         f"{frame.line}") from None
    return scope


def settings_help(cfg):
    """The settings of a config dataclass with their defaults and meanings, read from the comments
    of its source: the dataclass is the one place where a setting is described."""
    lines, field_line = [], re.compile(r"^    (\w+): [^=]+= (.*?)(?:\s+# (.*))?$")
    for line in inspect.getsource(type(cfg)).splitlines()[1:]:
        m = field_line.match(line)
        if m:
            lines.append(f"  --{m.group(1)}={getattr(cfg, m.group(1))!r}".ljust(34)
                         + (f" {m.group(3)}" if m.group(3) else ""))
        elif line.strip().startswith("#") and line.startswith(" " * 5) and lines:
            lines[-1] += " " + line.strip()[2:]  # a comment continued on the next line
        elif line.strip().startswith("#"):
            lines.append(line.strip()[2:])  # a group heading
        elif line.strip().startswith('"""'):
            lines.append(line.strip().strip('"'))
    return "\n".join(lines)


def configure(cfg, argv):
    """A copy of the dataclass instance cfg with config files and --key=value applied, checked.
    --help prints the settings and exits."""
    if "--help" in argv or "-h" in argv:
        print(f"{os.path.basename(sys.argv[0])} [config file ...] [--key=value ...]; the settings "
              f"and their defaults:\n{settings_help(cfg)}")
        sys.exit(0)
    for arg in argv:
        if not arg.startswith("--"):
            for key, value in read_config_file(arg).items():
                if key.startswith("_") or callable(value) or type(value).__name__ == "module":
                    continue  # __builtins__, imports and helper functions are not settings
                if not hasattr(cfg, key):
                    raise ValueError(f"config file {arg}: {_unknown(key, cfg)}")
                try:
                    cfg = replace(cfg, **{key: _typed(key, value, getattr(cfg, key))})
                except ValueError as e:
                    raise ValueError(f"config file {arg}: {e}") from None
        else:
            key, eq, text = arg[2:].partition("=")
            if not hasattr(cfg, key):
                raise _unknown(key, cfg)
            if not eq and not isinstance(getattr(cfg, key), bool):
                raise ValueError(f"{arg!r}: write settings as --key=value")
            value = _parse_value(key, text, getattr(cfg, key)) if eq else True  # --flag: True
            cfg = replace(cfg, **{key: value})
    return check(cfg)


def note_changed_settings(saved, cfg):
    """On resume, say which settings differ from the checkpoint's (the run continues exactly only
    when those that shape training, such as the schedule and batch size, are the same)."""
    changed = {k: (saved.get(k), v) for k, v in asdict(cfg).items() if saved.get(k) != v}
    changed.pop("init_from", None)
    if changed:
        print(f"resuming with settings that differ from the checkpoint's (saved, now): {changed}")


def check_cllm_settings(cfg, meta, context, say=print):
    """train_cllm.py's settings against what the target's context and the data allow, checked
    before any work: each failure is an error that says what to change."""
    if cfg.val_prompts < 1:
        raise ValueError("val_prompts must be at least 1: the guard chooses the CLLM by them")
    for name, setting in (("n", "traj_max_new_tokens"), ("decode_n", "max_new_tokens")):
        n, decoded = getattr(cfg, name), getattr(cfg, setting)
        if n > decoded:
            raise ValueError(f"a Jacobi block of {name}={n} tokens is longer than the {decoded} tokens "
                             f"decoded per prompt ({setting}): no block would be full; use --{name}={decoded} "
                             "or less")
    longest = max(cfg.traj_max_new_tokens, cfg.max_new_tokens)
    check_context(meta, context, longest, f"the target's context of {context} tokens",
                  "train a target with a larger --block_size (python train.py)", say,
                  setting="traj_max_new_tokens" if longest > cfg.max_new_tokens else "max_new_tokens")
