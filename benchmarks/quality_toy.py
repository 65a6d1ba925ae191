"""Quality of few-step sampling on the built-in shapes world: the paper's claim at toy scale,
with intervals that can decide between methods.

Methods: the teacher alone (DDIM, text only), the ControlNet baseline (the same adapter
architecture trained with the plain diffusion loss until its edge F1 stopped rising:
`quality_curve_toy.py controlnet --plateau`) with DDIM, the CoDi edge adapter at 4, 2 and 1
steps, the text-only CoDi adapter at 4 steps. DDIM uses trailing timestep spacing (its
first step at t = 999). Each method's guidance scale is chosen on the training split (the
best whole-caption adherence over `GUIDANCE_SWEEP`, ties to the smaller scale); CoDi rows are
also given at w = 1 (one UNet + adapter pass per step). All rows are then scored on the same
held-out prompts from the same noises, so that every ratio to the reference is paired; its
95 % interval resamples the prompts (`codi_eqx.eval`). Ceilings: the real images and their
VAE round trip.

The judge: `codi_eqx.toy` analysis (caption adherence: background colour, every shape's
colour and kind, the count) and edge F1 of the condition against the image's edges; the
Frechet distance to 2048 real held-out images in the feature space of the shipped
feature network. No model under test takes part in judging.

    python benchmarks/quality_toy.py --controlnet benchmarks/.cache/curve/controlnet-seed0/step-3000
    python benchmarks/quality_toy.py --edges RUN --text RUN --extra "CoDi edges seed 1=RUN2" ...
    python benchmarks/quality_toy.py --quick           # 32 prompts, 2 guidance scales

Writes benchmarks/results/quality_toy.json, .md (the tables) and .png (a grid of samples).
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


def _ci(d: dict, digits: int = 3) -> str:
    f = f"{{:.{digits}f}}"
    return f"{f.format(d['estimate'])} [{f.format(d['low'])}, {f.format(d['high'])}]"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", type=Path, default=None, help="default: the built-in teacher")
    ap.add_argument("--edges", type=Path, default=None, help="CoDi edge adapter (default: shipped)")
    ap.add_argument("--text", type=Path, default=None, help="CoDi text-only adapter (default: shipped)")
    ap.add_argument("--controlnet", type=Path, default=None,
                    help="the converged ControlNet-objective baseline (an adapter directory)")
    ap.add_argument("--extra", action="append", default=[],
                    help="NAME=PATH: another CoDi edge adapter scored like the shipped one "
                    "(e.g. a second training seed); repeatable")
    ap.add_argument("--num", type=int, default=512, help="held-out prompts")
    ap.add_argument("--num_train", type=int, default=128,
                    help="training-split prompts of the guidance sweep")
    ap.add_argument("--num_real", type=int, default=2048, help="real images for the FD")
    ap.add_argument("--sweep", type=float, nargs="+", default=None,
                    help="guidance scales to sweep (default: codi_eqx.toy._quality.GUIDANCE_SWEEP)")
    ap.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples")
    ap.add_argument("--seed", type=int, default=0, help="the sampling noises' seed")
    ap.add_argument("--quick", action="store_true", help="32 prompts, guidance 1 and 3")
    ap.add_argument("--out", type=Path, default=RESULTS / "quality_toy.json")
    args = ap.parse_args(argv)

    from codi_eqx import adapter_settings, load_adapter, load_pipeline
    from codi_eqx.sampling import image_grid
    from codi_eqx.toy import builtin_adapter, builtin_teacher, load_feature_net
    from codi_eqx.toy import _quality as quality
    from codi_eqx.toy._builtin import BUILTIN_DIR

    if args.quick:
        args.num, args.num_train, args.num_real, args.sweep = 32, 16, 256, [1.0, 3.0]
    sweep = tuple(args.sweep or quality.GUIDANCE_SWEEP)
    pipe = load_pipeline(args.teacher or builtin_teacher())
    net = load_feature_net(BUILTIN_DIR / "feature-net.eqx")
    paths = {"edges": args.edges or builtin_adapter("edges"),
             "text": args.text or builtin_adapter("text")}
    if args.controlnet is not None:
        paths["controlnet"] = args.controlnet
    extra = []
    for spec in args.extra:
        name, _, path = spec.partition("=")
        if not path:
            ap.error(f"--extra {spec!r}: expected NAME=PATH")
        paths[name] = Path(path)
        extra.append(name)
    adapters = {k: load_adapter(p) for k, p in paths.items()}
    settings = {k: adapter_settings(p) for k, p in paths.items()}

    M = quality.Method
    methods = [M("teacher DDIM 50 (text only)", None, "ddim", 50, False),
               M("teacher DDIM 4 (text only)", None, "ddim", 4, False)]
    if "controlnet" in paths:
        methods += [M("ControlNet baseline DDIM 50", "controlnet", "ddim", 50, True),
                    M("ControlNet baseline DDIM 4", "controlnet", "ddim", 4, True)]
    methods += [M("CoDi edges 4 steps", "edges", "codi", 4, True),
                M("CoDi edges 2 steps", "edges", "codi", 2, True),
                M("CoDi edges 1 step", "edges", "codi", 1, True)]
    methods += [M(f"{name} 4 steps", name, "codi", 4, True) for name in extra]
    methods += [M("CoDi text-only 4 steps", "text", "codi", 4, False)]

    def run(method, prompts, w):
        adapter = adapters[method.adapter] if method.adapter else None
        cfg = settings[method.adapter] if method.adapter else None
        t0 = time.perf_counter()
        images = quality.sample(pipe, adapter, cfg, method, prompts, w, seed=args.seed)
        return images, (time.perf_counter() - t0) / len(prompts)

    # 1. The guidance sweep on the training split.
    train_prompts = quality.prompt_set("train", args.num_train)
    sweep_rows, chosen = [], {}
    for method in methods:
        best = None
        for w in sweep:
            images, _ = run(method, train_prompts, w)
            s = quality.score_images(images, train_prompts, net)
            caption = float(s.caption["all"].mean())
            sweep_rows.append({"name": method.name, "guidance_scale": w,
                               "caption_adherence": caption,
                               "edge_f1": float(s.edge_f1.mean())})
            print(f"[sweep, training split] {method.name:32s} w {w:4.1f}  caption {caption:.3f}  "
                  f"edge F1 {s.edge_f1.mean():.3f}", flush=True)
            if best is None or caption > best[1]:
                best = (w, caption)
        chosen[method.name] = best[0]

    # 2. Held-out prompts, every row at its chosen scale (CoDi rows also at w = 1).
    prompts = quality.prompt_set("heldout", args.num)
    real = quality.prompt_set("heldout", args.num_real, seed=quality.REAL_SEED)
    real_feats = quality.score_images(real.images, real, net).features
    rows, scores, grids = [], {}, {}
    plan = []
    for method in methods:
        plan.append((method, chosen[method.name]))
        if method.sampler == "codi" and chosen[method.name] != 1.0:
            plan.append((method, 1.0))
    for method, w in plan:
        images, seconds = run(method, prompts, w)
        key = f"{method.name} @ w={w:g}"
        scores[key] = quality.score_images(images, prompts, net)
        grids[key] = images[:8]
        summary = quality.summarise(scores[key], real_feats, num_resamples=args.resamples)
        rows.append({"name": method.name, "key": key, "sampler": method.sampler,
                     "steps": method.steps, "guidance_scale": w,
                     "chosen_on_training_split": w == chosen[method.name],
                     "passes_per_image": method.passes_per_image(w),
                     "condition": "edges" if method.uses_edges else "text only",
                     "seconds_per_image": seconds, **summary})
        print(f"[held-out] {key:40s} caption {_ci(summary['caption_all'])}  edge F1 "
              f"{_ci(summary['edge_f1'])}  FD {_ci(summary['fd'], 1)}", flush=True)

    # 3. Paired ratios to the references.
    fifty = [r for r in rows if r["steps"] == 50 and r["chosen_on_training_split"]]
    reference = max(fifty, key=lambda r: r["caption_all"]["estimate"])
    baseline = next((r for r in fifty if r["name"].startswith("ControlNet")), None)
    for r in rows:
        ratios = quality.compare(scores[r["key"]], scores[reference["key"]], real_feats,
                                 num_resamples=args.resamples)
        r["vs_reference"] = {k: v.as_dict() for k, v in ratios.items()}
        if baseline is not None:
            r["edge_f1_vs_baseline"] = quality.compare(
                scores[r["key"]], scores[baseline["key"]], real_feats,
                num_resamples=args.resamples)["edge_f1_ratio"].as_dict()

    # 4. Ceilings.
    ceilings = {}
    for name, images in (("real held-out images", prompts.images),
                         ("VAE round trip", quality.vae_round_trip(pipe.vae, prompts.images))):
        s = quality.score_images(images, prompts, net)
        ceilings[name] = quality.summarise(s, real_feats, num_resamples=args.resamples)

    result = {"benchmark": "quality_toy", "num_prompts": args.num,
              "num_train_prompts": args.num_train, "num_real": args.num_real,
              "guidance_sweep": list(sweep), "seed": args.seed, "reference": reference["key"],
              "baseline": baseline["key"] if baseline else None,
              "adapters": {k: str(p) for k, p in paths.items()},
              "machine": platform.processor() or platform.machine(),
              "rows": rows, "sweep": sweep_rows, "ceilings": ceilings}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    lines = [f"Held-out prompts: {args.num}; guidance chosen on {args.num_train} training-split "
             f"prompts; 95 % bootstrap intervals; reference: {reference['key']}.", "",
             "| method | w | passes / image | caption adherence | background | kinds | edge F1 "
             "| FD | caption / reference | FD / reference | edge F1 / baseline |",
             "|---" * 11 + "|"]
    for r in rows:
        vs = r["vs_reference"]
        eb = _ci(r["edge_f1_vs_baseline"], 2) if "edge_f1_vs_baseline" in r else "-"
        lines.append(
            f"| {r['name']} | {r['guidance_scale']:g} | {r['passes_per_image']} | "
            f"{_ci(r['caption_all'])} | {r['caption_background']['estimate']:.3f} | "
            f"{r['caption_kinds']['estimate']:.3f} | {_ci(r['edge_f1'])} | {_ci(r['fd'], 1)} | "
            f"{_ci(vs['caption_ratio'], 2)} | {_ci(vs['fd_ratio'], 2)} | {eb} |")
    for name, c in ceilings.items():
        lines.append(f"| {name} (ceiling) | - | - | {_ci(c['caption_all'])} | "
                     f"{c['caption_background']['estimate']:.3f} | "
                     f"{c['caption_kinds']['estimate']:.3f} | {_ci(c['edge_f1'])} | "
                     f"{_ci(c['fd'], 1)} | - | - | - |")
    lines += ["", "Guidance sweep (training split, whole-caption adherence):", "",
              "| method | " + " | ".join(f"w={w:g}" for w in sweep) + " |",
              "|---" * (len(sweep) + 1) + "|"]
    for method in methods:
        cells = [f"{r['caption_adherence']:.3f}" for r in sweep_rows if r["name"] == method.name]
        lines.append(f"| {method.name} | " + " | ".join(cells) + " |")
    md = "\n".join(lines) + "\n"
    args.out.with_suffix(".md").write_text(md)
    print(md)

    from PIL import Image

    wanted = [f"teacher DDIM 50 (text only) @ w={chosen['teacher DDIM 50 (text only)']:g}",
              f"ControlNet baseline DDIM 50 @ w={chosen.get('ControlNet baseline DDIM 50', 0):g}",
              "CoDi edges 4 steps @ w=1", "CoDi edges 1 step @ w=1"]
    picked = [k for k in wanted if k in grids]
    k = min(8, args.num)
    grid = image_grid(np.concatenate([prompts.edges[:k]] + [grids[p][:k] for p in picked]), cols=k)
    Image.fromarray(np.repeat(np.repeat(grid, 2, axis=0), 2, axis=1)).save(
        args.out.with_suffix(".png"))
    print("rows of", args.out.with_suffix(".png"), ": edge maps,", ", ".join(picked))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
