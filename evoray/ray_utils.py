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
    Token authentication follows Ray's default (`RAY_AUTH_MODE` unset means enabled); the
    ``evoray`` command asks for it explicitly (:func:`ask_for_token_auth`).
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


def ask_for_token_auth() -> None:
    """Ask for Ray's default of a new local cluster, token authentication (a token generated
    under ``~/.ray`` if there is none), explicitly: with ``RAY_AUTH_MODE`` unset, Ray prints a
    banner on every start saying it chose that default. Console entry points call this before
    anything imports Ray (Ray reads the variable once, at import). Nothing changes when the
    variable is set already (e.g. ``disabled``), when Ray is imported, or when this process
    joins a cluster (``RAY_ADDRESS``, as in a submitted job), whose own mode then applies."""
    import sys

    if "ray" in sys.modules or os.environ.get("RAY_ADDRESS"):
        return
    os.environ.setdefault("RAY_AUTH_MODE", "token")


def show_console_errors(show: bool) -> None:
    """Let Ray Data's console show the task errors it logs (default), or leave them to
    ``ray-data.log`` in the session folder (the CLI without ``--debug``). Applies to Ray
    sessions that :func:`init_ray` starts or joins from now on."""
    global _console_errors
    _console_errors = show


class _BelowError(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.ERROR


class _IdleNotices(logging.Filter):
    """Drops two of Ray Data's console warnings that tell an evoray user nothing to act on:
    "Progress bars disabled. To enable, set ..." reports the choice :func:`quiet_ray_data`
    made; "Warning: The Ray cluster currently does not have any available CPUs ..." is checked
    once, as a dataset starts executing, and fires when the tasks of the dataset just finished
    have not yet given their CPUs back (seen at the features stage's ``materialize`` calls
    on 2 CPUs). The real condition, feature actors that leave no CPU for Ray Data's tasks, has
    its own warning in :func:`evoray.features.stage.featurize`."""

    NOTICES = ("Progress bars disabled",
               "Warning: The Ray cluster currently does not have any available CPUs")

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.NOTICES)


def _filter_console(kind: type[logging.Filter]) -> None:
    """Add a ``kind`` filter, once, to each of the ``ray.data`` logger's console handlers; its
    file handler (``ray-data.log`` in the session folder) keeps every record. A FileHandler is
    a StreamHandler too, hence the explicit skip."""
    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.FileHandler) or not isinstance(
                handler, logging.StreamHandler):
            continue
        if not any(isinstance(f, kind) for f in handler.filters):
            handler.addFilter(kind())


def _drop_console_errors() -> None:
    import ray.data  # noqa: F401  (configures the "ray.data" logger and its handlers)

    _filter_console(_BelowError)


def quiet_ray_data() -> None:
    """No progress bars or per-dataset INFO logs from Ray Data in this driver, and none of the
    console warnings :class:`_IdleNotices` lists (``ray-data.log`` keeps them)."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    _filter_console(_IdleNotices)


def unwrap_error(e: BaseException) -> BaseException:
    """The error a Ray task or actor raised, out of Ray's wrappers (``RayTaskError(X)`` keeps the
    original ``X`` in ``cause``)."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, BaseException):
        return unwrap_error(cause)
    if e.__cause__ is not None and not isinstance(e, EvorayError):
        return unwrap_error(e.__cause__)
    return e


# Lines that Ray's C++ core worker writes to the driver's stderr and that have no cause evoray
# can remove: Ray Data always hands an actor pool's constructor arguments over through the object
# store (`ray.put` of its map transformer) and gives the actors `max_restarts=-1`, which the core
# worker reports for every actor it starts (https://github.com/ray-project/ray/issues/53727). The
# feature stage wants those restarts (a killed actor's block is redone), so the line is filtered.
NOISE = ("has constructor arguments in the object store and max_restarts > 0",)


def filter_stderr(drop: tuple[str, ...] = NOISE) -> None:
    """Pass this process's stderr (file descriptor 2, which Ray's C++ logging writes to as well
    as Python) through a thread that drops the lines containing any of ``drop``; everything
    else reaches the console unchanged, a partial line (a progress bar's ``\\r``) as soon as
    it is written. For console entry points only (``evoray ...``); at exit the thread drains
    the pipe and the original stderr is put back. Does nothing if stderr is not a real file
    descriptor (e.g. under pytest's capture)."""
    import atexit
    import sys
    import threading

    try:
        original = os.dup(2)
    except OSError:
        return
    read_end, write_end = os.pipe()
    sys.stderr.flush()
    os.dup2(write_end, 2)
    os.close(write_end)
    needles = [d.encode() for d in drop]
    original_open = True

    def write(data: bytes) -> None:
        nonlocal original_open
        if original_open:
            try:
                os.write(original, data)
            except OSError:  # the console went away (a closed pipe): keep draining
                original_open = False

    def pump() -> None:
        pending = b""
        while chunk := os.read(read_end, 65536):
            pending += chunk
            cut = max(pending.rfind(b"\n"), pending.rfind(b"\r")) + 1
            if not cut:
                continue
            out = b"".join(line for line in pending[:cut].splitlines(keepends=True)
                           if not any(n in line for n in needles))
            pending = pending[cut:]
            if out:
                write(out)
        if pending:
            write(pending)
        os.close(read_end)

    thread = threading.Thread(target=pump, name="evoray-stderr", daemon=True)
    thread.start()

    def restore() -> None:  # registered before Ray starts, so it runs after Ray's own shutdown
        sys.stderr.flush()
        os.dup2(original, 2)  # closes this process's write end; the pump then sees EOF
        thread.join(timeout=2.0)

    atexit.register(restore)
