"""`codi sample` through Typer's CliRunner: PNGs with metadata, folders, one-line errors."""

import equinox as eqx
import jax
import numpy as np
import pytest
import typer
from helpers import make_tiny_pipeline
from PIL import Image
from typer.testing import CliRunner

from cli.sample import sample
from codi_eqx import ControlNetModel, load_pipeline, save_adapter
from codi_eqx.sampling import generate
from weights_conversion import save_unet

app = typer.Typer(pretty_exceptions_enable=False)
app.command("sample")(sample)
app.command("other")(lambda: None)  # keeps `sample` a subcommand, as in cli.main


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-sample")
    model = make_tiny_pipeline(root / "model")
    pipe = load_pipeline(model)
    k1, k2 = jax.random.split(jax.random.key(0))
    save_adapter(ControlNetModel.from_unet(pipe.unet, conditioning_channels=3, key=k1),
                 root / "adapter-cond")
    save_adapter(ControlNetModel.from_unet(pipe.unet, conditioning_channels=None, key=k2),
                 root / "adapter-plain")
    # A full-CoDi output: adapter + the trained UNet beside it (here a perturbed copy).
    save_adapter(ControlNetModel.from_unet(pipe.unet, conditioning_channels=None, key=k2),
                 root / "adapter-full")
    save_unet(eqx.tree_at(lambda u: u.conv_out.bias, pipe.unet, pipe.unet.conv_out.bias + 0.5),
              root / "adapter-full" / "unet")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (100, 80, 3), np.uint8)).save(root / "edges.png")
    (root / "corrupt.png").write_bytes(b"not a png at all")
    return root


def run(*args):
    result = CliRunner().invoke(app, ["sample", *map(str, args)])
    return result


def test_single_png_with_metadata(files, tmp_path):
    out = tmp_path / "cat.png"
    r = run("--model", files / "model", "--prompt", "a cat", "--seed", 3, "--output", out)
    assert r.exit_code == 0, r.output
    assert "compiling the sampler (first batch only)..." in r.stderr
    with Image.open(out) as im:
        assert im.size == (64, 64) and im.mode == "RGB"
        meta = im.text
    assert meta["prompt"] == "a cat" and meta["seed"] == "3" and meta["steps"] == "4"
    assert meta["sampler"] == "codi" and meta["guidance_scale"] == "1.0"
    assert meta["negative_prompt"] == "" and meta["model"] == str(files / "model")
    # The file holds the library's image for these settings, pixel for pixel.
    with Image.open(out) as im:
        pixels = np.asarray(im)
    want = generate(load_pipeline(files / "model"), None, "a cat", seed=3, steps=4,
                    sampler="codi", guidance_scale=1.0)
    np.testing.assert_array_equal(pixels, want[0])


def test_grid_and_folder(files, tmp_path):
    grid = tmp_path / "grid.png"
    r = run("--model", files / "model", "--prompt", "a cat", "--prompt", "a dog",
            "--batch_size", 1, "--negative-prompt", "blurry", "--output", grid)
    assert r.exit_code == 0, r.output
    with Image.open(grid) as im:
        assert im.size == (128, 64)
        assert im.text["negative_prompt"] == "blurry"
    folder = tmp_path / "many"
    r = run("--model", files / "model", "--prompt", "a cat", "--prompt", "a dog",
            "--batch-size", 1, "--output", folder)
    assert r.exit_code == 0, r.output
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["0000.png", "0001.png"]
    with Image.open(folder / "0001.png") as im:
        assert im.size == (64, 64) and im.text["prompt"] == "a dog"
    # The grid's tiles are the folder's images (same seed, same indices).
    with Image.open(grid) as g, Image.open(folder / "0000.png") as a:
        np.testing.assert_array_equal(np.asarray(g)[:, :64], np.asarray(a))


def test_full_codi_output_uses_its_trained_unet(files, tmp_path):
    outs = {}
    for name in ("adapter-plain", "adapter-full"):
        out = tmp_path / f"{name}.png"
        r = run("--model", files / "model", "--adapter", files / name, "--prompt", "x",
                "--seed", 1, "--output", out)
        assert r.exit_code == 0, r.output
        with Image.open(out) as im:
            outs[name] = (np.asarray(im), im.text.get("unet"))
    assert "using the UNet trained with the adapter" in r.stderr
    assert outs["adapter-full"][1] == str(files / "adapter-full" / "unet")
    assert outs["adapter-plain"][1] in (None, "None")
    assert not np.array_equal(outs["adapter-full"][0], outs["adapter-plain"][0])


def test_adapter_with_control_image(files, tmp_path):
    out = tmp_path / "ctrl.png"
    r = run("--model", files / "model", "--adapter", files / "adapter-cond", "--prompt", "x",
            "--control_image", files / "edges.png", "--resolution", 64, "--output", out)
    assert r.exit_code == 0, r.output
    with Image.open(out) as im:
        assert im.size == (64, 64) and im.text["adapter"] == str(files / "adapter-cond")


@pytest.mark.parametrize("case,code", [
    ("missing_control", 2), ("corrupt_control", 2), ("resolution", 2), ("steps0", 2),
    ("steps_too_many", 2), ("missing_model", 2), ("needs_control", 2), ("no_encoder", 2),
    ("no_prompt", 2),
])
def test_errors(files, tmp_path, case, code):
    out = tmp_path / "out.png"
    base = ["--model", files / "model", "--prompt", "a cat", "--output", out]
    extra = {
        "missing_control": ["--adapter", files / "adapter-cond", "--control_image",
                            files / "nope.png"],
        "corrupt_control": ["--adapter", files / "adapter-cond", "--control_image",
                            files / "corrupt.png"],
        "resolution": ["--resolution", 60],
        "steps0": ["--steps", 0],
        "steps_too_many": ["--steps", 51],
        "missing_model": ["--model", files / "no-such-model"],
        "needs_control": ["--adapter", files / "adapter-cond"],
        "no_encoder": ["--adapter", files / "adapter-plain", "--control_image",
                       files / "edges.png"],
    }.get(case, [])
    args = base + extra if case != "no_prompt" else ["--model", files / "model", "--output", out]
    r = run(*args)
    assert r.exit_code == code, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.output
    assert not out.exists() and not list(tmp_path.iterdir())


@pytest.mark.parametrize("suffix,fmt", [(".jpg", "JPEG"), (".webp", "WEBP")])
def test_other_image_formats(files, tmp_path, suffix, fmt):
    out = tmp_path / f"cat{suffix}"
    r = run("--model", files / "model", "--prompt", "a cat", "--steps", 1, "--output", out)
    assert r.exit_code == 0, r.output
    assert out.is_file()
    with Image.open(out) as im:
        assert im.format == fmt and im.size == (64, 64)
    bad = run("--model", files / "model", "--prompt", "a cat", "--output", tmp_path / "x.gif")
    assert bad.exit_code == 2 and "unknown image type" in bad.output
    assert not (tmp_path / "x.gif").exists()


def test_a_long_prompt_gets_a_truncation_note(files, tmp_path):
    long = " ".join(["red"] * 40)
    r = run("--model", files / "model", "--prompt", long, "--steps", 1, "--output",
            tmp_path / "long.png")
    assert r.exit_code == 0, r.output
    assert "cut off" in r.stderr
    short = run("--model", files / "model", "--prompt", "red", "--steps", 1, "--output",
                tmp_path / "short.png")
    assert "cut off" not in short.stderr
