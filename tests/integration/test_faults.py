"""Fault tests: things die or fill up, and evoray either recovers or fails cleanly.

The matrix (issue "Reliability and security"):

1. A feature actor is SIGKILLed mid-``featurize``, right after its first batch (this process
   is the Ray Data driver: a wrapped executor callback sees the batch finish and kills the
   actor's process, found in the GCS actor table): Ray Data restarts it and retries the batches
   in flight (``ActorPoolStrategy`` actors get ``max_restarts=-1`` and ``max_task_retries=-1``
   by default in Ray 2.60, so ``featurize`` sets nothing), and the features are bit-identical
   to the undisturbed ones of the suite's reference run (``quick_run``).
2. A training worker dies: ``tests/integration/test_train_ray.py::
   test_worker_failure_resumes_from_step_checkpoint`` (Train restarts the worker group from the
   last step checkpoint and ends with the adapter of an uninterrupted run); not repeated here.
3. The ``evoray evolve`` driver (a subprocess with a local Ray of its own) is SIGKILLed three
   times, at ``EVORAY_KILL_AT`` points: during round 2's features (once a features folder is
   being written), right after round 2's selection is recorded, and during round 2's training
   (after its first optimizer step); round 1 is copied from ``quick_run``. Each time
   ``--resume`` goes on; the run ends with the selections, features and metrics of
   ``quick_run``, and nothing partial is left anywhere.
4. The ``evoray sweep`` driver (``tune_configs/quick.yaml``, cut down to 2 trials run one at a
   time) is SIGKILLed once Tune has saved its first trial as finished; ``--resume`` finishes
   the sweep without running that trial again (``trials/*/attempts.json``).
5. The disk fills during a write (an injected ``OSError(ENOSPC)`` from the filesystem's output
   stream, after part of the bytes): features folders, a selection through ``evoray select`` and
   the manifest through ``evoray evolve`` fail, non-zero through the CLI, with no partial file
   under a final name and earlier outputs unchanged.

Processes of a killed driver: its Ray's GCS server, raylet and workers exit with it (fate
sharing). Ray's two agent processes (``ray::DashboardAgent``, ``ray::RuntimeEnvAgent``) notice
the raylet's death but first try to report it to the dead GCS, and linger for about a minute and
a half before exiting by themselves; the tests allow those two, and kill them.
"""

from __future__ import annotations

import errno
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from evoray.config import dump_config
from evoray.data.features import read_features, write_features
from evoray.demo import demo_config
from evoray.faults import KILL_ENV
from evoray.stages import Manifest

REPO = Path(__file__).resolve().parents[2]
QUICK_SWEEP = str(REPO / "tune_configs" / "quick.yaml")
AGENTS = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")
TEMPORARY = re.compile(r"\.tmp-[0-9a-f]{8}$")


# -- helpers --------------------------------------------------------------------------------

def _marked(marker: str) -> dict[int, str]:
    """Live processes whose environment holds ``marker`` (a driver and all it started): pid →
    command line. Zombies have an empty environment and are not listed."""
    found = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if marker.encode() not in f.read():
                    continue
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                found[int(pid)] = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
    return found


def _left_behind(marker: str, grace: float = 30.0) -> dict[int, str]:
    """Wait up to ``grace`` s for every process of a dead driver's Ray to exit, except Ray's
    agents (see the module docstring); kill whatever is still there and return what was left
    besides the agents."""
    deadline = time.monotonic() + grace
    while True:
        procs = _marked(marker)
        others = {p: c for p, c in procs.items() if not c.startswith(AGENTS)}
        if not others or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    for pid in procs:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return others


