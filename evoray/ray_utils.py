"""Small helpers for starting Ray the way evoray's stages expect it."""

from __future__ import annotations

import logging


def init_ray(address: str | None = None, num_cpus: int | None = None, quiet: bool = True) -> bool:
    """Join the Ray cluster at `address` (or the one `ray job submit` runs in), else start a local
    one with `num_cpus`. Returns True if this call started Ray (the caller then shuts it down).

    `quiet` turns off Ray Data's progress output, which floods a terminal that is not a TTY.
    Token authentication follows Ray's default (`RAY_AUTH_MODE` unset means enabled).
    """
    import ray

    started = False
    if not ray.is_initialized():
        kwargs = {"address": address} if address else {"num_cpus": num_cpus,
                                                        "include_dashboard": False}
        ray.init(configure_logging=False, log_to_driver=not quiet, **kwargs)
        started = True
    if quiet:
        quiet_ray_data()
    return started


def quiet_ray_data() -> None:
    """No progress bars or per-dataset INFO logs from Ray Data in this driver."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
