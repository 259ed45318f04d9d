"""
Settings for the scripts, nanoGPT-style: defaults in one dataclass at the top of each script (the
one source of truth), overridden by config files and then by --key=value on the command line.

    python train.py config/train_arith_gpu.py --max_iters=2000 --compile=False
    python sample.py --jacobi                      # a bare --flag sets a True/False setting

A config file is plain Python that assigns some of the settings. Unknown keys, values of the
wrong type, a value outside a setting's choices (a Literal type) and a count below its least
value (AT_LEAST, shared by every script) are errors that name the problem, raised before anything
expensive runs; nothing is silently ignored.
"""

import ast
import difflib
import os
import sys
from dataclasses import fields, replace
from typing import Literal, get_args, get_origin

# The least value of a setting, by name, in every script that has it (for a list, of each item).
AT_LEAST = dict(n=1, ns=1, max_new_tokens=0, traj_max_new_tokens=0, num_prompts=1, num_samples=1,
                collect_batch=1, batch_size=1, states_per_block=1, noise_window=1, eval_interval=1,
                log_interval=1, eval_iters=1, eval_prompts=0, val_prompts=0, final_prompts=0,
                max_iters=0, warmup_iters=0, lr_decay_iters=0, repeat_limit=2, warmup=0, threads=0,
                n_layer=1, n_head=1, n_embd=1, block_size=0, vocab_size=257, num_train=3,
                num_val=1, num_test=1, learning_rate=0.0, min_lr=0.0, weight_decay=0.0,
                grad_clip=0.0, dropout=0.0, ar_weight=0.0, label_smoothing=0.0, val_frac=0.0,
                test_frac=0.0, grad_accum=1, max_epochs=0.0, max_loss_rise=0.0, max_quality_drop=0.0,
                max_repeat_rise=0.0, guard_patience=0, blocks=0, horizon=0)


def _unknown(key, cfg):
    names = [f.name for f in fields(cfg)]
    close = difflib.get_close_matches(key, names, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ValueError(f"unknown setting {key!r}{hint}; the settings are: {', '.join(names)}")


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
    """Every setting within its choices and its least value (see the module docstring)."""
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if get_origin(f.type) is Literal and value not in get_args(f.type):
            raise ValueError(f"{f.name} must be one of {', '.join(map(repr, get_args(f.type)))}, "
                             f"got {value!r}")
        least = AT_LEAST.get(f.name)
        for v in (value if isinstance(value, list) else [value]):
            if least is not None and not (isinstance(v, (int, float)) and v >= least):
                raise ValueError(f"{f.name} must be at least {least}, got {value!r}")
    return cfg


def configure(cfg, argv):
    """Return a copy of the dataclass instance cfg with config files and --key=value applied,
    checked (check)."""
    for arg in argv:
        if not arg.startswith("--"):
            if not os.path.isfile(arg):
                raise FileNotFoundError(f"config file {arg!r} not found (settings look like "
                                        "--key=value; config files live in config/)")
            scope = {}
            with open(arg) as f:
                exec(f.read(), scope)
            for key, value in scope.items():
                if key.startswith("_") or callable(value) or type(value).__name__ == "module":
                    continue  # __builtins__, imports and helper functions are not settings
                if not hasattr(cfg, key):
                    raise _unknown(key, cfg)
                cfg = replace(cfg, **{key: _typed(key, value, getattr(cfg, key))})
        else:
            key, eq, text = arg[2:].partition("=")
            if not hasattr(cfg, key):
                raise _unknown(key, cfg)
            if not eq and not isinstance(getattr(cfg, key), bool):
                raise ValueError(f"{arg!r}: write settings as --key=value")
            value = _parse_value(key, text, getattr(cfg, key)) if eq else True  # --flag: True
            cfg = replace(cfg, **{key: value})
    return check(cfg)


def run(main):
    """Run a script's main(argv). A bad setting, a missing file or a bad input is reported in one
    line that says what to do, not in a traceback. Output is line-buffered, so that progress
    shows at once also when it goes to a pipe or a file (python train_cllm.py | tee log)."""
    sys.stdout.reconfigure(line_buffering=True)
    try:
        main(sys.argv[1:])
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
