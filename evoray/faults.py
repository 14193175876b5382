"""Fault injection at stage boundaries, for the fault tests and for trying resume by hand.

Off unless its environment variables are set, so subprocess drivers and submitted Ray jobs can be
stopped by a test through their environment alone:

* ``EVORAY_FAIL_AFTER=<stage>`` (e.g. ``round_01/select``): raise an error right after that stage
  is recorded in its manifest.
* ``EVORAY_KILL_AT=<stage>:<when>`` SIGKILLs the process, as a crash or the OOM killer would:
  ``before`` the stage runs, ``after`` it is recorded, or ``during`` it: after the first optimizer
  step taken in this process (in-process training), or as soon as a temporary output
  (``*.tmp-XXXXXXXX``, e.g. a features folder being written) appears under the run folder.

:func:`evoray.stages.Manifest.run` consults :func:`from_env` around every stage it runs.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading

from evoray.errors import EvorayError
from evoray.storage import temporaries

__all__ = ["FAIL_ENV", "KILL_ENV", "Faults", "from_env"]

FAIL_ENV = "EVORAY_FAIL_AFTER"
KILL_ENV = "EVORAY_KILL_AT"
WHEN = ("before", "during", "after")


def _kill_now() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class Faults:
    """The faults asked for: ``fail_after`` (a stage key) and ``kill_at`` (``(key, when)``)."""

    def __init__(self, fail_after: str | None = None, kill_at: tuple[str, str] | None = None):
        self.fail_after, self.kill_at = fail_after, kill_at

    def _kill(self, key: str) -> str | None:
        return self.kill_at[1] if self.kill_at and self.kill_at[0] == key else None

    @contextlib.contextmanager
    def running(self, key: str, run_dir: str):
        """Around the stage's work: the ``before`` and ``during`` kills."""
        kill = self._kill(key)
        if kill == "before":
            _kill_now()
        if kill != "during":
            yield
            return
        from torch.optim.optimizer import register_optimizer_step_post_hook

        hook = register_optimizer_step_post_hook(lambda *_: _kill_now())
        done = threading.Event()

        def watch():
            while not done.wait(0.02):
                if temporaries(run_dir):
                    _kill_now()

        threading.Thread(target=watch, daemon=True, name="evoray-kill-at").start()
        try:
            yield
        finally:
            done.set()
            hook.remove()

    def recorded(self, key: str) -> None:
        """After the stage is recorded: the ``after`` kill and the injected failure."""
        if self._kill(key) == "after":
            _kill_now()
        if self.fail_after == key:
            raise EvorayError(f"injected failure after {key} ({FAIL_ENV}); rerun with --resume")


def from_env() -> Faults:
    """The faults this process's environment asks for (none when the variables are unset).

    Raises:
        EvorayError: ``EVORAY_KILL_AT`` is not ``<stage>:<before|during|after>``.
    """
    kill_at = None
    if os.environ.get(KILL_ENV):
        key, _, when = os.environ[KILL_ENV].rpartition(":")
        if not key or when not in WHEN:
            raise EvorayError(f"{KILL_ENV}={os.environ[KILL_ENV]!r}: expected "
                              f"<stage>:<{'|'.join(WHEN)}>, e.g. round_01/train:during")
        kill_at = (key, when)
    return Faults(os.environ.get(FAIL_ENV) or None, kill_at)
