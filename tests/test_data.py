"""The data package (datasets, transform, loader, latent cache) and `codi prepare-data`."""

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from helpers import make_seed_folder, png_bytes
from PIL import Image

from codi_eqx.data import (
    DataConfig,
    DataError,
    DataLoader,
    LatentCache,
    expand_braces,
    global_batch_size,
    image_to_array,
    open_dataset,
)

R = 16


def make_shards(root: Path, n_shards: int = 3, per_shard: int = 4, cond: bool = True) -> str:
    rng = np.random.default_rng(1)
    root.mkdir(parents=True)
    for s in range(n_shards):
        with tarfile.open(root / f"{s:05d}.tar", "w") as tar:
            for j in range(per_shard):
                key = f"{s:03d}{j:03d}"
                files = {f"{key}.jpg": png_bytes(rng), f"{key}.json": json.dumps(
                    {"caption": f"shard {s} item {j}"}).encode()}
                if cond:
                    files[f"{key}.cond.png"] = png_bytes(rng)
                for name, data in files.items():
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return str(root / ("{00000..%05d}.tar" % (n_shards - 1)))


@pytest.fixture(scope="module")
def seed_dir(tmp_path_factory):
    return make_seed_folder(tmp_path_factory.mktemp("seed") / "data")


def _loader(location, **kw):
    cfg_keys = {"proportion_empty_prompts", "max_train_samples", "caption_column",
                "image_column", "conditioning_image_column", "unconditional", "shuffle_buffer"}
    cfg = DataConfig(train_data_dir=str(location), resolution=R,
                     **{k: kw.pop(k) for k in list(kw) if k in cfg_keys})
    kw.setdefault("global_batch_size", 4)
    return DataLoader.from_config(cfg, **kw)


def _take(loader, n):
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == n:
            break
    return out


# --- transform ------------------------------------------------------------------------------

def test_transform_range_shape_and_centre_crop():
    # 40x20 image: black, a white 20x20 centre square, black.
    img = np.zeros((20, 40, 3), np.uint8)
    img[:, 10:30] = 255
    x = image_to_array(Image.fromarray(img), 10, signed=True)
    assert x.shape == (3, 10, 10) and x.dtype == np.float32
    assert x.min() >= -1 and x.max() <= 1
    # the crop is the white centre (its border columns blurred by the bilinear downscale)
    np.testing.assert_allclose(x[:, :, 1:-1], 1.0, atol=1e-6)
    np.testing.assert_allclose(x[:, :, 0], x[:, :, -1])
    assert x[:, :, 0].min() > 0.4
    y = image_to_array(Image.fromarray(img), 10, signed=False)
    np.testing.assert_allclose(y[:, :, 1:-1], 1.0, atol=1e-6)
    assert y.min() > 0.7
    z = image_to_array(Image.fromarray(img[:, :5]), 8, signed=False)  # upscaled, tall
    assert z.shape == (3, 8, 8) and 0 <= z.min() and z.max() <= 1


# --- formats --------------------------------------------------------------------------------

def test_seed_folder_foreign_absolute_paths(seed_dir):
    ds = open_dataset(DataConfig(train_data_dir=str(seed_dir), resolution=R))
    assert len(ds) == 12 and ds.conditioned
    raw = ds.raw(3)
    assert Path(raw.image) == seed_dir / "images" / "image_3.png"
    assert Path(raw.conditioning) == seed_dir / "processed_images" / "image_3.png"
    batch = next(iter(_loader(seed_dir)))
    assert batch["pixel_values"].shape == (4, 3, R, R)
    assert batch["pixel_values"].dtype == np.float32
    assert -1 <= batch["pixel_values"].min() and batch["pixel_values"].max() <= 1
    c = batch["conditioning_pixel_values"]
    assert c.shape == (4, 3, R, R) and 0 <= c.min() and c.max() <= 1
    assert batch["caption"] == [f"caption {i}" for i in batch["index"]]
    assert batch["index"].dtype == np.int64


def test_imagefolder_metadata(tmp_path):
    rng = np.random.default_rng(0)
    rows = []
    for i in range(5):
        (tmp_path / f"{i}.png").write_bytes(png_bytes(rng))
        (tmp_path / f"c{i}.png").write_bytes(png_bytes(rng))
        rows.append({"file_name": f"{i}.png", "conditioning_image_file_name": f"c{i}.png",
                     "text": f"t{i}"})
    (tmp_path / "metadata.jsonl").write_text("\n".join(map(json.dumps, rows)))
    batch = next(iter(_loader(tmp_path, global_batch_size=5)))
    assert sorted(batch["caption"]) == [f"t{i}" for i in range(5)]
    assert "conditioning_pixel_values" in batch
    uncond = next(iter(_loader(tmp_path, global_batch_size=5, unconditional=True)))
    assert "conditioning_pixel_values" not in uncond


