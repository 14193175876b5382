"""The README's local-head recipe, run as a user pastes it: the ```bash block after the
``<!-- local-head recipe -->`` marker, from the repository root, in a shell that has the venv on
its PATH and no RAY_* variables (the recipe's own ``export RAY_AUTH_MODE=token`` is the only
one). Only the ports are substituted, for free ones. HOME, RAY_TMPDIR and TMPDIR point into this
test's temporary folders, so the token the recipe generates (``~/.ray/auth_token``), the head's
session files and the job's ``$(mktemp -d)`` run folder stay there.

The recipe ends with ``ray stop``, which ends every Ray process on the machine, not only the
recipe's head: the suite's own local Ray is stopped first and started again afterwards, and the
test is skipped when any other Ray process is running."""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[2]
MARKER = "<!-- local-head recipe -->"
PORTS = ("6379", "8265")  # the GCS and the dashboard (job API) ports the README uses

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def readme_recipe() -> str:
    """The ```bash block that follows the marker in README.md."""
    text = (ROOT / "README.md").read_text()
    assert MARKER in text, f"README.md has no {MARKER!r}"
    block = re.match(r"\s*```bash\n(.*?)\n```", text.split(MARKER, 1)[1], re.S)
    assert block, f"no ```bash block right after {MARKER!r}"
    return block.group(1) + "\n"


def _ray_processes(contains: str = "") -> list[psutil.Process]:
    """The processes `ray stop` would end, by its own rule: a keyword of Ray's RAY_PROCESSES in
    the process name or in its command line (Ray has no public API for that list); with
    ``contains``, only those whose command line holds that string."""
    from ray.autoscaler._private.constants import RAY_PROCESSES

    found = []
    for proc in psutil.process_iter(["name", "cmdline"]):
        try:
            name, args = proc.name(), subprocess.list2cmdline(proc.cmdline())
        except psutil.Error:
            continue
        if proc.pid != os.getpid() and contains in args and any(
                keyword in (name if by_name else args) for keyword, by_name in RAY_PROCESSES):
            found.append(proc)
    return found


def _wait_for_no_ray(seconds: float) -> list[psutil.Process]:
    deadline = time.monotonic() + seconds
    while (left := _ray_processes()) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


def test_readme_local_head_recipe(request, tmp_path, tmp_path_factory, ports):
    recipe = readme_recipe()
    for port, free in zip(PORTS, ports(len(PORTS)), strict=True):
        assert re.search(rf"\b{port}\b", recipe), f"the recipe no longer names port {port}"
        recipe = re.sub(rf"\b{port}\b", str(free), recipe)
    submission = re.search(r"--submission-id[ =](\S+)", recipe)
    assert submission, "the recipe's job has no --submission-id for `ray job status`"
    (tmp_path / "recipe.sh").write_text(recipe)

    import ray

    restart = request.getfixturevalue("restart_ray") if ray.is_initialized() else None
    if restart is not None:
        ray.shutdown()  # the suite's Ray: the recipe's `ray stop` would end it anyway
    ray_tmp = tmp_path_factory.mktemp("ray")  # short: Ray's socket paths live under it
    try:
        others = _wait_for_no_ray(20)
        if others:
            pytest.skip("`ray stop` would end Ray processes this test did not start: "
                        + ", ".join(f"{p.pid} {p.name()}" for p in others))
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
                   HOME=str(tmp_path / "home"), RAY_TMPDIR=str(ray_tmp),
                   TMPDIR=str(tmp_path / "tmp"), RAY_USAGE_STATS_ENABLED="0")
        for folder in ("home", "tmp"):
            (tmp_path / folder).mkdir()
        start = time.monotonic()
        result = subprocess.run(["bash", "-e", str(tmp_path / "recipe.sh")], cwd=ROOT, env=env,
                                capture_output=True, text=True, timeout=480)
        seconds = time.monotonic() - start
        out = result.stdout + result.stderr
        assert result.returncode == 0, out[-6000:]
        # `ray job submit` waits for the job and `ray job status` reports it: both say succeeded
        assert out.count(f"Job '{submission.group(1)}' succeeded") == 2, out[-6000:]
        metrics = list((tmp_path / "tmp").glob("*/*/round_01/metrics.json"))
        assert len(metrics) == 1, out[-4000:]
        assert (metrics[0].parent.parent / "manifest.json").exists()
        assert (tmp_path / "home" / ".ray" / "auth_token").exists()
        left = _wait_for_no_ray(10)
        assert not left, f"`ray stop` left {[(p.pid, p.name()) for p in left]}"
        print(f"README local-head recipe: {seconds:.0f} s")
    finally:
        for proc in _ray_processes(contains=str(ray_tmp)):  # only what the recipe started
            proc.kill()
        if restart is not None:
            restart()
