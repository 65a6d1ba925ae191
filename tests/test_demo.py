"""`codi demo`, the README's run command: the whole job on the built-in tiny model."""

import json

import typer
from PIL import Image
from typer.testing import CliRunner

from cli.demo import demo
from codi_eqx import load_adapter

app = typer.Typer(pretty_exceptions_enable=False)
app.command("demo")(demo)
app.command("other")(lambda: None)


def test_demo_runs_end_to_end(tmp_path):
    out = tmp_path / "demo"
    r = CliRunner().invoke(app, ["demo", str(out), "--max_train_steps", "2", "--steps", "2"])
    assert r.exit_code == 0, r.output
    assert load_adapter(out / "run").controlnet_cond_embedding is not None
    rows = [json.loads(x) for x in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2]
    with Image.open(out / "samples.png") as im:
        assert im.size == (128, 128)
    # A second demo into the same folder refuses to overwrite the run.
    again = CliRunner().invoke(app, ["demo", str(out), "--max_train_steps", "2"])
    assert again.exit_code == 2 and "exists" in again.output