def test_tar_shards_brace_pattern(tmp_path):
    assert expand_braces("a/{000..002}.tar") == ["a/000.tar", "a/001.tar", "a/002.tar"]
    assert expand_braces("{a,b}{1..2}") == ["a1", "a2", "b1", "b2"]
    pattern = make_shards(tmp_path / "shards")
    loader = _loader(pattern, global_batch_size=4, shuffle_buffer=5, num_epochs=1)
    batches = list(loader)
    assert len(batches) == 3
    captions = sorted(c for b in batches for c in b["caption"])
    assert captions == sorted(f"shard {s} item {j}" for s in range(3) for j in range(4))
    assert batches[0]["conditioning_pixel_values"].shape == (4, 3, R, R)
    again = list(_loader(pattern, global_batch_size=4, shuffle_buffer=5, num_epochs=1))
    assert [b["caption"] for b in again] == [b["caption"] for b in batches]
    other = list(_loader(pattern, global_batch_size=4, shuffle_buffer=5, num_epochs=1, seed=1))
    assert [b["caption"] for b in other] != [b["caption"] for b in batches]
    # resume in the middle of a streamed epoch; and two processes' shares
    first = _loader(pattern, global_batch_size=4, shuffle_buffer=5, num_epochs=1)
    _take(first, 1)
    resumed = _loader(pattern, global_batch_size=4, shuffle_buffer=5, num_epochs=1)
    resumed.load_state_dict(first.state_dict())
    assert [b["caption"] for b in resumed] == [b["caption"] for b in batches[1:]]
    halves = [list(_loader(pattern, global_batch_size=4, shuffle_buffer=5, num_epochs=1,
                           process_index=p, process_count=2)) for p in range(2)]
    assert [a["caption"] + b["caption"] for a, b in zip(*halves)] == [
        b["caption"] for b in batches]


def test_tar_missing_caption_column(tmp_path):
    pattern = make_shards(tmp_path / "s", n_shards=1, per_shard=2)
    with pytest.raises(DataError, match="no caption 'prompt'") as e:
        open_dataset(DataConfig(train_data_dir=pattern, caption_column="prompt"))
    assert "\n" not in str(e.value)


def test_hf_save_to_disk(tmp_path):
    datasets = pytest.importorskip("datasets", reason="the [hf] extra is not installed")
    rng = np.random.default_rng(0)
    imgs = [Image.open(io.BytesIO(png_bytes(rng))) for _ in range(8)]
    ds = datasets.Dataset.from_dict(
        {"original_image": imgs[:4], "transformed_image": imgs[4:],
         "prompt": [["a", "b"], ["c"], ["d"], ["e"]]},
        features=datasets.Features({"original_image": datasets.Image(),
                                    "transformed_image": datasets.Image(),
                                    "prompt": datasets.Sequence(datasets.Value("string"))}))
    ds.save_to_disk(str(tmp_path / "hf"))
    cfg = DataConfig(dataset_name=str(tmp_path / "hf"), load_from_disk=True, resolution=R,
                     image_column="original_image", caption_column="prompt",
                     conditioning_image_column="transformed_image")
    batch = next(iter(DataLoader.from_config(cfg, global_batch_size=4)))
    assert batch["pixel_values"].shape == (4, 3, R, R)
    assert batch["conditioning_pixel_values"].shape == (4, 3, R, R)
    assert set(batch["caption"]) <= {"a", "b", "c", "d", "e"}
    with pytest.raises(DataError, match="no image column 'image'"):
        open_dataset(DataConfig(dataset_name=str(tmp_path / "hf"), load_from_disk=True))


# --- options --------------------------------------------------------------------------------

def test_caption_lists_and_empty_prompts(tmp_path):
    root = make_seed_folder(tmp_path / "d", n=8, captions=lambda i: [f"{i}a", f"{i}b", f"{i}c"])
    seen = set()
    loader = _loader(root, global_batch_size=8, num_epochs=6)
    for batch in loader:
        for i, c in zip(batch["index"], batch["caption"]):
            assert c in {f"{i}a", f"{i}b", f"{i}c"}
            seen.add(c)
    assert len(seen) > 8  # different choices across epochs
    again = [b["caption"] for b in _loader(root, global_batch_size=8, num_epochs=6)]
    assert again == [b["caption"] for b in _loader(root, global_batch_size=8, num_epochs=6)]
    empty = [c for b in _loader(root, global_batch_size=8, num_epochs=10,
                                proportion_empty_prompts=0.5) for c in b["caption"]]
    assert 10 < empty.count("") < 70
    assert all(c == "" for b in _loader(root, global_batch_size=8, num_epochs=1,
                                         proportion_empty_prompts=1.0) for c in b["caption"])


