"""What a newcomer's terminal shows: ``evoray demo --quick`` run as the console command, in a
shell with no RAY_* variables. Ray's notices that evoray has fixed the cause of (the token
banner, the high-memory warning of an actor that declared no memory) or filters (the core
worker's note on constructor arguments, Ray Data's notice that we turned its progress bars off)
are absent, while evoray's own warnings still reach the console."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

NOISE = ("Token authentication is enabled", "constructor arguments in the object store",
         "consider setting `memory=", "Progress bars disabled")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_demo_quick_console_has_no_ray_noise(tmp_path):
    run = tmp_path / "run"
    (run / "random" / "round_01").mkdir(parents=True)
    # a partial file of an interrupted run: the loop removes it with an evoray warning
    (run / "random" / "round_01" / "pool.jsonl.tmp-0123abcd").write_text("partial")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["HOME"] = str(tmp_path / "home")  # the token Ray generates stays in this test's folder
    evoray = Path(sys.executable).with_name("evoray")
    out = subprocess.run([str(evoray), "demo", "--quick", "--out", str(run)], env=env,
                         capture_output=True, text=True, timeout=840)
    assert out.returncode == 0, out.stderr[-3000:]
    console = out.stdout + out.stderr
    assert "[demo] report:" in out.stdout
    assert "a partial output left by an interrupted run" in out.stderr, out.stderr[-3000:]
    shown = [n for n in NOISE if n in console]
    assert not shown, f"{shown} on the console:\n{out.stderr[-3000:]}"
