"""The real TensorBoard server reads back what a run wrote (scalars, images, hparams)."""

import json
import urllib.parse
import urllib.request

import pytest

from ablate.tb_server import start
from ablate.train import train
from tests.test_train import tiny


def get(url: str):
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read()


@pytest.mark.slow
def test_tensorboard_server_serves_scalars_images_hparams(tmp_path):
    train(tiny(**{"train.seeds": [0, 1]}), tmp_path / "tiny", progress=False)
    proc, url = start(tmp_path)
    try:
        assert url.startswith("http://127.0.0.1:")
        runs = json.loads(get(url + "data/runs"))
        assert {"tiny/seed_0", "tiny/seed_1"} <= set(runs)
        q = urllib.parse.urlencode({"tag": "train/loss", "run": "tiny/seed_0"})
        loss = json.loads(get(url + "data/plugin/scalars/scalars?" + q))
        assert [row[1] for row in loss] == [10, 20]
        tags = json.loads(get(url + "data/plugin/images/tags"))
        assert any(t.startswith("patterns/layer0") for t in tags["tiny/seed_0"])
        body = json.dumps(
            {
                "experimentName": "",
                "allowedStatuses": ["STATUS_UNKNOWN"],
                "colParams": [],
                "startIndex": 0,
                "sliceSize": 100,
            }
        ).encode()
        req = urllib.request.Request(
            url + "data/plugin/hparams/session_groups",
            data=body,
            headers={"Content-Type": "application/json", "X-TensorBoard-Requested-With": "1"},
        )
        with urllib.request.urlopen(req, timeout=10) as r:
            groups = json.loads(r.read())
        assert groups.get("totalSize", 0) >= 2
        session = groups["sessionGroups"][0]
        assert session["hparams"]["task.name"] == "assoc_recall"
        metric_tags = {m["name"]["tag"] for m in session["metricValues"]}
        assert "eval/accuracy" in metric_tags
    finally:
        proc.terminate()
        proc.wait(timeout=10)
