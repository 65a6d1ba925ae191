"""Quality of few-step sampling on the built-in shapes world: the paper's claim at toy scale.

On a fixed set of held-out captions and edge maps (colour/shape/background combinations that
neither the teacher nor the adapters were trained on), for

- the teacher with DDIM at 50, 8, 4 and 1 steps, text only and with the ControlNet baseline
  adapter (the same adapter architecture trained with the plain diffusion loss);
- the CoDi edge adapter at 4, 2 and 1 steps;
- the text-only CoDi adapter at 4 steps,

it reports condition adherence (edge F1 between the condition and the generated image's
edges), caption adherence (the fraction of images whose background colour, shape colours,
shape kinds and count all match the caption, judged by `codi_eqx.toy` analysis: nearest named
colour, connected components and a fill-ratio shape classifier; no model under test is
involved), the Frechet distance to real held-out images in the feature space of the small
shapes classifier (`FeatureNet`, shipped next to the teacher), and the time per image.

    python benchmarks/quality_toy.py                        # the shipped models
    python benchmarks/quality_toy.py --controlnet RUN_DIR   # a baseline trained elsewhere
    python benchmarks/quality_toy.py --teacher DIR --teacher_only --out OUT.json
        # the teacher's text-only rows alone: a teacher reproduced by `codi pretrain-toy`
        # against the shipped one

Writes benchmarks/results/quality_toy.json and .md (the table) and quality_toy.png (a grid).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RESULTS = Path(__file__).resolve().parent / "results"


def train_baseline(args) -> Path:
    """The ControlNet baseline: the shipped edge adapter's recipe (`SHIPPED_RECIPES`) with the
    plain diffusion objective, trained once into benchmarks/.cache."""
    from codi_eqx.toy._builtin import SHIPPED_RECIPES, TOY_TRAIN_DEFAULTS, prepare_builtin_run
    from codi_eqx.train import TrainConfig, train

    out = Path(__file__).resolve().parent / ".cache" / "controlnet-baseline"
    if (out / "config.json").exists():
        return out
    recipe = dict(TOY_TRAIN_DEFAULTS, **SHIPPED_RECIPES["edges"], objective="controlnet")
    for name in ("onestepode_cfg", "distill_guidance_min", "distill_guidance_max"):
        recipe.pop(name)  # CoDi's teacher-step options: the plain diffusion loss has none
    if args.baseline_steps:
        recipe.update(max_train_steps=args.baseline_steps)
    recipe.update(checkpointing_steps=recipe["max_train_steps"],
                  validation_steps=recipe["max_train_steps"])
    recipe.update(prepare_builtin_run(out, seed=recipe.get("seed", 0)))
    print(f"training the ControlNet baseline into {out} ({recipe['max_train_steps']} steps)",
          flush=True)
    train(TrainConfig(output_dir=str(out), **recipe))
    return out


def main(argv=None) -> int:
    from codi_eqx.toy import builtin_adapter, builtin_teacher

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", type=Path, default=None, help="default: the built-in teacher")
    ap.add_argument("--edges", type=Path, default=None, help="CoDi edge adapter (default: shipped)")
    ap.add_argument("--text", type=Path, default=None, help="CoDi text-only adapter (default: shipped)")
    ap.add_argument("--controlnet", type=Path, default=None,
                    help="ControlNet-objective baseline adapter (a training output); default: "
                    "trained here once, with the edge adapter's recipe, into "
                    "benchmarks/.cache/controlnet-baseline")
    ap.add_argument("--baseline_steps", type=int, default=None,
                    help="steps of the baseline trained here (default: the edge adapter's)")
    ap.add_argument("--feature_net", type=Path, default=None)
    ap.add_argument("--num", type=int, default=128, help="held-out prompts")
    ap.add_argument("--num_real", type=int, default=1024, help="real held-out images for FD")
    ap.add_argument("--guidance_scale", type=float, default=None,
                    help="teacher DDIM guidance (default: codi_eqx.toy._demo.TEACHER_GUIDANCE)")
    ap.add_argument("--batch_size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="a few prompts, a few configurations")
    ap.add_argument("--teacher_only", action="store_true",
                    help="only the teacher's text-only DDIM rows (no adapter is loaded or trained)")
    ap.add_argument("--out", type=Path, default=RESULTS / "quality_toy.json")
    args = ap.parse_args(argv)

    from codi_eqx import load_adapter, load_pipeline
    from codi_eqx.sampling import generate, image_grid
    from codi_eqx.toy import shapes
    from codi_eqx.toy._analysis import (caption_match_parts, edge_f1, features,
                                        frechet_distance, load_feature_net)
    from codi_eqx.toy._builtin import BUILTIN_DIR

    n = 8 if args.quick else args.num
    teacher_dir = args.teacher or builtin_teacher()
    pipe = load_pipeline(teacher_dir)
    from codi_eqx import adapter_settings

    paths = {} if args.teacher_only else {
        "edges": args.edges or builtin_adapter("edges"),
        "text": args.text or builtin_adapter("text"),
        "controlnet": args.controlnet or train_baseline(args)}
    adapters = {k: load_adapter(p) for k, p in paths.items()}
    settings = {k: adapter_settings(p) for k, p in paths.items()}
    net = load_feature_net(args.feature_net or BUILTIN_DIR / "feature-net.eqx")

    held = shapes.scenes(args.seed + 5000, n, "heldout")
    captions = [s.caption for s in held]
    edges = shapes.edge_images(held)
    real = np.stack([shapes.render(s)[0] for s in shapes.scenes(args.seed + 6000, args.num_real, "heldout")])
    real_feats = features(net, real)
    real2 = np.stack([shapes.render(s)[0] for s in held])

    from codi_eqx.toy._demo import TEACHER_GUIDANCE

    w = TEACHER_GUIDANCE if args.guidance_scale is None else args.guidance_scale
    configs = [  # name, adapter, sampler, steps, guidance, uses edges
        ("teacher DDIM 50 (text only)", None, "ddim", 50, w, False),
        ("teacher DDIM 8 (text only)", None, "ddim", 8, w, False),
        ("teacher DDIM 4 (text only)", None, "ddim", 4, w, False),
        ("teacher DDIM 1 (text only)", None, "ddim", 1, w, False),
        ("ControlNet baseline DDIM 50", "controlnet", "ddim", 50, w, True),
        ("ControlNet baseline DDIM 8", "controlnet", "ddim", 8, w, True),
        ("ControlNet baseline DDIM 4", "controlnet", "ddim", 4, w, True),
        ("ControlNet baseline DDIM 1", "controlnet", "ddim", 1, w, True),
        ("CoDi edges 4 steps", "edges", "codi", 4, 1.0, True),
        ("CoDi edges 2 steps", "edges", "codi", 2, 1.0, True),
        ("CoDi edges 1 step", "edges", "codi", 1, 1.0, True),
        ("CoDi text-only 4 steps", "text", "codi", 4, 1.0, False),
    ]
    if args.quick:
        configs = [configs[0], configs[4], configs[8]]
    if args.teacher_only:
        configs = [c for c in configs if c[1] is None]
    rows, grids = [], {}
    for name, which, sampler, steps, gs, uses_edges in configs:
        adapter = adapters[which] if which else None
        kw = dict(steps=steps, sampler=sampler, guidance_scale=gs, seed=args.seed,
                  settings=settings[which] if which else None,
                  batch_size=min(args.batch_size, n),
                  control_images=edges if uses_edges else None)
        generate(pipe, adapter, captions[: kw["batch_size"]],
                 **{**kw, "control_images": edges[: kw["batch_size"]] if uses_edges else None})
        t0 = time.perf_counter()
        images = generate(pipe, adapter, captions, **kw)
        seconds = time.perf_counter() - t0
        parts = [caption_match_parts(im, c) for im, c in zip(images, captions)]
        row = {
            "name": name, "sampler": sampler, "steps": steps, "guidance_scale": gs,
            "condition": "edges" if uses_edges else "text only",
            "edge_f1": float(np.mean([edge_f1(e, im) for e, im in zip(edges, images)])),
            "caption_adherence": float(np.mean([p["all"] for p in parts])),
            "background_ok": float(np.mean([p["background"] for p in parts])),
            "kinds_ok": float(np.mean([p["kinds"] for p in parts])),
            "fd": float(frechet_distance(features(net, images), real_feats)),
            "seconds_per_image": seconds / n,
        }
        rows.append(row)
        grids[name] = images[:8]
        print(f"{name:32s} edgeF1 {row['edge_f1']:.3f}  caption {row['caption_adherence']:.3f}  "
              f"FD {row['fd']:8.2f}  {1000 * row['seconds_per_image']:.1f} ms/img", flush=True)

    reference = {
        "name": "real held-out images", "edge_f1": float(np.mean(
            [edge_f1(e, im) for e, im in zip(edges, real2)])),
        "caption_adherence": float(np.mean([caption_match_parts(im, c)["all"]
                                            for im, c in zip(real2, captions)])),
        "fd": float(frechet_distance(features(net, real2), real_feats)),
    }
    result = {
        "benchmark": "quality_toy", "num_prompts": n, "num_real": args.num_real,
        "guidance_scale": w, "seed": args.seed, "teacher": str(teacher_dir),
        "machine": platform.processor() or platform.machine(),
        "rows": rows, "reference": reference,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    table = ["| configuration | steps | edge F1 | caption adherence | FD | ms / image |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        table.append(f"| {r['name']} | {r['steps']} | {r['edge_f1']:.3f} | "
                     f"{r['caption_adherence']:.3f} | {r['fd']:.2f} | "
                     f"{1000 * r['seconds_per_image']:.1f} |")
    table.append(f"| {reference['name']} (reference) | - | {reference['edge_f1']:.3f} | "
                 f"{reference['caption_adherence']:.3f} | {reference['fd']:.2f} | - |")
    md = "\n".join(table) + "\n"
    args.out.with_suffix(".md").write_text(md)
    print(md)
    from PIL import Image

    picked = [k for k in ("teacher DDIM 50 (text only)", "ControlNet baseline DDIM 50",
                          "ControlNet baseline DDIM 4", "CoDi edges 4 steps", "CoDi edges 1 step")
              if k in grids]
    k = min(8, n)
    grid = image_grid(np.concatenate([edges[:k]] + [grids[p][:k] for p in picked]), cols=k)
    grid = np.repeat(np.repeat(grid, 2, axis=0), 2, axis=1)
    Image.fromarray(grid).save(args.out.with_suffix(".png"))
    print("rows of", args.out.with_suffix(".png"), ": edge maps,", ", ".join(picked))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