def test_max_train_samples(seed_dir):
    loader = _loader(seed_dir, max_train_samples=5, global_batch_size=2, num_epochs=1)
    assert len(loader.dataset) == 5 and loader.steps_per_epoch == 2
    assert all(int(i) < 5 for b in loader for i in b["index"])


def test_missing_column_is_one_line(seed_dir):
    for kw, what in [({"image_column": "photo"}, "image"),
                     ({"caption_column": "prompt"}, "caption"),
                     ({"conditioning_image_column": "edges"}, "condition image")]:
        with pytest.raises(DataError, match=f"no {what} column") as e:
            open_dataset(DataConfig(train_data_dir=str(seed_dir), **kw))
        assert "\n" not in str(e.value) and "meta.jsonl" in str(e.value)
    with pytest.raises(DataError, match="no such folder"):
        open_dataset(DataConfig(train_data_dir=str(seed_dir / "nope")))


# --- loader determinism ---------------------------------------------------------------------

def _indices(loader, n):
    return [b["index"].tolist() for b in _take(loader, n)]


def test_order_depends_on_seed_and_global_batch_only(seed_dir):
    assert global_batch_size(1, 4) == global_batch_size(4, 1) == 4
    a = _indices(_loader(seed_dir, seed=3), 5)
    assert a == _indices(_loader(seed_dir, seed=3, num_workers=2), 5)
    assert a != _indices(_loader(seed_dir, seed=4), 5)
    flat = sorted(i for b in a[:3] for i in b)
    assert flat == list(range(12))  # an epoch is a permutation
    one = _take(_loader(seed_dir, seed=3), 3)
    shares = [_take(_loader(seed_dir, seed=3, process_index=p, process_count=2), 3)
              for p in range(2)]
    for full, s0, s1 in zip(one, *shares):
        np.testing.assert_array_equal(
            full["pixel_values"], np.concatenate([s0["pixel_values"], s1["pixel_values"]]))
        assert full["caption"] == s0["caption"] + s1["caption"]
    with pytest.raises(DataError, match="does not divide"):
        _loader(seed_dir, process_count=3)


def test_resume_continues_exactly(seed_dir):
    straight = _indices(_loader(seed_dir, seed=1), 7)
    first = _loader(seed_dir, seed=1, num_workers=2)
    assert _indices(first, 4) == straight[:4]
    state = first.state_dict()
    assert state == {"epoch": 1, "batch_in_epoch": 1, "seed": 1, "global_batch_size": 4}
    second = _loader(seed_dir, seed=1)
    second.load_state_dict(json.loads(json.dumps(state)))
    assert _indices(second, 3) == straight[4:]
    with pytest.raises(DataError, match="seed"):
        _loader(seed_dir, seed=2).load_state_dict(state)


def test_corrupt_image_skipped_counted_strict_fatal(tmp_path):
    root = make_seed_folder(tmp_path / "d", n=8, foreign=False)
    (root / "images" / "image_5.png").write_bytes(b"not a png")
    (root / "processed_images" / "image_6.png").write_bytes(png_bytes(np.random.default_rng(0))[:60])
    skipped = []
    loader = _loader(root, num_epochs=1, on_skip=lambda name, msg: skipped.append(name))
    batches = list(loader)
    assert loader.skipped == 2 and sorted(skipped) == ["image_5.png", "image_6.png"]
    assert all(b["pixel_values"].shape == (4, 3, R, R) for b in batches)
    assert not {5, 6} & {int(i) for b in batches for i in b["index"]}
    again = list(_loader(root, num_epochs=1, num_workers=2, on_skip=lambda *a: None))
    assert [b["index"].tolist() for b in again] == [b["index"].tolist() for b in batches]
    with pytest.raises(DataError, match=r"unreadable image image_[56]\.png"):
        list(_loader(root, num_epochs=1, strict=True))


# --- latent cache ---------------------------------------------------------------------------

def test_latent_cache_round_trip(tmp_path, seed_dir):
    loader = _loader(seed_dir, num_epochs=1)
    calls = {"images": 0, "texts": 0}

    def enc_images(x):
        calls["images"] += len(x)
        m = x[:, :1, ::4, ::4].repeat(4, axis=1)
        return m, -np.abs(m)

    def enc_texts(captions):
        calls["texts"] += len(captions)
        return np.stack([np.full((3, 2), len(c), np.float32) for c in captions])

    cache = LatentCache(tmp_path / "c", fingerprint=loader.dataset.fingerprint, resolution=R)
    first = [cache.encode(b, enc_images, enc_texts) for b in loader]
    assert calls == {"images": 12, "texts": 12}
    assert first[0]["latent_mean"].shape == (4, 4, 4, 4)
    assert first[0]["text_embeddings"].shape == (4, 3, 2)
    reopened = LatentCache(tmp_path / "c", fingerprint=loader.dataset.fingerprint, resolution=R)
    second = [reopened.encode(b) for b in _loader(seed_dir, num_epochs=1)]  # no encoders needed
    for a, b in zip(first, second):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    np.testing.assert_allclose(first[0]["latent_mean"],
                               enc_images(next(iter(_loader(seed_dir)))["pixel_values"])[0],
                               atol=2e-3)
    with pytest.raises(DataError, match="another dataset, resolution"):
        LatentCache(tmp_path / "c", fingerprint=loader.dataset.fingerprint, resolution=R * 2)
    LatentCache(tmp_path / "c", fingerprint="x", resolution=R, overwrite=True)
    assert not (tmp_path / "c" / "latents").exists()