class Driver:
    """``python -m evoray.cli ...`` in a session of its own, with a Ray of its own: a private
    short ``RAY_TMPDIR`` (so it neither finds nor joins another local Ray), no ``RAY_ADDRESS``,
    token auth off, and a marker in its environment to find every process it starts."""

    def __init__(self, tmp: str):
        self.tmp = tmp
        self.marker = f"EVORAY_FAULT_TEST_{uuid.uuid4().hex}"

    def env(self, extra: dict | None = None) -> dict:
        env = {k: v for k, v in os.environ.items()
               if k not in ("RAY_ADDRESS", KILL_ENV, "EVORAY_FAIL_AFTER")}
        env.update(RAY_AUTH_MODE="disabled", RAY_TMPDIR=self.tmp, PYTHONUNBUFFERED="1",
                   EVORAY_FAULT_MARKER=self.marker, **(extra or {}))
        return env

    def start(self, args: list[str], extra: dict | None = None) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "evoray.cli", *args], cwd=REPO,
                                env=self.env(extra), start_new_session=True, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def run(self, args: list[str], extra: dict | None = None,
            timeout: float = 400) -> tuple[int, str]:
        proc = self.start(args, extra)
        try:
            out, _ = proc.communicate(timeout=timeout)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        return proc.returncode, out

    def assert_nothing_left(self) -> None:
        left = _left_behind(self.marker)
        assert not left, f"processes left running by the killed driver: {left}"


@pytest.fixture
def driver():
    tmp = tempfile.mkdtemp(prefix="evf-", dir="/tmp")  # short: Ray's socket paths are limited
    d = Driver(tmp)
    yield d
    _left_behind(d.marker, grace=0)
    shutil.rmtree(tmp, ignore_errors=True)


def _temporaries(root) -> list[str]:
    return [p for p in glob.glob(f"{root}/**/*", recursive=True)
            if TEMPORARY.search(p.rstrip("/"))]


# -- 1. a feature actor killed mid-featurize ------------------------------------------------

@pytest.mark.slow
@pytest.mark.timeout(420)
def test_feature_actor_killed_after_its_first_batch_gives_identical_features(
        quick_run, ray_session, tmp_path, monkeypatch):
    """The actor's process is SIGKILLed the moment Ray Data's executor (in this process) sees
    its first batch finished: the other batches are still to do, on the same actor."""
    # Private Ray, on purpose: the State API's list_actors needs the dashboard, which the suite's
    # Ray does not run (so the GCS actor table), and Ray Data has no public hook for "a task of
    # this operator finished" (so its metrics callback, wrapped).
    from ray._private.state import actors
    from ray.data._internal.execution.interfaces.op_runtime_metrics import OpRuntimeMetrics

    from evoray.features.stage import featurize

    ref_dir = f"{quick_run['run_dir']}/round_01"
    cfg = demo_config(quick=True).features  # as quick_run: one actor, 16 candidates a batch
    before = set(actors())
    seen: dict = {"finished": 0}
    finished = OpRuntimeMetrics.on_task_finished

    def mine() -> list[dict]:
        return [a for k, a in actors().items()
                if k not in before and "FeatureActor" in a["ActorClassName"]]

    def on_task_finished(self, task_index, exception, *args, **kwargs):
        finished(self, task_index, exception, *args, **kwargs)
        if "FeatureActor" not in self._op.name or exception is not None:
            return
        seen["finished"] += 1
        if "killed" not in seen:
            try:
                (actor,) = [a for a in mine() if a["State"] == "ALIVE"]
                os.kill(actor["Pid"], signal.SIGKILL)
                seen["killed"] = actor["Pid"]
            except Exception as e:  # noqa: BLE001 (reported below, not inside Ray Data)
                seen["killed"] = e

    monkeypatch.setattr(OpRuntimeMetrics, "on_task_finished", on_task_finished)
    out = featurize(f"{ref_dir}/clean.jsonl", "tiny-llama", None, cfg,
                    out=str(tmp_path / "features"))
    assert isinstance(seen.get("killed"), int), seen
    assert seen["finished"] >= 2  # batches finished after the kill, by the restarted actor
    assert sum(a["NumRestarts"] for a in mine()) >= 1, mine()
    got, want = read_features(out), read_features(f"{ref_dir}/features/pool")
    assert list(got.ids) == list(want.ids)
    assert got.X.tobytes() == want.X.tobytes()
    assert got.loss.tobytes() == want.loss.tobytes()
    assert got.grad_norm.tobytes() == want.grad_norm.tobytes()
    assert not _temporaries(tmp_path)


# -- 3. the evolve driver killed at three points --------------------------------------------

