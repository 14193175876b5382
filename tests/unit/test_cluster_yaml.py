"""cluster.yaml: valid for Ray's cluster launcher, and keeps evoray's invariants.

Validation runs what `ray up` runs before it talks to AWS: `prepare_config` (merge with the
provider's defaults.yaml, merge setup commands, docker checks, per-type worker bounds) and then
`validate_config` (the JSON schema Ray ships as ray/autoscaler/ray-schema.json, plus
head_node_type / min_workers consistency). The AWS-specific steps (resource detection, IAM,
subnets) need credentials and are not exercised here.
"""

import copy
import json
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

# Ray has no public API that fills a cluster config's defaults and validates it as `ray up` does;
# these are the functions `ray up` itself calls.
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[2]
CLUSTER_YAML = ROOT / "cluster.yaml"
SCHEMA = Path(ray.autoscaler.__file__).parent / "ray-schema.json"


@pytest.fixture(scope="module")
def config() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


@pytest.fixture(scope="module")
def schema() -> dict:
    return json.loads(SCHEMA.read_text())


def _ray_up_checks(config: dict) -> dict:
    """The launcher's offline checks on a copy of ``config``; returns the prepared config."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def _node_types(config: dict) -> tuple[dict, dict]:
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    workers = {name: t for name, t in types.items() if name != config["head_node_type"]}
    return head, workers


def _gpu_workers(config: dict) -> dict:
    return {name: t for name, t in _node_types(config)[1].items()
            if t.get("resources", {}).get("GPU", 0) >= 1}


def test_passes_ray_launcher_validation(config):
    prepared = _ray_up_checks(config)
    # The prepared config is what the head's autoscaler runs with: our commands survived merging.
    assert prepared["setup_commands"] == config["setup_commands"]
    assert prepared["provider"]["type"] == "aws"


def test_raw_file_matches_ray_schema(config, schema):
    """The file as written, before any defaults are merged, is valid against the schema."""
    jsonschema.validate(config, schema)


@pytest.mark.parametrize("mutate, where", [
    (lambda c: c.__setitem__("max_worker", c.pop("max_workers")), "max_worker"),
    (lambda c: c.__setitem__("head_start_commands", c.pop("head_start_ray_commands")),
     "head_start_commands"),
    (lambda c: c["docker"].__setitem__("imag", c["docker"].pop("image")), "imag"),
    (lambda c: c["available_node_types"]["gpu_worker"].__setitem__("max_worker", 4),
     "max_worker"),
    (lambda c: c["available_node_types"]["gpu_worker"]["resources"].__setitem__("GPU", 0.5),
     "0.5"),
], ids=["max_worker", "head_start_commands", "docker.imag", "gpu_worker.max_worker",
        "fractional_gpu"])
def test_validation_rejects_bad_keys(config, schema, mutate, where):
    """Misspelt keys are errors for Ray's schema, not silently ignored (so the test has teeth)."""
    bad = copy.deepcopy(config)
    mutate(bad)
    with pytest.raises(jsonschema.ValidationError, match=re.escape(where)):
        jsonschema.validate(bad, schema)
    # `ray up`'s own checks refuse it too (a missing docker.image trips its docker check first).
    with pytest.raises((jsonschema.ValidationError, AssertionError)):
        _ray_up_checks(bad)


def test_validation_rejects_unknown_head_type(config):
    bad = copy.deepcopy(config)
    bad["head_node_type"] = "head_node"
    with pytest.raises(ValueError, match="head_node_type"):
        _ray_up_checks(bad)


def test_head_runs_no_work(config):
    head, _ = _node_types(config)
    assert head["resources"].get("CPU") == 0
    assert head["resources"].get("GPU", 0) == 0
    assert head.get("min_workers", 0) == 0 and head.get("max_workers", 0) == 0


def test_autoscaling_gpu_workers(config):
    gpu = _gpu_workers(config)
    assert gpu, "no worker node type declares GPU resources"
    for name, node_type in gpu.items():
        assert node_type["min_workers"] == 0, f"{name}: GPU workers should scale from zero"
        assert 0 < node_type["max_workers"] <= config["max_workers"], name
        instance = node_type["node_config"]["InstanceType"]
        assert re.match(r"^(g|p)\d+[a-z]*\.", instance), f"{name}: {instance} is not a GPU type"


def test_image_pinned_to_installed_ray(config):
    docker = config["docker"]
    assert docker["image"] == f"rayproject/ray:{ray.__version__}-py311-gpu"
    for key in ("head_image", "worker_image"):
        assert key not in docker, f"docker.{key} would bypass the pinned image"
    for node_type in config["available_node_types"].values():
        assert "docker" not in node_type, "a per-type image would bypass the pinned image"


def _pip_installs(config: dict) -> list[list[str]]:
    """The argument lists of every `pip install` in the setup commands."""
    out = []
    for key in ("setup_commands", "head_setup_commands", "worker_setup_commands"):
        for command in config.get(key) or []:
            for part in re.split(r"&&|;", command):
                words = shlex.split(part)
                if words[:2] == ["pip", "install"]:
                    out.append(words[2:])
    return out


def test_setup_installs_evoray_with_gpu_extra(config):
    common = " ".join(config["setup_commands"])  # run on the head and on every worker
    # The uploaded working tree is where the editable install runs.
    mounts = {remote: local for remote, local in config["file_mounts"].items()}
    assert mounts.get("~/evoray") == "."
    assert ".gitignore" in config.get("rsync_filter", []), "would upload .venv and runs/"
    assert "cd ~/evoray" in common
    installs = _pip_installs({"setup_commands": config["setup_commands"]})
    assert any("-e" in args and ".[gpu]" in args for args in installs), installs
    # faiss-cpu and faiss-gpu write the same module: the cpu extra must never come along.
    everything = [arg for args in _pip_installs(config) for arg in args]
    assert not any("faiss-cpu" in arg or "[cpu" in arg or ",cpu" in arg for arg in everything)
    # Ray stays at the image's version while evoray's ray[...] requirement is resolved.
    assert f"ray[data,train,tune,default]=={ray.__version__}" in everything


def test_start_commands(config):
    head = config["head_start_ray_commands"]
    workers = config["worker_start_ray_commands"]
    assert head[0] == "ray stop" and workers[0] == "ray stop"
    head_start = " ".join(head[1:])
    assert "ray start --head" in head_start
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head_start
    # The dashboard (and job API) stay on the head's loopback; users tunnel with `ray dashboard`.
    assert "--dashboard-host=127.0.0.1" in head_start
    assert "--address=$RAY_HEAD_IP:6379" in " ".join(workers[1:])
