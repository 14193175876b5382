"""Checkpoints, outputs and adapters on S3: a moto server on loopback, started by the test."""

import os

import pytest

from evoray.config import TrainConfig
from evoray.data import read_records, write_records
from evoray.tasks import write_task
from evoray.train import evaluate, train

pytestmark = pytest.mark.slow  # Ray restarted for the module, and an evolve run on S3


@pytest.fixture(scope="module")
def s3(restart_ray, ports):
    """A moto S3 server on a free loopback port, for this module only. pyarrow reads the
    endpoint and credentials from the environment, and Ray's workers get the driver's
    environment when Ray starts: the variables are set, and the suite's Ray restarted with
    them, for this module alone; both are undone after it."""
    moto_server = pytest.importorskip("moto.server")
    import pyarrow.fs as pafs

    (port,) = ports(1)
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        restart_ray()
        server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port,
                                                verbose=False)
        server.start()
        try:
            fs = pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http",
                                   region="us-east-1", allow_bucket_creation=True)
            fs.create_dir("evoray")
            yield lambda key: f"s3://evoray/{key}", fs
        finally:
            server.stop()
    restart_ray()  # the suite's Ray again, without the variables


def test_ray_workers_see_the_s3_endpoint(s3):
    import ray

    @ray.remote
    def endpoint():
        return os.environ.get("AWS_ENDPOINT_URL")

    assert ray.get(endpoint.remote()) == os.environ["AWS_ENDPOINT_URL"]


@pytest.mark.timeout(300)
def test_train_and_evaluate_on_s3(ray_session, s3, tmp_path):
    uri, fs = s3
    paths = write_task("compare", str(tmp_path), pool_size=20, seed=0)
    data, test = uri("data/train.jsonl"), uri("data/test.jsonl")
    write_records(read_records(paths["train"], "candidate")[:16], data, "candidate")
    write_records(read_records(paths["test"], "mcq")[:8], test, "mcq")
    cfg = TrainConfig(num_workers=1, max_steps=2, batch_size=8, max_length=128,
                      cpus_per_worker=0.5, storage_path=uri("runs"))
    res = train(data, "tiny-llama", cfg=cfg, out=uri("adapter"), name="s3-run")
    assert res.checkpoint is not None and res.checkpoint.startswith("evoray/runs/s3-run")
    assert fs.get_file_info("evoray/adapter/adam_state.safetensors").size > 0
    names = [i.path for i in fs.get_file_info(pafs_selector("evoray/runs/s3-run"))]
    assert any("checkpoint" in n for n in names)
    m = evaluate("tiny-llama", uri("adapter"), test)
    assert m["n"] == 8 and 0.0 <= m["accuracy"] <= 1.0


def pafs_selector(path):
    import pyarrow.fs as pafs

    return pafs.FileSelector(path, recursive=True)


@pytest.mark.timeout(400)
def test_evolve_and_report_on_s3(ray_session, s3):
    import json

    from evoray.demo import demo_config
    from evoray.evolve import evolve
    from evoray.report import write_report

    uri, fs = s3
    cfg = demo_config(quick=True, **{"evolve.run_dir": uri("evolve"), "evolve.rounds": 1,
                                     "generate.pool_size": 60})
    out = evolve(cfg, say=lambda _: None)
    with fs.open_input_stream("evoray/evolve/round_01/metrics.json") as f:
        assert json.loads(f.read())["n_selected"] == out["rounds"][0]["n_selected"] > 0
    assert fs.get_file_info("evoray/evolve/round_01/adapter/adapter_model.safetensors").size > 0
    with fs.open_input_stream("evoray/evolve/round_01/proxy.json") as f:
        assert json.loads(f.read()) == out["rounds"][0]["proxy"]
    lines = []
    again = evolve(cfg, resume=True, say=lines.append)
    # task, base/evaluate and round 1's generate, clean, proxy, features, select, train, evaluate
    assert sum("done earlier" in line for line in lines) == 9 and again["rounds"] == out["rounds"]
    assert write_report(uri("evolve")) == uri("evolve/report.md")
    assert fs.get_file_info("evoray/evolve/report.md").size > 0