# --- codi prepare-data ----------------------------------------------------------------------

def _cli():
    import typer
    from typer.testing import CliRunner

    from cli.prepare_data import prepare_data

    app = typer.Typer()
    app.command()(prepare_data)
    return app, CliRunner()


def _captioned_images(root: Path, n: int = 4) -> Path:
    rng = np.random.default_rng(2)
    root.mkdir(parents=True)
    for i in range(n):
        img = np.zeros((24, 40, 3), np.uint8)
        img[6:18, 10 + i:30] = rng.integers(100, 256, 3, dtype=np.uint8)
        Image.fromarray(img).save(root / f"p{i}.png")
        (root / f"p{i}.txt").write_text(f"a box {i}\n")
    return root


def test_prepare_data_end_to_end(tmp_path):
    pytest.importorskip("cv2", reason="the [prepare] extra (OpenCV) is not installed")
    src = _captioned_images(tmp_path / "src")
    (src / "broken.png").write_bytes(b"nope")
    (src / "broken.txt").write_text("broken")
    (src / "nocap.png").write_bytes((src / "p0.png").read_bytes())
    app, runner = _cli()
    out = tmp_path / "out"
    r = runner.invoke(app, [str(src), "--train_data_dir", str(out), "--num_proc", "2"])
    assert r.exit_code == 0, r.output
    assert "skipped 1 unreadable" in r.output and "1 images without a caption" in r.output
    meta = [json.loads(line) for line in (out / "meta.jsonl").read_text().splitlines()]
    assert sorted(m["caption"] for m in meta) == [f"a box {i}" for i in range(4)]
    edges = np.asarray(Image.open(out / meta[0]["conditioning_image"]))
    assert edges.shape == (24, 40, 3) and set(np.unique(edges)) <= {0, 255} and edges.max() == 255
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary left over
    loader = _loader(out, num_epochs=1)  # the result is a training folder
    assert next(iter(loader))["conditioning_pixel_values"].shape == (4, 3, R, R)
    # fixed thresholds and a captions file
    caps = tmp_path / "caps.jsonl"
    caps.write_text("\n".join(json.dumps({"file_name": f"p{i}.png", "caption": f"c{i}"})
                              for i in range(4)))
    out2 = tmp_path / "out2"
    r = runner.invoke(app, [str(src), "--train-data-dir", str(out2), "--captions", str(caps),
                            "--low_threshold", "100", "--high_threshold", "200",
                            "--max_train_samples", "2"])
    assert r.exit_code == 0, r.output
    assert [json.loads(x)["caption"] for x in (out2 / "meta.jsonl").read_text().splitlines()] == [
        "c0", "c1"]


def test_prepare_data_errors(tmp_path):
    app, runner = _cli()
    src = _captioned_images(tmp_path / "src", n=1)
    out = str(tmp_path / "out")
    cases = [
        ([str(tmp_path / "missing"), "--train_data_dir", out], "no such folder"),
        ([str(src), "--train_data_dir", out, "--low_threshold", "10"], "give both"),
        ([str(src), "--train_data_dir", out, "--low_threshold", "200", "--high_threshold", "100"],
         "low < high"),
        ([str(src), "--train_data_dir", out, "--captions", str(tmp_path / "x.jsonl")],
         "no such captions file"),
    ]
    for args, message in cases:
        r = runner.invoke(app, args)
        assert r.exit_code == 2 and message in r.output, r.output
        assert r.output.count("\n") == 1


def test_prepare_data_without_edge_library(tmp_path, monkeypatch):
    import sys

    app, runner = _cli()
    monkeypatch.setitem(sys.modules, "cv2", None)
    monkeypatch.setitem(sys.modules, "skimage", None)
    monkeypatch.setitem(sys.modules, "skimage.feature", None)
    src = _captioned_images(tmp_path / "src", n=1)
    r = runner.invoke(app, [str(src), "--train_data_dir", str(tmp_path / "out")])
    assert r.exit_code == 1 and "pip install codi-eqx[prepare]" in r.output
    assert r.output.count("\n") == 1
    assert "--low_threshold" in runner.invoke(app, ["--help"]).output
