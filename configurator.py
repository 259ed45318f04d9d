"""
Settings for the scripts, nanoGPT-style: defaults in one dataclass at the top of each script (the
one source of truth), overridden by config files and then by --key=value on the command line.

    python train.py config/train_arith_gpu.py --max_iters=2000 --compile=False
    python sample.py --jacobi                      # a bare --flag sets a True/False setting

A config file is plain Python that assigns some of the settings. Unknown keys and values of the
wrong type are errors that name the problem; nothing is silently ignored.
"""

import ast
import difflib
import os
import sys
from dataclasses import fields, replace


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


def configure(cfg, argv):
    """Return a copy of the dataclass instance cfg with config files and --key=value applied."""
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
    return cfg


def run(main):
    """Run a script's main(argv). A bad setting, a missing file or a bad input is reported in one
    line that says what to do, not in a traceback."""
    try:
        main(sys.argv[1:])
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
