"""The demo pass (generate → features → select) on a tiny model and the session's local Ray."""

import pytest

from evoray.data.features import read_features
from evoray.demo import run_demo

pytestmark = pytest.mark.timeout(300)


def test_demo_pass_writes_features_and_prints_both_selections(ray_session, tmp_path):
    lines = []
    paths = run_demo(model="tiny-llama", pool_size=30, out=str(tmp_path), say=lines.append)
    assert len(read_features(paths["pool"])) == 30
    assert len(read_features(paths["targets"])) == 40
    rows = {line.split()[1]: line.split() for line in lines if line.split()[1] in
            ("pool", "random", "evoselect")}
    assert rows["pool"][2] == "30" and rows["random"][2] == rows["evoselect"][2] == "8"
    assert ray_session.is_initialized()  # it joined the running Ray and left it running
