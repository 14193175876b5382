"""Every example job config in jobs/configs/ loads and validates with evoray.config.load_config."""

from pathlib import Path

import pytest

from evoray.config import load_config

CONFIGS = Path(__file__).resolve().parents[2] / "jobs" / "configs"
FILES = sorted([*CONFIGS.glob("*.yaml"), *CONFIGS.glob("*.yml")])


def test_folder_has_configs():
    assert (CONFIGS / "gpu_cluster.yaml") in FILES


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_job_config_loads(path):
    load_config(str(path))


def test_gpu_cluster_config():
    cfg = load_config(str(CONFIGS / "gpu_cluster.yaml"))
    assert "Qwen2.5-3B" in cfg.model
    assert cfg.features.dim == 8192
    assert cfg.features.num_actors == 4 and cfg.features.num_gpus == 1
    assert cfg.train.num_workers >= 1 and cfg.train.use_gpu and cfg.train.bf16
    assert cfg.generate.kind in ("simulated", "hf")
    # Several nodes write and read these: they must be shared storage, not a node's disk.
    for where in (cfg.evolve.run_dir, cfg.train.storage_path, cfg.sweep.sweep_dir):
        assert where.startswith("s3://"), where


@pytest.mark.parametrize("job", ["evolve", "sweep"])
def test_jobs_take_the_config_as_the_cli_does(job):
    """``jobs/<job>.py CONFIG [overrides] [--resume]`` as ``evoray <job>``; the old ``--config``
    form is a one-line error naming the new one."""
    import subprocess
    import sys

    script = CONFIGS.parent / f"{job}.py"
    old = subprocess.run([sys.executable, str(script), "--config", "x.yaml"], capture_output=True,
                         text=True, timeout=120)
    assert old.returncode == 2
    assert "--config is gone" in old.stderr and f"python jobs/{job}.py CONFIG" in old.stderr
    bad = subprocess.run([sys.executable, str(script), str(CONFIGS / "quick.yaml"),
                          "select.ratio=2"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "select.ratio: 2.0 is out of range" in bad.stderr
