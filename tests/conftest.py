"""Suite-wide settings: hermetic Ray (token auth off unless a test turns it on), no hub access;
one local Ray for the session (2 CPUs, no dashboard), and the evolve runs that tests read (they
never write into them)."""

import os
import socket

import pytest

os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

def pytest_collection_modifyitems(items):
    """The README's local-head recipe runs first: its ``ray stop`` ends every Ray process on the
    machine, so it must run before any other test has started one (a driver that another test
    SIGKILLs can leave its Ray's processes behind for a while). Tests that read the one-round
    evolve run (``one_round``) run last: by then the suite's Ray is started and its workers warm,
    so the setup that ``--durations`` shows for them is the run's own cost (about 18 s), not the
    session's first Ray start as well."""
    items.sort(key=lambda item: (item.name != "test_readme_local_head_recipe",
                                 "one_round" in getattr(item, "fixturenames", ())))


RAY_ARGS = {"num_cpus": 2, "include_dashboard": False, "object_store_memory": 300 * 1024**2,
            "configure_logging": False, "log_to_driver": False}


def start_ray(**kwargs):
    """Start the suite's local Ray (``kwargs`` add to :data:`RAY_ARGS`, e.g. a runtime_env)."""
    import ray

    ray.init(**RAY_ARGS, **kwargs)
    ray.data.DataContext.get_current().enable_progress_bars = False
    return ray


@pytest.fixture(scope="session")
def ray_session():
    ray = start_ray()
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def restart_ray(ray_session):
    """``restart_ray(**kwargs)``: stop the suite's Ray and start it again with ``kwargs``
    (no kwargs: as the session started it)."""
    def restart(**kwargs):
        ray_session.shutdown()
        return start_ray(**kwargs)

    return restart


@pytest.fixture(scope="session")
def one_round(ray_session, tmp_path_factory):
    """The fast tier's evolve run: one round of ``evoray demo --quick`` (tiny-llama), trained
    in-process, scored on the first 100 test items."""
    from evoray.demo import demo_config
    from evoray.evolve import evolve

    run_dir = str(tmp_path_factory.mktemp("one") / "run")
    lines: list[str] = []
    cfg = demo_config(quick=True, **{"evolve.run_dir": run_dir, "evolve.rounds": 1,
                                     "evolve.test_size": 100})
    out = evolve(cfg, say=lines.append)
    return {**out, "lines": lines}


@pytest.fixture(scope="session")
def quick_run(ray_session, tmp_path_factory):
    """The reference evolve run of the slow tier: ``evoray demo --quick`` (tiny-llama, 2
    rounds, a random arm then an EvoSelect arm), trained in-process, with its reports."""
    from evoray.demo import demo_config, run_demo

    root = str(tmp_path_factory.mktemp("quick") / "run")
    lines: list[str] = []
    demo = run_demo(demo_config(quick=True, **{"evolve.run_dir": root}), say=lines.append)
    # the EvoSelect arm, whose run folder is what demo_config(quick=True) with run_dir set to
    # it reproduces; "demo" keeps both arms and the side-by-side report
    return {**demo["arms"]["evoselect"], "lines": lines, "demo": demo}


@pytest.fixture
def quick_round_one(quick_run, tmp_path):
    """A copy of ``quick_run`` as it stood after round 1 (its folder and manifest without round
    2 or the report): a run whose ``--resume`` does round 2. Returns the copy's path."""
    import json
    import shutil

    run = tmp_path / "run"
    shutil.copytree(quick_run["run_dir"], run, ignore=lambda d, names: [
        n for n in names if n in ("round_02", "report.md", "plots")])
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["stages"] = {k: v for k, v in manifest["stages"].items()
                          if not k.startswith("round_02/")}
    (run / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return run


@pytest.fixture
def one_torch_thread():
    """One torch thread for the test (a shared 2-core machine: 2 threads spin against other
    processes); the count is restored after."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def free_ports(n: int) -> list[int]:
    """``n`` distinct free loopback ports. The sockets are all bound before any is closed: ports
    taken one at a time can repeat (the kernel may hand a just-released port out again), and a
    Ray head given one port for two components exits at once ("trying to use a port number ...
    that is used by other components")."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@pytest.fixture(scope="session")
def ports():
    """:func:`free_ports`, for tests and fixtures."""
    return free_ports
