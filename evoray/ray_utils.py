"""Small helpers for starting Ray the way evoray's stages expect it."""

from __future__ import annotations

import logging
import os

from evoray.errors import EvorayError

# Whether Ray Data's console shows the errors (with tracebacks) it logs before raising them. The
# CLI turns this off unless --debug: it prints evoray's own error in one line, and the session's
# ray-data.log keeps Ray's copy.
_console_errors = True


def init_ray(address: str | None = None, num_cpus: int | None = None, quiet: bool = True) -> bool:
    """Join the Ray cluster at `address` (or the one `ray job submit` runs in), else start a local
    one with `num_cpus`. Returns True if this call started Ray (the caller then shuts it down).

    `quiet` turns off Ray Data's progress output, which floods a terminal that is not a TTY.
    Token authentication follows Ray's default (`RAY_AUTH_MODE` unset means enabled).
    """
    import ray

    from evoray.models import TRUST_ENV, remote_code_allowed

    started = False
    if not ray.is_initialized():
        kwargs = {"address": address} if address else {"num_cpus": num_cpus,
                                                        "include_dashboard": False}
        if remote_code_allowed() and not (address or os.environ.get("RAY_ADDRESS")):
            # a local Ray's workers see the config's trust_remote_code (a cluster job passes
            # it with --runtime-env-json, see evoray.models.remote_code_allowed)
            kwargs["runtime_env"] = {"env_vars": {TRUST_ENV: "1"}}
        ray.init(configure_logging=False, log_to_driver=not quiet, **kwargs)
        started = True
    if quiet:
        quiet_ray_data()
    if not _console_errors:
        _drop_console_errors()
    return started


def show_console_errors(show: bool) -> None:
    """Let Ray Data's console show the task errors it logs (default), or leave them to
    ``ray-data.log`` in the session folder (the CLI without ``--debug``). Applies to Ray
    sessions that :func:`init_ray` starts or joins from now on."""
    global _console_errors
    _console_errors = show


class _BelowError(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.ERROR


def _drop_console_errors() -> None:
    import ray.data  # noqa: F401  (configures the "ray.data" logger and its handlers)

    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler) and not any(
                isinstance(f, _BelowError) for f in handler.filters):
            handler.addFilter(_BelowError())


def quiet_ray_data() -> None:
    """No progress bars or per-dataset INFO logs from Ray Data in this driver."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)


def unwrap_error(e: BaseException) -> BaseException:
    """The error a Ray task or actor raised, out of Ray's wrappers (``RayTaskError(X)`` keeps the
    original ``X`` in ``cause``)."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, BaseException):
        return unwrap_error(cause)
    if e.__cause__ is not None and not isinstance(e, EvorayError):
        return unwrap_error(e.__cause__)
    return e
