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
