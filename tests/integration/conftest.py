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
