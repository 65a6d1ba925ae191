"""Quality against training steps on the built-in shapes world: a recipe trained in segments,
each segment's adapter scored on held-out prompts, until edge F1 stops rising.

Each recipe is the built-in default (`codi_eqx.toy.TOY_TRAIN_DEFAULTS`) with the changes in
`RECIPES`, trained into benchmarks/.cache/curve/NAME-seedS in segments of `--every` steps
(each segment resumes the previous one's checkpoint exactly). After each segment the final
adapter (EMA) is copied to `step-K/` and scored with the recipe's sampler on `--num` held-out
prompts (`codi_eqx.toy._quality`). Training stops at `--max_steps`, or with `--plateau`
once edge F1 gained less than 0.01 over the last three evaluations.

    python benchmarks/quality_curve_toy.py controlnet --every 500 --max_steps 6000 --plateau
    python benchmarks/quality_curve_toy.py codi-edges --every 250 --max_steps 1500 --seed 1
    python benchmarks/quality_curve_toy.py plot    # results/quality_curve_toy.png (matplotlib)

Writes benchmarks/results/quality_curve_toy.json (one curve per recipe and seed, merged with
earlier ones). An interrupted run continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RESULTS = Path(__file__).resolve().parent / "results"
CACHE = Path(__file__).resolve().parent / ".cache" / "curve"

_CODI_ONLY = ("onestepode_cfg", "distill_guidance_min", "distill_guidance_max")

RECIPES: dict[str, dict] = {
    "controlnet": {"objective": "controlnet", "proportion_empty_prompts": 0.5},
    "codi-edges": {},
    "codi-edges-reg-snr1": {"regularizer_snr_gamma": 1.0},
    "codi-edges-guided": {"regularizer_target": "guided"},
    "codi-text": {"distill_type": "unconditional"},
}
"""Changes to the built-in default (`TrainConfig` field names). `controlnet` is the ControlNet
baseline: the same adapter trained with the plain diffusion loss, half of its captions
dropped as the ControlNet paper trains."""

SAMPLING = {
    "controlnet": dict(sampler="ddim", steps=50, guidance_scale=3.0),
}
"""How each recipe's adapter is scored along the curve (default: 4 CoDi steps, w = 1)."""


def recipe_config(name: str, seed: int) -> dict:
    from codi_eqx.toy._builtin import TOY_TRAIN_DEFAULTS

    recipe = dict(TOY_TRAIN_DEFAULTS, **RECIPES[name], seed=seed)
    if recipe.get("objective") == "controlnet":
        for key in _CODI_ONLY:
            recipe.pop(key)
    return recipe


