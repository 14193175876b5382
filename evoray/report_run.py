"""An evolve run folder read back: the manifest's config, the base metrics and every round's
metrics or, for a round still running or stopped, the first stage it is missing and what the
finished stages wrote. Paths may be local or pyarrow URIs; :mod:`evoray.report` renders it."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

import pyarrow.fs as pafs

from evoray.errors import EvorayError, RecordError
from evoray.storage import read_bytes, resolve

__all__ = ["RoundInfo", "RunInfo", "STAGES", "load_run", "join", "file_type", "read_json"]

# A round's stages in order, with the file that marks each one done.
STAGES = (("generate", "pool.jsonl"), ("clean", "clean.jsonl"), ("proxy", "proxy.json"),
          ("features", "features/pool"), ("select", "selection/selected.parquet"),
          ("train", "adapter"), ("evaluate", "metrics.json"))
_ROUND_DIR = re.compile(r"round_(\d+)$")


@dataclass
class RoundInfo:
    """What one round folder holds. ``round`` 0 is the base model."""

    round: int
    path: str
    metrics: dict | None = None
    status: str = "done"  # or "missing <stage> (<file>)" / "not started"
    counts: dict = field(default_factory=dict)  # n_generated, n_clean, n_selected
    mix: dict | None = None  # selection shares by meta.kind
    pool_mix: dict | None = None  # cleaned-pool shares by meta.kind
    proxy: dict | None = None  # the proxy's competence on the targets (proxy.json)


@dataclass
class RunInfo:
    path: str
    config: dict
    rounds: list[RoundInfo]  # base (round 0) first, when base/metrics.json exists

    @property
    def method(self) -> str:
        return str(self.config.get("select", {}).get("method", ""))


def join(*parts: str) -> str:
    return "/".join(p.rstrip("/") for p in parts)


def file_type(path: str) -> pafs.FileType:
    fs, p = resolve(path)
    return fs.get_file_info(p).type


def read_json(path: str) -> dict | None:
    """The JSON object in ``path``, or None when there is no such file."""
    if file_type(path) != pafs.FileType.File:
        return None
    try:
        return json.loads(read_bytes(path))
    except json.JSONDecodeError as e:
        raise RecordError(path, f"malformed JSON: {e.msg}", line=e.lineno) from None


def _jsonl_kinds(path: str) -> tuple[int, dict | None]:
    """Record count of a JSONL file and its shares by ``meta.kind`` (None without meta.kind)."""
    counts: dict[str, int] = {}
    n = 0
    for number, line in enumerate(read_bytes(path).decode("utf-8").splitlines(), start=1):
        if line.strip():
            n += 1
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise RecordError(path, f"malformed JSON: {e.msg}", line=number) from None
            meta = rec.get("meta") if isinstance(rec, dict) else None
            kind = meta.get("kind") if isinstance(meta, dict) else None
            if kind is not None:
                counts[str(kind)] = counts.get(str(kind), 0) + 1
    return n, ({k: v / n for k, v in counts.items()} if counts else None)


def _load_round(run_dir: str, r: int, name: str, method: str) -> RoundInfo:
    from evoray.select.api import FEATURE_FREE

    path = join(run_dir, name)
    info = RoundInfo(round=r, path=path)
    if file_type(path) == pafs.FileType.NotFound:
        info.status = "not started"
        return info
    for stage, name in STAGES:
        if stage == "features" and method in FEATURE_FREE:
            continue  # random selects from the pool file; its rounds have no features
        if file_type(join(path, name)) == pafs.FileType.NotFound:
            info.status = f"missing {stage} ({name})"
            break
    info.metrics = read_json(join(path, "metrics.json"))
    info.proxy = (info.metrics or {}).get("proxy") or read_json(join(path, "proxy.json"))
    if info.metrics is not None:
        info.status = "done"
        m = info.metrics
        info.counts = {k: m[k] for k in ("n_generated", "n_clean", "n_selected") if k in m}
        info.mix, info.pool_mix = m.get("mix"), m.get("pool_mix")
        return info
    # Unfinished: count what the finished stages wrote.
    files = {"n_generated": "pool.jsonl", "n_clean": "clean.jsonl",
             "n_selected": "selection/selected.jsonl"}
    for key, name in files.items():
        if file_type(join(path, name)) == pafs.FileType.File:
            n, mix = _jsonl_kinds(join(path, name))
            info.counts[key] = n
            if key == "n_clean":
                info.pool_mix = mix
            elif key == "n_selected":
                info.mix = mix
    return info


def load_run(run_dir: str) -> RunInfo:
    """Collect the manifest, the base metrics and every round's metrics or status.

    Rounds are those the config asks for (``evolve.rounds``) and any ``round_NN`` folder found.

    Raises:
        EvorayError: naming ``run_dir`` when it does not exist or holds no evolve run.
        RecordError: naming the file and line of a malformed JSON or JSONL file.
    """
    run_dir = run_dir.rstrip("/")
    fs, p = resolve(run_dir)
    kind = fs.get_file_info(p).type
    if kind != pafs.FileType.Directory:
        what = "no such run directory" if kind == pafs.FileType.NotFound else "not a directory"
        raise EvorayError(f"{run_dir}: {what}; expected the run_dir of `evoray evolve` "
                          "(manifest.json, base/, round_NN/)")
    found = {int(m.group(1)): i.base_name for i in fs.get_file_info(pafs.FileSelector(p))
             if i.type == pafs.FileType.Directory and (m := _ROUND_DIR.match(i.base_name))}
    manifest = read_json(join(run_dir, "manifest.json"))
    base = read_json(join(run_dir, "base", "metrics.json"))
    if manifest is None and base is None and not found:
        raise EvorayError(f"{run_dir}: holds no manifest.json, base/metrics.json or round_NN/ "
                          "folder; not the run_dir of `evoray evolve`")
    config = (manifest or {}).get("config", {})
    planned = int(config.get("evolve", {}).get("rounds", 0) or 0)
    method = str(config.get("select", {}).get("method", ""))
    rounds = [_load_round(run_dir, r, found.get(r, f"round_{r:02d}"), method)
              for r in sorted(set(found) | set(range(1, planned + 1)))]
    rounds.insert(0, RoundInfo(round=0, path=join(run_dir, "base"), metrics=base,
                               status="base model" if base else "missing base/metrics.json"))
    return RunInfo(path=run_dir, config=config, rounds=rounds)
