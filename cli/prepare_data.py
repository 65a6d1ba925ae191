"""`codi prepare-data`: the training folder layout (`images/`, `processed_images/` with Canny edge
maps, `meta.jsonl`) from a folder of captioned images."""

from __future__ import annotations

import concurrent.futures as cf
import json
import multiprocessing
import os
from pathlib import Path
from typing import Optional

import typer

from ._common import CodiError, CodiUsageError, atomic_path, note, progress, reported_errors

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
RANDOM_LOW = (50, 100)  # random thresholds: low in [50, 100], high in [150, 200]
RANDOM_HIGH = (150, 200)


def canny_backend() -> str:
    """"opencv" or "skimage", whichever is installed (OpenCV first)."""
    try:
        import cv2  # noqa: F401

        return "opencv"
    except ImportError:
        pass
    try:
        import skimage.feature  # noqa: F401

        return "skimage"
    except ImportError:
        raise CodiError("Canny edge maps need OpenCV or scikit-image: "
                        "pip install codi-eqx[prepare]") from None


def canny(rgb, low: int, high: int, backend: str):
    """The (H, W, 3) uint8 edge map (0 or 255, in all three channels) of an (H, W, 3) uint8
    image, with hysteresis thresholds `low` < `high` on OpenCV's gradient scale."""
    import numpy as np

    if backend == "opencv":
        import cv2

        edges = cv2.Canny(rgb, int(low), int(high))
    else:  # scikit-image: the same thresholds on the Sobel magnitude of the grey image
        from skimage.feature import canny as sk_canny

        grey = rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
        edges = sk_canny(grey, sigma=1.0, low_threshold=low, high_threshold=high) * 255
    edges = np.asarray(edges, np.uint8)
    return np.repeat(edges[:, :, None], 3, axis=2)


def thresholds(seed: int, i: int, low: Optional[int], high: Optional[int]) -> tuple[int, int]:
    """Fixed thresholds, or random ones for image `i` seeded by (seed, i)."""
    if low is not None and high is not None:
        return low, high
    import numpy as np

    rng = np.random.default_rng([seed, i])
    return (int(rng.integers(RANDOM_LOW[0], RANDOM_LOW[1] + 1)),
            int(rng.integers(RANDOM_HIGH[0], RANDOM_HIGH[1] + 1)))


def _write_png(array, path: Path) -> None:
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")


def process_one(task: tuple) -> tuple[int, Optional[str]]:
    """Convert image `i`: (i, None) on success, (i, reason) when it is unreadable."""
    i, source, out_dir, low, high, backend = task
    import numpy as np
    from PIL import Image

    try:
        with Image.open(source) as im:
            im.load()
            rgb = np.asarray(im.convert("RGB"))
    except Exception as e:  # noqa: BLE001 - any decoder failure means "unreadable"
        return i, f"{type(e).__name__}: {e}"
    name = f"image_{i}.png"
    _write_png(rgb, Path(out_dir) / "images" / name)
    _write_png(canny(rgb, low, high, backend), Path(out_dir) / "processed_images" / name)
    return i, None