def _selected_ids(run: str, r: int) -> list[str]:
    return pq.read_table(f"{run}/round_{r:02d}/selection/selected.parquet")["id"].to_pylist()


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_evolve_driver_killed_three_times_resumes_to_the_reference_run(
        quick_run, quick_round_one, driver, tmp_path):
    """Round 1 comes from the reference run (``quick_round_one``), to keep the test short;
    round 2 is killed three times and resumed."""
    ref, run = quick_run["run_dir"], quick_round_one
    config = tmp_path / "quick.yaml"
    config.write_text(dump_config(demo_config(quick=True, **{"evolve.run_dir": str(run)})))
    rd = run / "round_02"
    for point in ("round_02/features:during", "round_02/select:after", "round_02/train:during"):
        rc, out = driver.run(["evolve", str(config), "--resume"], {KILL_ENV: point})
        assert rc == -signal.SIGKILL, (point, rc, out[-3000:])
        driver.assert_nothing_left()
        stages = Manifest(str(run)).stages
        if point == "round_02/features:during":
            assert "[evolve] round_01/evaluate: done earlier, skipped" in out
            assert "round_02/clean" in stages and "round_02/features" not in stages
            assert _temporaries(rd / "features")  # the features folder being written
            assert not (rd / "features" / "pool").exists()  # never a partial final folder
        elif point == "round_02/select:after":
            assert "round_02/select" in stages and "round_02/train" not in stages
            assert not _temporaries(run)  # the first kill's leftovers were removed
        else:
            assert "[evolve] round_02/select: done earlier, skipped" in out
            assert "round_02/train" not in stages and not (rd / "adapter").exists()
            assert "[train] step" not in out  # killed after its first step, before the report

    rc, out = driver.run(["evolve", str(config), "--resume"])
    assert rc == 0, out[-3000:]
    assert "[evolve] round_02/select: done earlier, skipped" in out
    assert not any(line.startswith("[evolve] round_02/train: done earlier")
                   for line in out.splitlines())
    for r in (1, 2):
        assert _selected_ids(str(run), r) == _selected_ids(ref, r)
        for kind in ("pool", "targets"):
            got = read_features(f"{run}/round_{r:02d}/features/{kind}")
            want = read_features(f"{ref}/round_{r:02d}/features/{kind}")
            assert got.X.tobytes() == want.X.tobytes(), (r, kind)
        with open(f"{run}/round_{r:02d}/metrics.json") as f:
            got = json.load(f)
        want = quick_run["rounds"][r - 1]
        assert abs(got["accuracy"] - want["accuracy"]) <= 1e-6
        assert abs(got["loss"] - want["loss"]) <= 1e-6
        assert got["proxy"] == want["proxy"]  # the proxy check is deterministic too
    assert not _temporaries(run)
    assert all(f"round_{r:02d}/{s}" in Manifest(str(run)).stages for r in (1, 2)
               for s in ("generate", "clean", "proxy", "features", "select", "train",
                         "evaluate"))


# -- 4. the sweep driver killed -------------------------------------------------------------