def plot(results_file: Path, out: Path) -> None:
    """Edge F1 and whole-caption adherence against training steps, one line per curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = json.loads(results_file.read_text())["curves"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, c in sorted(curves.items()):
        steps = [p["step"] for p in c["points"]]
        s = c["sampling"]
        label = f"{name} ({s['sampler']} {s['steps']}, w={s['guidance_scale']:g})"
        axes[0].plot(steps, [p["edge_f1"] for p in c["points"]], marker="o", label=label)
        axes[1].plot(steps, [p["caption_adherence"] for p in c["points"]], marker="o",
                     label=label)
    for ax, what in zip(axes, ("edge F1", "whole-caption adherence")):
        ax.set_xlabel("training steps")
        ax.set_ylabel(what)
        ax.grid(alpha=0.3)
    n = {c["num_prompts"] for c in curves.values()}
    fig.suptitle(f"Built-in shapes world, {'/'.join(map(str, sorted(n)))} held-out prompts")
    axes[1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["plot"]:
        plot(RESULTS / "quality_curve_toy.json", RESULTS / "quality_curve_toy.png")
        return 0
    ap.add_argument("recipe", choices=list(RECIPES))
    ap.add_argument("--seed", type=int, default=0, help="training seed (data and initialisation)")
    ap.add_argument("--every", type=int, default=500, help="steps between evaluations")
    ap.add_argument("--max_steps", type=int, default=4000)
    ap.add_argument("--plateau", action="store_true",
                    help="stop once edge F1 gained < 0.01 over the last three evaluations")
    ap.add_argument("--num", type=int, default=128, help="held-out prompts per evaluation")
    ap.add_argument("--out", type=Path, default=RESULTS / "quality_curve_toy.json")
    args = ap.parse_args(argv)

    from codi_eqx import adapter_settings, load_adapter, load_pipeline
    from codi_eqx.toy import builtin_teacher, load_feature_net, prepare_builtin_run
    from codi_eqx.toy import _quality as quality
    from codi_eqx.toy._builtin import BUILTIN_DIR
    from codi_eqx.train import TrainConfig, train

    run = CACHE / f"{args.recipe}-seed{args.seed}"
    run.mkdir(parents=True, exist_ok=True)
    curve_file = run / "curve.json"
    curve = json.loads(curve_file.read_text()) if curve_file.exists() else []
    pipe = load_pipeline(builtin_teacher())
    net = load_feature_net(BUILTIN_DIR / "feature-net.eqx")
    prompts = quality.prompt_set("heldout", args.num)
    sampling = SAMPLING.get(args.recipe, dict(sampler="codi", steps=4, guidance_scale=1.0))
    uses_edges = RECIPES[args.recipe].get("distill_type", "conditional") == "conditional"
    method = quality.Method(args.recipe, "adapter", sampling["sampler"], sampling["steps"],
                            uses_edges)

    def plateaued() -> bool:
        f1 = [c["edge_f1"] for c in curve]
        return len(f1) >= 4 and max(f1[-3:]) - f1[-4] < 0.01

    step = curve[-1]["step"] if curve else 0
    while step < args.max_steps and not (args.plateau and plateaued()):
        step += args.every
        recipe = recipe_config(args.recipe, args.seed)
        recipe.update(max_train_steps=step, checkpointing_steps=args.every,
                      validation_steps=10**9, checkpoints_total_limit=2)
        recipe.update(prepare_builtin_run(run, seed=args.seed))
        if (run / "checkpoints").is_dir() and any((run / "checkpoints").iterdir()):
            recipe["resume_from_checkpoint"] = "latest"
        t0 = time.perf_counter()
        summary = train(TrainConfig(output_dir=str(run), **recipe))
        seconds = time.perf_counter() - t0
        if summary["step"] < step:  # stopped early (SIGTERM saves and returns): no point
            print(f"training stopped at step {summary['step']} before {step}; run again to "
                  "continue", flush=True)
            return 1
        snapshot = run / f"step-{step}"
        shutil.rmtree(snapshot, ignore_errors=True)
        snapshot.mkdir()
        for f in ("config.json", "diffusion_pytorch_model.safetensors"):
            shutil.copy2(run / f, snapshot / f)
        images = quality.sample(pipe, load_adapter(snapshot), adapter_settings(snapshot), method,
                                prompts, sampling["guidance_scale"])
        scores = quality.score_images(images, prompts, net)
        point = {"step": step, "train_seconds": seconds,
                 "edge_f1": float(scores.edge_f1.mean()),
                 "caption_adherence": float(scores.caption["all"].mean()),
                 "background": float(scores.caption["background"].mean())}
        curve.append(point)
        curve_file.write_text(json.dumps(curve, indent=2) + "\n")
        print(f"{args.recipe} seed {args.seed} step {step}: edge F1 {point['edge_f1']:.3f}  "
              f"caption {point['caption_adherence']:.3f}  background {point['background']:.3f}",
              flush=True)

    results = json.loads(args.out.read_text()) if args.out.exists() else {"curves": {}}
    results["curves"][f"{args.recipe}-seed{args.seed}"] = {
        "recipe": args.recipe, "seed": args.seed, "changes": RECIPES[args.recipe],
        "sampling": sampling, "num_prompts": args.num, "plateaued": plateaued(), "points": curve}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