def _read_captions(input_dir: Path, images: list[Path], captions: Optional[Path]) -> list:
    """Each image's caption (None when it has none): from `captions` (jsonl with `file_name`
    or `image`, and `caption` or `text`), else from the sidecar `<image stem>.txt`."""
    if captions is None:
        out = []
        for p in images:
            txt = p.with_suffix(".txt")
            out.append(txt.read_text(encoding="utf-8").strip() if txt.is_file() else None)
        return out
    if not captions.is_file():
        raise CodiUsageError(f"{captions}: no such captions file")
    table = {}
    for n, line in enumerate(captions.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            key = row.get("file_name", row.get("image"))
            text = row.get("caption", row.get("text"))
        except (json.JSONDecodeError, AttributeError):
            raise CodiUsageError(f"{captions}:{n}: not a JSON object") from None
        if key is None or text is None:
            raise CodiUsageError(f"{captions}:{n}: needs 'file_name' (or 'image') and "
                                 "'caption' (or 'text')")
        table[str(Path(key))] = text
    return [table.get(str(p.relative_to(input_dir)), table.get(p.name)) for p in images]


def prepare_data(
    input_dir: Optional[Path] = typer.Argument(
        None, help="Folder of images (searched recursively), each with a caption in a sidecar "
        "<name>.txt or in --captions. With --synthetic: the output folder."),
    train_data_dir: Optional[Path] = typer.Option(None, "--train_data_dir", "--train-data-dir",
                                                  help="Output folder: images/, "
                                                  "processed_images/ (Canny edge maps), "
                                                  "meta.jsonl."),
    synthetic: Optional[str] = typer.Option(
        None, "--synthetic", help="Generate a synthetic dataset instead of reading images: "
        "'shapes' (64x64 coloured circles, squares and triangles on a plain background, "
        "captioned, their outlines as condition images; the built-in default's world)."),
    num_images: int = typer.Option(1000, "--num_images", "--num-images", min=1,
                                   help="With --synthetic: how many images."),
    split: str = typer.Option("train", "--split", help="With --synthetic: 'train' (no "
                              "held-out colour/shape/background combination) or 'heldout' "
                              "(each image has one)."),
    captions: Optional[Path] = typer.Option(None, "--captions", help="A jsonl of captions: "
                                            "{\"file_name\": relative path, \"caption\": text} "
                                            "per line (instead of sidecar .txt files)."),
    low_threshold: Optional[int] = typer.Option(None, "--low_threshold", "--low-threshold",
                                                help="Fixed low Canny threshold (with "
                                                "--high_threshold); default: random in "
                                                "[50, 100] per image."),
    high_threshold: Optional[int] = typer.Option(None, "--high_threshold", "--high-threshold",
                                                 help="Fixed high Canny threshold; default: "
                                                 "random in [150, 200] per image."),
    max_train_samples: Optional[int] = typer.Option(None, "--max_train_samples",
                                                    "--max-train-samples",
                                                    help="Use the first N images only."),
    num_proc: int = typer.Option(1, "--num_proc", "--num-proc", help="Worker processes."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random thresholds."),
) -> None:
    """Build the training folder layout from captioned images, with Canny edge maps as the
    condition images. Unreadable images are skipped and counted; meta.jsonl appears whole or
    not at all."""
    with reported_errors():
        if synthetic is not None:
            _synthetic(synthetic, input_dir, train_data_dir, num_images, split, seed)
            return
        if input_dir is None or train_data_dir is None:
            raise CodiUsageError("give INPUT_DIR and --train_data_dir (or --synthetic shapes OUT)")
        _prepare(input_dir, train_data_dir, captions, low_threshold, high_threshold,
                 max_train_samples, num_proc, seed)


def _synthetic(kind: str, out: Optional[Path], train_data_dir: Optional[Path], n: int,
               split: str, seed: int) -> None:
    if kind != "shapes":
        raise CodiUsageError(f"--synthetic {kind!r}: the only synthetic dataset is 'shapes'")
    if split not in ("train", "heldout"):
        raise CodiUsageError(f"--split {split!r}: expected train or heldout")
    if out is not None and train_data_dir is not None and out != train_data_dir:
        raise CodiUsageError("give the output folder once (OUT or --train_data_dir)")
    target = out or train_data_dir
    if target is None:
        raise CodiUsageError("give the output folder: codi prepare-data --synthetic shapes OUT")
    if (target / "meta.jsonl").exists():
        raise CodiUsageError(f"{target} already holds a dataset: choose another folder")
    from codi_eqx.toy import shapes

    with progress() as bar, atomic_path(target, is_dir=True) as tmp:
        task = bar.add_task("shapes", total=n, info="")
        shapes.write_dataset(tmp, n, seed=seed, split=split,
                             progress=lambda k: bar.update(task, advance=k))
    note(f"wrote {n} {split} shapes images to {target}")


def _prepare(input_dir, out_dir, captions, low, high, max_train_samples, num_proc, seed) -> None:
    if not Path(input_dir).is_dir():
        raise CodiUsageError(f"{input_dir}: no such folder")
    if (low is None) != (high is None):
        raise CodiUsageError("give both --low_threshold and --high_threshold, or neither")
    if low is not None and not 0 <= low < high:
        raise CodiUsageError(f"thresholds must satisfy 0 <= low < high (got {low}, {high})")
    if num_proc < 1:
        raise CodiUsageError(f"--num_proc must be at least 1 (got {num_proc})")
    input_dir, out_dir = Path(input_dir).resolve(), Path(out_dir).resolve()
    if out_dir == input_dir or input_dir in out_dir.parents:
        raise CodiUsageError("--train_data_dir must be outside the input folder")
    backend = canny_backend()
    images = sorted(p for p in input_dir.rglob("*")
                    if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not images:
        raise CodiUsageError(f"{input_dir}: no images found")
    texts = _read_captions(input_dir, images, captions)
    uncaptioned = [p for p, t in zip(images, texts) if t is None]
    pairs = [(p, t) for p, t in zip(images, texts) if t is not None]
    if not pairs:
        raise CodiUsageError(f"{input_dir}: no image has a caption (a sidecar .txt or --captions)")
    if max_train_samples is not None:
        pairs = pairs[:max_train_samples]
    for sub in ("images", "processed_images"):
        (out_dir / sub).mkdir(parents=True, exist_ok=True)
    tasks = [(i, str(p), str(out_dir), *thresholds(seed, i, low, high), backend)
             for i, (p, _) in enumerate(pairs)]
    failed: dict[int, str] = {}
    with progress() as bar:
        task = bar.add_task("prepare-data", total=len(tasks), info="")

        def done(i: int, reason: Optional[str]) -> None:
            if reason is not None:
                failed[i] = reason
            bar.update(task, advance=1, info=f"skipped {len(failed)}" if failed else "")

        if num_proc == 1:
            for t in tasks:
                done(*process_one(t))
        else:
            ctx = multiprocessing.get_context("spawn")
            with cf.ProcessPoolExecutor(num_proc, mp_context=ctx) as pool:
                for i, reason in pool.map(process_one, tasks, chunksize=max(1, len(tasks) // (
                        8 * num_proc))):
                    done(i, reason)
    with atomic_path(out_dir / "meta.jsonl") as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            for i, (_, text) in enumerate(pairs):
                if i not in failed:
                    f.write(json.dumps({"image": f"images/image_{i}.png",
                                        "conditioning_image": f"processed_images/image_{i}.png",
                                        "caption": text}) + "\n")
            f.flush()
            os.fsync(f.fileno())
    written = len(pairs) - len(failed)
    for i, reason in sorted(failed.items())[:5]:
        note(f"skipped unreadable image {pairs[i][0].name} ({reason})")
    note(f"wrote {written} examples to {out_dir}"
         + (f"; skipped {len(failed)} unreadable" if failed else "")
         + (f"; {len(uncaptioned)} images without a caption ignored" if uncaptioned else ""))
    if written == 0:
        raise CodiError("no readable image: nothing to train on")
