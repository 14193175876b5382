"""`ray job submit` against a real local head node started (and stopped) by this test."""

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from evoray.data.features import read_features

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def _wait_until_jobs_accepted(address, env, ray_bin, proc, timeout=120.0):
    """The dashboard answers before the head's job agent is up ("No available agent to submit
    job"): wait for the API, then submit a no-op job until one is accepted."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("the Ray head node did not start accepting jobs")
        try:
            urllib.request.urlopen(f"{address}/api/version", timeout=2)
        except urllib.error.HTTPError:
            pass  # it answers (401 under token auth)
        except OSError:
            time.sleep(0.5)
            continue
        noop = subprocess.run([ray_bin, "job", "submit", "--address", address, "--", "true"],
                              env=env, capture_output=True, text=True, timeout=120)
        if noop.returncode == 0:
            return
        time.sleep(1)


@contextlib.contextmanager
def _head(tmp_path_factory, ports, **env_extra):
    """A head node on free ports; `--block` ties every Ray process to this process group, so
    teardown stops what this test started and nothing else (no `ray stop`)."""
    # The head and its jobs run this interpreter's environment, as if the venv were activated:
    # the job entrypoint says `python`, which must find ray and evoray.
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "RAY_AUTH_MODE": "disabled",
           "RAY_TMPDIR": str(tmp_path_factory.mktemp("ray")),
           "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", **env_extra}
    ray_bin = str(bin_dir / "ray")
    # Every component on its own free port: the integration tests' session Ray may already hold
    # the default agent ports (52365, ...), and a second head on them exits at once.
    names = ("port", "node-manager-port", "object-manager-port", "ray-client-server-port",
             "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
             "runtime-env-agent-port")
    dash, *free = ports(len(names) + 1)
    flags = [f"--{name}={port}" for name, port in zip(names, free, strict=True)]
    log = tmp_path_factory.mktemp("head") / "ray_start.log"
    with open(log, "w") as log_file:
        proc = subprocess.Popen(
            [ray_bin, "start", "--head", "--block", "--num-cpus=2", "--disable-usage-stats",
             f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1", "--include-dashboard=true",
             *flags],
            env=env, start_new_session=True, stdout=log_file, stderr=subprocess.STDOUT)
    address = f"http://127.0.0.1:{dash}"
    try:
        try:
            _wait_until_jobs_accepted(address, env, ray_bin, proc)
        except RuntimeError as e:
            raise RuntimeError(f"{e}; `ray start` printed:\n{log.read_text()[-3000:]}") from None
        yield {"address": address, "env": env, "ray": ray_bin}
    finally:
        # a graceful stop waits on agents and job supervisors (about 30 s here); every process
        # is in this group, with its files under this test's RAY_TMPDIR: end them at once
        with contextlib.suppress(ProcessLookupError):  # a head that failed to start has exited
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def head(tmp_path_factory, ports):
    """One head node for the module, with Ray's token authentication on (RAY_AUTH_MODE=token,
    the token in RAY_AUTH_TOKEN, and no ~/.ray/auth_token to fall back on): every job below is
    submitted with the token."""
    home = tmp_path_factory.mktemp("home")
    with _head(tmp_path_factory, ports, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32),
               HOME=str(home)) as h:
        yield h


def test_job_submission_with_token_auth(head, tmp_path):
    """A job submitted with the token runs evoray on the cluster; without it the head refuses
    it."""
    out = tmp_path / "task"
    cmd = [head["ray"], "job", "submit", "--address", head["address"], "--working-dir",
           str(ROOT), "--", "python", "jobs/make_task.py", "--task", "compare", "--pool-size",
           "200", "--generator", "strong", "--out", str(out)]
    ok = subprocess.run(cmd, env=head["env"], capture_output=True, text=True, timeout=240)
    assert ok.returncode == 0, ok.stdout[-2000:] + ok.stderr[-2000:]
    assert "pool checked on the cluster: 200 candidates" in ok.stdout
    no_token = {k: v for k, v in head["env"].items() if k != "RAY_AUTH_TOKEN"}
    refused = subprocess.run(cmd, env=no_token, capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0
    assert "token" in (refused.stdout + refused.stderr).lower()


def test_make_task_job(head, tmp_path):
    out = tmp_path / "task"
    result = subprocess.run(
        [head["ray"], "job", "submit", "--address", head["address"], "--working-dir", str(ROOT),
         "--", "python", "jobs/make_task.py", "--task", "compare", "--pool-size", "300",
         "--generator", "strong", "--out", str(out)],
        env=head["env"], capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "pool checked on the cluster: 300 candidates" in result.stdout
    assert {p.name for p in out.iterdir()} >= {"pool.jsonl", "targets.jsonl", "test.jsonl"}


def test_failing_job_exits_non_zero(head, tmp_path):
    result = subprocess.run(
        [head["ray"], "job", "submit", "--address", head["address"], "--working-dir", str(ROOT),
         "--", "python", "jobs/make_task.py", "--task", "nope", "--out", str(tmp_path / "x")],
        env=head["env"], capture_output=True, text=True, timeout=240)
    assert result.returncode != 0
    assert "unknown task 'nope'" in result.stdout + result.stderr


def test_evolve_job_writes_every_round(head, quick_run, quick_round_one):
    """The evolve job resumes the suite's reference run after its round 1 (``quick_round_one``)
    with ``jobs/configs/quick.yaml`` (the same settings): it skips round 1, writes round 2 on the
    cluster, and ends with the reference run's selections, features and metrics."""
    run, ref = quick_round_one, quick_run["run_dir"]
    result = subprocess.run(
        [head["ray"], "job", "submit", "--address", head["address"], "--working-dir", str(ROOT),
         "--", "python", "jobs/evolve.py", "jobs/configs/quick.yaml",
         f"evolve.run_dir={run}", "--resume"],
        env=head["env"], capture_output=True, text=True, timeout=540)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "succeeded" in result.stdout
    assert "[evolve] round_01/train: done earlier, skipped" in result.stdout
    assert "[evolve] round_02/train: done earlier" not in result.stdout
    for r in ("round_01", "round_02"):
        names = {p.name for p in (run / r).iterdir()}
        assert names >= {"pool.jsonl", "clean.jsonl", "features", "selection", "adapter",
                         "metrics.json"}, names
        assert (run / r / "selection" / "selected.jsonl").stat().st_size > 0
        assert (run / r / "adapter" / "adapter_model.safetensors").exists()
    ids = [pq.read_table(f"{d}/round_02/selection/selected.parquet")["id"].to_pylist()
           for d in (run, ref)]
    assert ids[0] == ids[1]
    for kind in ("pool", "targets"):
        got, want = (read_features(f"{d}/round_02/features/{kind}") for d in (run, ref))
        assert got.X.tobytes() == want.X.tobytes(), kind
    got = json.loads((run / "round_02" / "metrics.json").read_text())
    assert abs(got["accuracy"] - quick_run["rounds"][1]["accuracy"]) <= 1e-6
