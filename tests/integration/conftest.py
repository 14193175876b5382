"""One local Ray for the whole integration suite (2 CPUs, no dashboard, token auth off)."""

import pytest


@pytest.fixture(scope="session")
def ray_session():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=300 * 1024**2,
             configure_logging=False, log_to_driver=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def quick_run(ray_session, tmp_path_factory):
    """The reference evolve run of the suite: ``evoray demo --quick`` (tiny-llama, 2 rounds),
    trained in-process, with its report. Tests read it; they never write into it."""
    from evoray.demo import demo_config, run_demo

    run_dir = str(tmp_path_factory.mktemp("quick") / "run")
    lines: list[str] = []
    out = run_demo(demo_config(quick=True, **{"evolve.run_dir": run_dir}), say=lines.append)
    out["lines"] = lines
    return out
