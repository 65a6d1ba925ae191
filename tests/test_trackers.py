"""`--report_to`: tensorboard (through tensorboardX here) and wandb (a stand-in module that
records calls: the real one needs an account and the network) receive what metrics.jsonl gets."""

import json
import sys
import types

import numpy as np
import pytest

from codi_eqx.train._config import TrainConfig
from codi_eqx.train._metrics import Metrics as _Metrics


def test_tensorboard_writes_events(tmp_path, monkeypatch):
    pytest.importorskip("tensorboardX")
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # take the tensorboardX path
    m = _Metrics(TrainConfig(pretrained_model_name_or_path="m", report_to="tensorboard"), tmp_path, None, True)
    assert [kind for kind, _ in m.writers] == ["tensorboard"]
    m.log({"step": 1, "loss": 0.5, "grad_norm": 2.0})
    m.log_images("validation", np.zeros((8, 8, 3), np.uint8), 1)
    m.close()
    events = list((tmp_path / "logs").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])["loss"] == 0.5


def test_wandb_receives_rows_and_images(tmp_path, monkeypatch):
    calls = []

    class Run:
        def log(self, row, step):
            calls.append(("log", row, step))

        def finish(self):
            calls.append(("finish",))

    fake = types.ModuleType("wandb")
    fake.init = lambda **kw: calls.append(("init", kw)) or Run()
    fake.Image = lambda a: ("image", a.shape)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    config = TrainConfig(pretrained_model_name_or_path="m", report_to="wandb", learning_rate=1e-5)
    m = _Metrics(config, tmp_path, None, True)
    m.log({"step": 3, "loss": 0.25})
    m.log_images("validation", np.zeros((4, 4, 3), np.uint8), 3)
    m.close()
    assert calls[0][0] == "init" and calls[0][1]["config"]["learning_rate"] == 1e-5
    assert ("log", {"step": 3, "loss": 0.25}, 3) in calls
    assert ("log", {"validation": ("image", (4, 4, 3))}, 3) in calls
    assert calls[-1] == ("finish",)
