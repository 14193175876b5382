"""A sweep's search space and resources, checked before Ray starts: ``sweep.space`` parsed against
the config (:func:`parse_space`), every other check that needs no Ray (:func:`check_config`),
what a trial reserves (:func:`trial_resources`) and how many run at once
(:func:`plan_concurrency`)."""

from __future__ import annotations

import dataclasses
import importlib.util
import math

from evoray.config import Config, apply_override
from evoray.errors import ConfigError

__all__ = ["SPACE_KINDS", "parse_space", "expected_trials", "max_epochs", "check_config",
           "trial_resources", "plan_concurrency", "cluster_resources", "tune_space"]

SPACE_KINDS = ("grid", "choice", "uniform", "loguniform", "randint")
_RANGES = ("uniform", "loguniform", "randint")
# Fields that set a trial's resources (fixed for the whole sweep) or that the sweep replaces.
_FIXED = {"train.num_workers": "decides every trial's resources",
          "train.use_gpu": "decides every trial's resources",
          "train.cpus_per_worker": "decides every trial's resources",
          "train.max_steps": "sweeps count epochs (ASHA's time unit); vary train.epochs",
          "train.early_stop_patience": "a sweep scores every epoch on dev and its scheduler "
                                       "stops trials; set it to 0"}


# -- the search space -----------------------------------------------------------------------

def _field(cfg: Config, path: str):
    value = cfg
    for part in path.split("."):
        value = getattr(value, part)
    return value


def parse_space(cfg: Config) -> dict[str, tuple[str, list]]:
    """``sweep.space`` checked against the config: ``{path: (kind, values)}``, values coerced.

    Raises:
        ConfigError: an empty space or grid, a malformed entry, an unknown path (naming the
            closest valid one), a path outside ``select.*``/``train.*`` or one fixed for the
            sweep, or a value the field refuses (type or range).
    """
    if not cfg.sweep.space:
        raise ConfigError("sweep.space: empty; give at least one parameter, e.g. "
                          "'select.ratio: {grid: [0.05, 0.1, 0.2]}'")
    forms = "{grid: [...]}, {choice: [...]}, {uniform: [lo, hi]}, {loguniform: [lo, hi]}, " \
            "{randint: [lo, hi]}"
    out = {}
    for path, spec in cfg.sweep.space.items():
        where = f"sweep.space['{path}']"
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in SPACE_KINDS:
            raise ConfigError(f"{where}: expected one of {forms}; got {spec!r}")
        kind, values = next(iter(spec.items()))
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}: empty {kind}; list at least one value")
        if kind in _RANGES and (len(values) != 2 or not all(
                isinstance(v, int | float) and not isinstance(v, bool) for v in values)
                or values[0] >= values[1] or (kind == "loguniform" and values[0] <= 0)):
            raise ConfigError(f"{where}: {kind} needs [low, high] numbers with low < high"
                              f"{' and low > 0' if kind == 'loguniform' else ''}; got {values}")
        checked = values if kind != "randint" else [values[0], values[1] - 1]
        coerced = []
        for v in checked:
            try:
                coerced.append(_field(apply_override(cfg, path, v), path))
            except ConfigError as e:
                raise ConfigError(f"{where}: {e}") from None
        if dataclasses.is_dataclass(_field(cfg, path)):
            raise ConfigError(f"{where}: names a whole section; give one field, e.g. "
                              f"'{path}.{dataclasses.fields(_field(cfg, path))[0].name}'")
        if path.split(".")[0] not in ("select", "train"):
            raise ConfigError(f"{where}: '{path}' would change the shared task, pool or features "
                              "(computed once for every trial); a sweep varies select.* and "
                              "train.* only")
        if path in _FIXED:
            raise ConfigError(f"{where}: '{path}' {_FIXED[path]}; it cannot vary within a sweep")
        out[path] = (kind, coerced if kind in ("grid", "choice") else list(values))
    return out


def expected_trials(cfg: Config, space: dict[str, tuple[str, list]]) -> int:
    """Trials the sweep runs: grid points × ``num_samples`` (grid), else ``num_samples``."""
    if cfg.sweep.search != "grid":
        return cfg.sweep.num_samples
    return cfg.sweep.num_samples * math.prod(len(v) for k, v in space.values() if k == "grid")


def max_epochs(cfg: Config, space: dict) -> int:
    kind, values = space.get("train.epochs", ("grid", [cfg.train.epochs]))
    return values[1] - 1 if kind == "randint" else max(values)


