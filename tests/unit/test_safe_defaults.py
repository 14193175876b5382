"""Safe defaults: no remote code unless the config says so, no unpickling of files evoray did not
write, dashboards on 127.0.0.1. (Token auth: tests/jobs/test_submit.py; the run folder's config
and versions: tests/integration/test_evolve.py.)"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

from evoray.config import Config, load_config
from evoray.errors import ModelError

ROOT = Path(__file__).resolve().parents[2]


def test_trust_remote_code_is_off_unless_the_config_or_env_turns_it_on(monkeypatch):
    import transformers

    from evoray import models

    seen = []

    def from_pretrained(source, **kwargs):
        seen.append(kwargs.get("trust_remote_code"))
        raise OSError("not here")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", from_pretrained)
    monkeypatch.delenv(models.TRUST_ENV, raising=False)
    assert Config().trust_remote_code is False
    with pytest.raises(ModelError, match="'org/model'"):
        models.load_model("org/model")
    assert load_config(None, ["trust_remote_code=true"]).trust_remote_code is True
    models.allow_remote_code()  # what evolve/sweep/features do when the config says true
    with pytest.raises(ModelError):
        models.load_model("org/model")
    assert seen == [False, True]


def test_a_local_ray_hands_the_setting_to_its_workers(monkeypatch):
    import ray

    from evoray import models, ray_utils

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv(models.TRUST_ENV, raising=False)
    ray_utils.init_ray(quiet=False)
    monkeypatch.setenv(models.TRUST_ENV, "1")
    ray_utils.init_ray(quiet=False)
    assert "runtime_env" not in calls[0]
    assert calls[1]["runtime_env"] == {"env_vars": {models.TRUST_ENV: "1"}}


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func)


def test_no_unsafe_deserialisation_in_the_package():
    """torch.load only with weights_only=True; no pickle-family module; no remote code forced."""
    files = sorted((ROOT / "evoray").rglob("*.py"))
    assert len(files) > 20
    torch_loads = 0
    for path in files:
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                assert not {"pickle", "cloudpickle", "dill", "joblib"} & {
                    n.split(".")[0] for n in names}, (path, ast.unparse(node))
        for call, name in _calls(tree):
            if name == "torch.load":
                torch_loads += 1
                kw = {k.arg: k.value for k in call.keywords}
                assert isinstance(kw.get("weights_only"), ast.Constant) and \
                    kw["weights_only"].value is True, (path, call.lineno)
            for k in call.keywords:
                if k.arg == "trust_remote_code":
                    assert not (isinstance(k.value, ast.Constant) and k.value.value is True), \
                        (path, call.lineno)
    assert torch_loads >= 1  # the optimizer state of a resumed training run


def test_saved_artifacts_are_safetensors_and_parquet():
    src = "\n".join(p.read_text() for p in (ROOT / "evoray").rglob("*.py"))
    assert "safe_serialization=False" not in src
    assert "save_file(" in src  # Adam moments: safetensors
    assert "write_parquet(" in src  # features: Parquet


def test_dashboards_listen_on_localhost():
    cluster = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    head = " ".join(cluster["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head
    docs = [ROOT / "README.md", ROOT / "jobs" / "README.md", ROOT / "cluster.yaml",
            *sorted((ROOT / "jobs").glob("*.py")), *sorted((ROOT / "jobs" / "configs").glob("*"))]
    addresses = 0
    for path in docs:
        text = path.read_text()
        assert "0.0.0.0" not in text, path
        for host in re.findall(r"--address[ =]+https?://([\w.\-]+):", text):
            addresses += 1
            assert host == "127.0.0.1", (path, host)
    assert addresses >= 3
