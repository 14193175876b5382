"""The `evoray` command line: subcommands, outputs and one-line errors."""

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from evoray.cli import build_parser, main


def test_console_script_help_lists_subcommands():
    exe = shutil.which("evoray", path=str(Path(sys.executable).parent))
    assert exe, "the console script `evoray` is installed beside the interpreter"
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, check=True).stdout
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    names = [c.dest for c in sub._choices_actions]  # the subcommands, each with its help line
    assert len(names) >= 11 and {"tasks", "config", "demo", "evolve", "sweep"} <= set(names)
    listed = out.split("positional arguments:")[1]
    for action in sub._choices_actions:
        assert re.search(rf"^\s+{action.dest}\s+{re.escape(action.help[:20])}", listed, re.M), \
            action.dest


def test_tasks_list(capsys):
    assert main(["tasks", "list"]) == 0
    out = capsys.readouterr().out
    for name in ("arithmetic", "unit_conversion", "day_of_week", "compare", "weak", "strong"):
        assert name in out


def test_tasks_make_writes_every_file(tmp_path, capsys):
    out_dir = tmp_path / "task"
    rc = main(["tasks", "make", "--task", "day_of_week", "--pool-size", "300", "--generator",
               "strong", "--seed", "1", "--out", str(out_dir), "--format", "parquet"])
    assert rc == 0
    names = {p.name for p in out_dir.iterdir()}
    assert names == {"pool.parquet", "targets.parquet", "dev.parquet", "test.parquet",
                     "train.parquet", "task.json"}
    assert str(out_dir / "pool.parquet") in capsys.readouterr().out


@pytest.mark.parametrize("argv,part", [
    (["tasks", "make", "--task", "arith", "--out", "X"], "unknown task 'arith'; did you mean "
                                                          "'arithmetic'?"),
    (["tasks", "make", "--task", "compare", "--pool-size", "0", "--out", "X"],
     "pool size must be positive"),
    (["config", "select.ratoi=0.1"], "did you mean 'select.ratio'"),
    (["config", "select.ratio=0"], "select.ratio: 0.0 is out of range"),
    (["config", "train.epochs=two"], "train.epochs: wrong type str"),
    (["config", "missing.yaml"], "missing.yaml: no such file"),
])
def test_errors_are_one_line(tmp_path, monkeypatch, capsys, argv, part):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("evoray: error: ") and part in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "X").exists()


def test_debug_shows_the_exception():
    from evoray.errors import ConfigError

    with pytest.raises(ConfigError):
        main(["--debug", "config", "select.ratio=0"])


def test_config_prints_resolved_yaml(tmp_path, capsys):
    path = tmp_path / "job.yaml"
    path.write_text("select:\n  method: tsds\n")
    assert main(["config", str(path), "select.ratio=0.05"]) == 0
    out = capsys.readouterr().out
    assert "method: tsds" in out and "ratio: 0.05" in out
