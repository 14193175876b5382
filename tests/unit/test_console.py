"""The console filter of the ``evoray`` command (:func:`evoray.ray_utils.filter_stderr`): Ray's
C++ notices with no cause to fix are dropped at the file-descriptor level; everything else,
Python's warnings included, reaches the console whole and in order."""

import subprocess
import sys

import pytest

SCRIPT = r"""
import logging, os, sys
from evoray.ray_utils import NOISE, filter_stderr
filter_stderr()
os.write(2, b"[E core_worker.cc:1] Actor 'A' " + NOISE[0].encode() + b". See the issue.\n")
os.write(2, b"kept line 1\npartial ")
os.write(2, b"tail\rbar 50%\r")
logging.basicConfig()
logging.getLogger("evoray").warning("an evoray warning")
os.write(2, b"x " + NOISE[0].encode() + b"\nlast without newline")
"""


@pytest.mark.timeout(60)
def test_filter_stderr_drops_only_ray_noise():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stderr.decode() == ("kept line 1\npartial tail\rbar 50%\r"
                                   "WARNING:evoray:an evoray warning\nlast without newline")


def test_console_filters_spare_the_ray_data_log(tmp_path):
    """Ray Data's console handlers lose its errors (CLI without --debug) and the idle notices;
    its file handler, ray-data.log, keeps both (a FileHandler is a StreamHandler too)."""
    import io
    import logging

    import ray.data  # noqa: F401  (its import sets up the "ray.data" logger's own handlers)

    from evoray import ray_utils

    logger = logging.getLogger("ray.data")
    stream = io.StringIO()
    console = logging.StreamHandler(stream)
    log_file = logging.FileHandler(tmp_path / "ray-data.log")
    logger.addHandler(console)
    logger.addHandler(log_file)
    level = logger.level
    try:
        ray_utils._drop_console_errors()
        ray_utils.quiet_ray_data()
        ray_utils._drop_console_errors()  # idempotent
        assert sum(isinstance(f, ray_utils._BelowError) for f in console.filters) == 1
        logger.error("task failed: boom")
        logger.warning("Progress bars disabled. To enable, set ...")
        logger.warning("Operator uses more memory than declared")
    finally:
        logger.removeHandler(console)
        logger.removeHandler(log_file)
        logger.setLevel(level)
        log_file.close()
    shown = stream.getvalue()
    assert "boom" not in shown and "Progress bars" not in shown
    assert "more memory" in shown
    kept = (tmp_path / "ray-data.log").read_text()
    assert "boom" in kept and "Progress bars" in kept and "more memory" in kept
