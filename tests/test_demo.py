"""`codi demo`, the README's run command: the whole job on the built-in shapes teacher."""

import json

import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from cli.demo import demo
from codi_eqx import adapter_settings, load_adapter

app = typer.Typer(pretty_exceptions_enable=False)
app.command("demo")(demo)
app.command("other")(lambda: None)


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path):
    out = tmp_path / "demo"
    r = CliRunner().invoke(app, ["demo", str(out), "--max_train_steps", "2", "--steps", "1"])
    assert r.exit_code == 0, r.output
    assert load_adapter(out / "run").controlnet_cond_embedding is not None
    assert adapter_settings(out / "run").objective == "codi"
    rows = [json.loads(x) for x in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2]
    with Image.open(out / "samples.png") as im:
        assert im.size == (8 * 64 * 2, 3 * 64 * 2)  # 8 held-out captions; edges, CoDi, DDIM
    report = json.loads((out / "samples.json").read_text())
    assert len(report["captions"]) == 64 and report["train_steps"] == 2
    for side in ("codi", "teacher_ddim50"):
        assert 0.0 <= report["scores"][side]["caption_adherence"] <= 1.0
        assert 0.0 <= report["scores"][side]["edge_f1"] <= 1.0
    ratio = report["scores"]["caption_ratio"]
    assert ratio is None or ratio["low"] <= ratio["estimate"] <= ratio["high"]
    assert "caption adherence" in r.output
    # A second demo into the same folder refuses to overwrite the run.
    again = CliRunner().invoke(app, ["demo", str(out), "--max_train_steps", "2"])
    assert again.exit_code == 2 and "exists" in again.output