def check_config(cfg: Config) -> dict[str, tuple[str, list]]:
    """Every check that needs no Ray: the space (:func:`parse_space`), the search algorithm's
    package, ASHA's grace period, training and the dev split. Returns the parsed space."""
    space = parse_space(cfg)
    sw, t = cfg.sweep, cfg.train
    if sw.search == "optuna" and importlib.util.find_spec("optuna") is None:
        raise ConfigError("sweep.search: 'optuna' needs the optuna package, which is not "
                          "installed (pip install optuna); or use search: grid or random")
    if sw.scheduler == "asha" and sw.grace_period > max_epochs(cfg, space):
        raise ConfigError(f"sweep.grace_period: {sw.grace_period} is more than the most epochs a "
                          f"trial trains ({max_epochs(cfg, space)})")
    for name in ("max_steps", "early_stop_patience"):
        if getattr(t, name):
            raise ConfigError(f"train.{name}: {_FIXED['train.' + name]}")
    if t.num_workers == 0 and t.use_gpu:
        raise ConfigError("train.use_gpu: in-process trials (train.num_workers 0) train on CPU; "
                          "set train.num_workers >= 1 for GPU trials")
    if cfg.evolve.targets and not cfg.evolve.dev:
        raise ConfigError("evolve.dev: a sweep scores trials on a dev split; give one with "
                          "evolve.targets (or leave both null for the built-in task's)")
    return space


# -- resources ------------------------------------------------------------------------------

def trial_resources(cfg: Config) -> tuple[dict[str, float], dict[str, float]]:
    """``(own, total)``: what a trial's process reserves through Tune, and what one trial needs
    in all (its process plus its Train workers)."""
    t = cfg.train
    own = t.cpus_per_worker if cfg.sweep.trial_cpus is None else cfg.sweep.trial_cpus
    return {"CPU": own}, {"CPU": own + t.num_workers * t.cpus_per_worker,
                          "GPU": float(t.num_workers if t.use_gpu else 0)}


def plan_concurrency(cfg: Config, available: dict[str, float],
                     largest_node: dict[str, float] | None = None) -> int:
    """``sweep.max_concurrent_trials``, or as many trials as ``available`` holds at once.

    Raises:
        ConfigError: one trial needs more than ``available`` (or its process more CPUs than
            ``largest_node`` has).
    """
    own, need = trial_resources(cfg)
    t = cfg.train
    what = (f"its process {own['CPU']:g} CPU" + (
        f" + {t.num_workers} Train worker(s) x {t.cpus_per_worker:g} CPU"
        f"{' + 1 GPU' if t.use_gpu else ''}" if t.num_workers else ""))
    fit = all(v <= available.get(k, 0) + 1e-9 for k, v in need.items() if v > 0)
    if largest_node is not None and own["CPU"] > largest_node.get("CPU", 0) + 1e-9:
        fit = False
        what += f"; the largest node has {largest_node.get('CPU', 0):g} CPU"
    if not fit:
        show = lambda res: ", ".join(f"{k} {res.get(k, 0):g}" for k in need)  # noqa: E731
        raise ConfigError(f"no trial can start: one needs {what} ({show(need)}) but the cluster "
                          f"has {show(available)}; lower train.num_workers, "
                          "train.cpus_per_worker or sweep.trial_cpus, or set sweep.resources "
                          "for a cluster that grows on demand")
    if cfg.sweep.max_concurrent_trials:
        return cfg.sweep.max_concurrent_trials
    ratios = [available.get(k, 0) / v for k, v in need.items() if v > 0]
    return max(1, math.floor(min(ratios) + 1e-9) if ratios else int(available.get("CPU", 1)))


def cluster_resources(cfg: Config) -> tuple[dict[str, float], dict[str, float] | None]:
    if cfg.sweep.resources:
        return dict(cfg.sweep.resources), None
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    largest = max(nodes, key=lambda r: r.get("CPU", 0)) if nodes else None
    return dict(ray.cluster_resources()), largest


def tune_space(space: dict, search: str) -> dict:
    """The parsed space as Tune's search space (a grid under ``search: grid``)."""
    from ray import tune

    make = {"grid": tune.grid_search if search == "grid" else tune.choice,
            "choice": tune.choice, "uniform": lambda v: tune.uniform(*v),
            "loguniform": lambda v: tune.loguniform(*v), "randint": lambda v: tune.randint(*v)}
    return {path: make[kind](values) for path, (kind, values) in space.items()}
