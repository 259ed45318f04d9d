# Tests of the settings (extras.configurator.configure): config files, --key=value, and the errors for bad settings.
# Run: python -m pytest -q tests/test_configurator.py
from dataclasses import dataclass, field

import pytest

from extras.configurator import configure


@dataclass
class Settings:
    out_dir: str = "out"
    lr: float = 1e-3
    max_iters: int = 100
    compile: bool = False
    ns: list = field(default_factory=lambda: [4, 8])


def test_overrides_from_file_then_command_line(tmp_path):
    f = tmp_path / "c.py"
    f.write_text("out_dir = 'run1'\nmax_iters = 5\n_private = 1\n")
    cfg = configure(Settings(), [str(f), "--max_iters=7", "--lr=1", "--compile=True", "--ns=[1, 2]"])
    assert cfg == Settings(out_dir="run1", lr=1.0, max_iters=7, compile=True, ns=[1, 2])
    assert configure(Settings(), []) == Settings()
    assert configure(Settings(), ["--compile"]).compile is True


@pytest.mark.parametrize("argv,match", [
    (["--max_iter=3"], "unknown setting 'max_iter' \\(did you mean 'max_iters'\\?\\)"),
    (["--max_iters=1.5"], "must be int"),
    (["--compile=1"], "must be bool"),
    (["--lr=fast"], "cannot read 'fast'"),
    (["--max_iters"], "--key=value"),
])
def test_bad_settings_are_errors(argv, match):
    with pytest.raises(ValueError, match=match):
        configure(Settings(), argv)


def test_missing_or_bad_config_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        configure(Settings(), [str(tmp_path / "nope.py")])
    f = tmp_path / "c.py"
    f.write_text("learning_rate = 0.1\n")
    with pytest.raises(ValueError, match="unknown setting 'learning_rate'"):
        configure(Settings(), [str(f)])


@pytest.mark.parametrize("text,match", [
    ("max_iters = 5\nlr = (1e-3\n", r"c.py, line 2: '\(' was never closed: lr = \(1e-3"),
    ("max_iters = 5\nlr = 1e-3 *\n", r"c.py, line 2: invalid syntax"),
    ("max_iters = 5\nlr = base_lr / 2\n",
     r"c.py, line 2: NameError: name 'base_lr' is not defined: lr = base_lr / 2"),
    ("import os\nmax_iters = int(os.environ['NOPE_X'])\n", r"c.py, line 2: KeyError: 'NOPE_X'"),
    ("max_iters = 1.5\n", r"c.py: setting 'max_iters' must be int, got 1.5"),
])
def test_a_config_file_that_does_not_parse_or_run(tmp_path, text, match):
    """An error that names the file and its line (and the line's text), not a traceback."""
    f = tmp_path / "c.py"
    f.write_text(text)
    with pytest.raises(ValueError, match=f"config file .*{match}"):
        configure(Settings(), [str(f)])
