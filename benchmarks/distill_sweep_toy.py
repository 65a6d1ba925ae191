"""What moves CoDi's caption adherence on the built-in shapes world: N, tau, guidance, the
learning rate, at one training length.

Each variant is the shipped edge adapter's recipe (`codi_eqx.toy._builtin.SHIPPED_RECIPES`,
the defaults of `codi train` on the built-in teacher) with a few options changed, trained for
`--steps` steps into benchmarks/.cache/sweep/NAME (reused when already there), then sampled
with 4 CoDi steps on the held-out captions and edge maps of `quality_toy.py` and scored the
same way (edge F1, caption adherence and its parts, Frechet distance).

    python benchmarks/distill_sweep_toy.py --steps 800 --num 64
    python benchmarks/distill_sweep_toy.py --variants base n20 --steps 800

Writes benchmarks/results/distill_sweep_toy.json and .md. Variants can be trained in
parallel processes (`--train_only`), and scored afterwards in one.
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
CACHE = Path(__file__).resolve().parent / ".cache" / "sweep"

VARIANTS: dict[str, dict] = {
    "base": {},
    "n20": {"distill_learning_steps": 20},
    "tau0.1": {"distill_timestep_scaling": 0.1},
    "cfg-aware": {"cfg_aware_distill": True, "distill_guidance_min": 2.0,
                  "distill_guidance_max": 6.0},
    "w2": {"distill_guidance_min": 2.0, "distill_guidance_max": 2.0},
    "lr3e-4": {"learning_rate": 3e-4},
    "reg-snr1": {"regularizer_snr_gamma": 1.0},
    "guided": {"regularizer_target": "guided"},
    "guided-w3": {"regularizer_target": "guided", "distill_guidance_min": 3.0,
                  "distill_guidance_max": 3.0},
    "guided-alpha": {"regularizer_target": "guided", "regularizer_guidance_scaling": "alpha"},
    "gemb-guided-alpha": {"guidance_embedding": True, "regularizer_target": "guided",
                          "regularizer_guidance_scaling": "alpha",
                          "distill_guidance_min": 1.0, "distill_guidance_max": 6.0},
    "guided-full": {"regularizer_target": "guided", "full_codi": True},
    "full": {"full_codi": True},
    "gemb-guided": {"guidance_embedding": True, "regularizer_target": "guided",
                    "distill_guidance_min": 1.0, "distill_guidance_max": 6.0},
}
"""Changes to the shipped edge recipe (`TrainConfig` field names)."""

SAMPLE_GUIDANCE = {"cfg-aware": 3.0, "gemb-guided": 4.0, "gemb-guided-alpha": 4.0}
"""Guidance at sampling for variants trained guidance-aware (two passes per step) or
guidance-conditioned (one pass per step); the others sample unguided."""


def run_dir(name: str, steps: int) -> Path:
    return CACHE / f"{name}-{steps}"


def train_variant(name: str, steps: int) -> Path:
    from codi_eqx.toy._builtin import SHIPPED_RECIPES, TOY_TRAIN_DEFAULTS, prepare_builtin_run
    from codi_eqx.train import TrainConfig, train

    out = run_dir(name, steps)
    if (out / "config.json").exists():
        return out
    recipe = dict(TOY_TRAIN_DEFAULTS, **SHIPPED_RECIPES["edges"], **VARIANTS[name])
    recipe.update(max_train_steps=steps, checkpointing_steps=steps, validation_steps=steps)
    recipe.update(prepare_builtin_run(out, seed=recipe.get("seed", 0)))
    timing = out / "sweep-seconds.json"  # training seconds so far (an interrupted run resumes)
    spent = json.loads(timing.read_text())["seconds"] if timing.exists() else 0.0
    if (out / "checkpoints").is_dir() and any((out / "checkpoints").iterdir()):
        recipe["resume_from_checkpoint"] = "latest"
    print(f"training {name} into {out} ({steps} steps): {VARIANTS[name]}", flush=True)
    t0 = time.perf_counter()
    try:
        train(TrainConfig(output_dir=str(out), **recipe))
    finally:
        timing.write_text(json.dumps({"seconds": spent + time.perf_counter() - t0}) + "\n")
    (out / "sweep.json").write_text(json.dumps(
        {"variant": name, "changes": VARIANTS[name], "steps": steps,
         "train_seconds": spent + time.perf_counter() - t0}) + "\n")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--steps", type=int, default=800, help="training steps of every variant")
    ap.add_argument("--num", type=int, default=128, help="held-out prompts")
    ap.add_argument("--num_real", type=int, default=1024, help="real held-out images for FD")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train_only", action="store_true", help="train, do not score")
    ap.add_argument("--out", type=Path, default=RESULTS / "distill_sweep_toy.json")
    args = ap.parse_args(argv)

    dirs = {name: train_variant(name, args.steps) for name in args.variants}
    if args.train_only:
        return 0
    if "base" not in dirs and (run_dir("base", args.steps) / "config.json").exists():
        dirs = {"base": run_dir("base", args.steps), **dirs}  # the paired reference

    import dataclasses

    from codi_eqx import adapter_settings, load_adapter, load_pipeline, load_trained_unet
    from codi_eqx.toy import builtin_teacher, load_feature_net
    from codi_eqx.toy import _quality as quality
    from codi_eqx.toy._builtin import BUILTIN_DIR

    pipe = load_pipeline(builtin_teacher())
    net = load_feature_net(BUILTIN_DIR / "feature-net.eqx")
    prompts = quality.prompt_set("heldout", args.num)
    real = quality.prompt_set("heldout", args.num_real, seed=quality.REAL_SEED)
    real_feats = quality.score_images(real.images, real, net).features
    method = quality.Method("CoDi edges 4 steps", "edges", "codi", 4, True)

    rows, scores = [], {}
    for name, out in dirs.items():
        gs = SAMPLE_GUIDANCE.get(name, 1.0)
        trained_unet = load_trained_unet(out)  # full CoDi trains the UNet too
        run_pipe = pipe if trained_unet is None else dataclasses.replace(pipe, unet=trained_unet)
        images = quality.sample(run_pipe, load_adapter(out), adapter_settings(out), method,
                                prompts, gs, seed=args.seed)
        scores[name] = quality.score_images(images, prompts, net)
        meta = json.loads((out / "sweep.json").read_text()) if (out / "sweep.json").exists() else {}
        summary = quality.summarise(scores[name], real_feats)
        row = {
            "variant": name, "changes": VARIANTS[name], "steps": args.steps,
            "sample_guidance": gs, "num_prompts": args.num, **summary,
            "train_seconds": meta.get("train_seconds"),
        }
        if "base" in scores and name != "base":
            row["vs_base"] = {k: v.as_dict() for k, v in quality.compare(
                scores[name], scores["base"], real_feats).items()}
        rows.append(row)
        print(f"{name:16s} caption {summary['caption_all']['estimate']:.3f} "
              f"[{summary['caption_all']['low']:.3f}, {summary['caption_all']['high']:.3f}]  "
              f"background {summary['caption_background']['estimate']:.3f}  "
              f"edgeF1 {summary['edge_f1']['estimate']:.3f}  FD {summary['fd']['estimate']:.1f}",
              flush=True)

    # Keep the rows of earlier runs (other variants or lengths) beside the new ones.
    earlier = json.loads(args.out.read_text()).get("rows", []) if args.out.exists() else []
    earlier = [r for r in earlier if isinstance(r.get("edge_f1"), dict)]  # this format only
    fresh = {(r["variant"], r["steps"]) for r in rows}
    rows = [r for r in earlier if (r["variant"], r["steps"]) not in fresh] + rows
    rows.sort(key=lambda r: (list(VARIANTS).index(r["variant"]), r["steps"]))
    result = {"benchmark": "distill_sweep_toy", "num_prompts": args.num, "seed": args.seed,
              "machine": platform.processor() or platform.machine(), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    def ci(d):
        return f"{d['estimate']:.3f} [{d['low']:.3f}, {d['high']:.3f}]"

    table = ["| variant | changes | steps | prompts | caption adherence | background | kinds "
             "| edge F1 | FD | caption / base | train time |", "|---" * 11 + "|"]
    for r in rows:
        changes = ", ".join(f"{k}={v}" for k, v in r["changes"].items()) or "(shipped recipe)"
        if r["sample_guidance"] != 1.0:
            changes += f"; sampled at w={r['sample_guidance']}"
        took = f"{r['train_seconds'] / 60:.0f} min" if r.get("train_seconds") else "-"
        vs = ci(r["vs_base"]["caption_ratio"]) if "vs_base" in r else "-"
        table.append(f"| {r['variant']} | {changes} | {r['steps']} | {r.get('num_prompts', '-')} "
                     f"| {ci(r['caption_all'])} | {r['caption_background']['estimate']:.3f} | "
                     f"{r['caption_kinds']['estimate']:.3f} | {ci(r['edge_f1'])} | "
                     f"{r['fd']['estimate']:.1f} | {vs} | {took} |")
    md = "\n".join(table) + "\n"
    args.out.with_suffix(".md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