def _saved_statuses(root: Path) -> dict[str, str]:
    """Trial statuses in Tune's experiment state on disk (what ``--resume`` restores)."""
    out = {}
    for path in sorted((root / "tune").glob("experiment_state-*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):  # being rewritten
            continue
        for trial_json, _ in data.get("trial_data", []):
            trial = json.loads(trial_json)
            out[trial["trial_id"]] = trial["status"]
    return out


def _attempts(root: Path) -> dict[str, list]:
    return {p.parent.name: json.loads(p.read_text())
            for p in (root / "trials").glob("*/attempts.json")}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_sweep_driver_killed_then_resumed_keeps_finished_trials(driver, tmp_path):
    root = tmp_path / "sweep"
    # tune_configs/quick.yaml cut down: 2 trials of 1 epoch, one at a time, small dev/test sets
    args = ["sweep", QUICK_SWEEP, f"sweep.sweep_dir={root}", "train.epochs=1",
            "sweep.space={select.lam: {grid: [0.0, 1.0]}}", "sweep.max_concurrent_trials=1",
            "sweep.dev_size=20", "sweep.test_size=20"]
    # Tune saves its experiment state every second (default: adaptive)
    proc = driver.start(args, {"TUNE_GLOBAL_CHECKPOINT_S": "1"})
    lines: list[str] = []

    def read():
        for line in proc.stdout:
            lines.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.monotonic() + 600
    done: set[str] = set()
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if any(" finished (" in line for line in list(lines)):
                done = {t for t, s in _saved_statuses(root).items() if s == "TERMINATED"}
                if done:
                    break
            time.sleep(0.2)
        assert done, f"no finished trial saved before the deadline: {''.join(lines)[-3000:]}"
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    reader.join(timeout=10)
    driver.assert_nothing_left()
    assert not (root / "results.csv").exists()
    before = _attempts(root)
    assert all(len(before[t]) == 1 for t in done)

    rc, out = driver.run([*args, "--resume"], timeout=600)
    assert rc == 0, out[-3000:]
    assert "[sweep] shared features: done earlier, skipped" in out
    with open(root / "results.csv") as f:
        rows = f.read().splitlines()[1:]
    assert len(rows) == 2
    after = _attempts(root)
    assert len(after) == 2 and len(done) == 1
    for tid in done:
        assert after[tid] == before[tid], tid  # kept from the killed run, never started again
    assert all(len(a) >= 1 for a in after.values())


# -- 5. the disk fills during a write -------------------------------------------------------

ENOSPC_MESSAGE = "Error writing bytes to file. Detail: [errno 28] No space left on device"


class _FullStream:
    """A file-like output stream that takes ``room`` more bytes, then fails like pyarrow's local
    filesystem does on a full disk (``OSError(ENOSPC)``, without a path)."""

    def __init__(self, path: str, fs: _DiskFull):
        self.f, self.fs, self.closed = open(path, "wb"), fs, False  # noqa: SIM115

    def write(self, data) -> int:
        data = bytes(data)
        room = max(0, self.fs.room)
        self.f.write(data[:room])
        self.fs.room -= len(data)
        if len(data) > room:
            self.f.flush()
            raise OSError(errno.ENOSPC, ENOSPC_MESSAGE)
        return len(data)

    def flush(self) -> None:
        self.f.flush()

    def close(self) -> None:
        self.closed = True
        self.f.close()

    def writable(self) -> bool:
        return True

    def readable(self) -> bool:
        return False

    def seekable(self) -> bool:
        return False


class _DiskFull(pafs.FileSystemHandler):
    """The local filesystem with ``room`` bytes left for writing."""

    def __init__(self, room: int):
        self.local, self.room = pafs.LocalFileSystem(), room

    def __eq__(self, other):
        return other is self

    def __ne__(self, other):
        return other is not self

    def get_type_name(self):
        return "disk-full"

    def normalize_path(self, path):
        return path

    def get_file_info(self, paths):
        return self.local.get_file_info(paths)

    def get_file_info_selector(self, selector):
        return self.local.get_file_info(selector)

    def create_dir(self, path, recursive):
        self.local.create_dir(path, recursive=recursive)

    def delete_dir(self, path):
        self.local.delete_dir(path)

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self.local.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self):
        raise OSError("refused")

    def delete_file(self, path):
        self.local.delete_file(path)

    def move(self, src, dest):
        self.local.move(src, dest)

    def copy_file(self, src, dest):
        self.local.copy_file(src, dest)

    def open_input_stream(self, path):
        return self.local.open_input_stream(path)

    def open_input_file(self, path):
        return self.local.open_input_file(path)

    def open_output_stream(self, path, metadata):
        return pa.PythonFile(_FullStream(path, self), mode="w")

    def open_append_stream(self, path, metadata):
        raise OSError("refused")


@pytest.fixture
def disk_full(monkeypatch):
    """``disk_full(room)``: from now on every evoray write of a local path goes through a
    filesystem with ``room`` bytes left (``evoray.storage.resolve``, which every writer uses, and
    the modules that import it)."""
    import evoray.data.features
    import evoray.data.io
    import evoray.storage

    def fill(room: int) -> _DiskFull:
        handler = _DiskFull(room)
        fs = pafs.PyFileSystem(handler)

        def resolve(path: str):
            assert "://" not in path
            return fs, os.path.abspath(path)

        for module in (evoray.storage, evoray.data.io, evoray.data.features):
            monkeypatch.setattr(module, "resolve", resolve)
        return handler

    return fill


def _tree(root) -> dict[str, bytes]:
    return {os.path.relpath(p, root): Path(p).read_bytes()
            for p in glob.glob(f"{root}/**/*", recursive=True) if os.path.isfile(p)}


def _feature_arrays(n: int, dim: int, seed: int):
    rng = np.random.default_rng(seed)
    return [f"c{i}" for i in range(n)], rng.standard_normal((n, dim)).astype(np.float32)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("room", [0, 3000])  # nothing written; part of the Parquet file
def test_disk_full_while_writing_features_leaves_the_earlier_folder(disk_full, tmp_path, room):
    out = tmp_path / "features"
    ids, X = _feature_arrays(40, 64, 0)
    write_features(str(out), ids, X)
    earlier = _tree(out)
    _, X2 = _feature_arrays(40, 64, 1)
    disk_full(room)
    with pytest.raises(OSError) as info:
        write_features(str(out), ids, X2)
    assert info.value.errno == errno.ENOSPC
    assert _tree(out) == earlier  # the earlier folder, whole and unchanged
    assert read_features(str(out)).X.tobytes() == X.tobytes()
    assert os.listdir(tmp_path) == ["features"]  # no temporary folder left


def _selection_inputs(tmp_path: Path) -> dict[str, str]:
    from evoray.data import write_records

    ids, X = _feature_arrays(30, 16, 2)
    tids, T = _feature_arrays(5, 16, 3)
    paths = {"features": str(tmp_path / "feat"), "targets": str(tmp_path / "tfeat"),
             "pool": str(tmp_path / "pool.jsonl")}
    write_features(paths["features"], ids, X)
    write_features(paths["targets"], [f"t{i}" for i in range(5)], T)
    write_records([{"id": i, "prompt": f"question {i}?", "response": "A"} for i in ids],
                  paths["pool"], "candidate")
    return paths


@pytest.mark.timeout(60)
@pytest.mark.parametrize("room", [0, 100])
def test_disk_full_while_writing_a_selection_fails_through_the_cli(disk_full, tmp_path, capsys,
                                                                   room):
    from evoray.cli import main

    p = _selection_inputs(tmp_path)
    out = tmp_path / "sel"
    args = ["select", "--features", p["features"], "--targets", p["targets"], "--pool",
            p["pool"], "--method", "random", "--out", str(out)]
    assert main([*args, "--k", "5"]) == 0
    earlier = _tree(out)
    assert {"selected.parquet", "summary.json", "selected.jsonl"} <= set(earlier)
    capsys.readouterr()
    disk_full(room)
    assert main([*args, "--k", "7", "--seed", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("evoray: error:") and "No space left on device" in err
    assert _tree(out) == earlier  # the first file failed: nothing else was touched
    assert not _temporaries(tmp_path)


@pytest.mark.timeout(60)
def test_disk_full_while_saving_the_manifest_fails_through_the_cli(disk_full, tmp_path, capsys):
    from evoray.cli import main

    run = tmp_path / "run"
    run.mkdir()
    config = tmp_path / "quick.yaml"
    config.write_text(dump_config(demo_config(quick=True, **{"evolve.run_dir": str(run)})))
    manifest = {"version": 2, "config": None, "stages": {"task": {
        "inputs": "0" * 64, "finished": "2026-01-01T00:00:00+00:00", "seconds": 0.1,
        "stats": {}}}}
    (run / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    earlier = (run / "manifest.json").read_bytes()
    disk_full(50)
    assert main(["evolve", str(config), "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("evoray: error:") and "No space left on device" in err
    assert (run / "manifest.json").read_bytes() == earlier
    assert sorted(os.listdir(run)) == ["manifest.json"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("what", ["records", "features"])
def test_disk_full_error_names_the_path(disk_full, tmp_path, what):
    from evoray.data import write_records

    disk_full(10)
    path = tmp_path / ("out.jsonl" if what == "records" else "features")
    with pytest.raises(OSError) as info:
        if what == "records":
            write_records([{"id": "a", "prompt": "p", "response": "r"}], str(path), "candidate")
        else:
            write_features(str(path), *_feature_arrays(4, 8, 0))
    assert info.value.errno == errno.ENOSPC
    assert str(path) in str(info.value)
