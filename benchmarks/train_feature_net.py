"""Train the shapes classifier whose features the toy quality benchmark's Frechet distance
uses (`codi_eqx.toy.FeatureNet`), and write it next to the built-in teacher.

    python benchmarks/train_feature_net.py            # the shipped one: seed 0, 3000 steps
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    import numpy as np

    from codi_eqx.toy import features, save_feature_net, shapes, train_feature_net
    from codi_eqx.toy._analysis import scene_targets
    from codi_eqx.toy._builtin import BUILTIN_DIR

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--out", type=Path, default=BUILTIN_DIR / "feature-net.eqx")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    losses = []
    net = train_feature_net(args.seed, args.steps, progress=lambda n, d: losses.append(d["loss"]))
    seconds = time.perf_counter() - t0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_feature_net(net, args.out)
    # Accuracy of its heads on fresh held-out scenes (what the features must tell apart).
    import jax

    from codi_eqx.toy._analysis import _to_model

    held = shapes.scenes(args.seed + 99, 500, "heldout")
    images = np.stack([shapes.render(s)[0] for s in held])
    background, colours, kinds, count = (np.asarray(x) for x in jax.vmap(net)(_to_model(images)))
    targets = np.stack([scene_targets(s) for s in held])
    n = colours.shape[1]
    accuracy = {
        "background": float(np.mean(background.argmax(1) == targets[:, 0])),
        "colours": float(np.mean(((colours > 0) == (targets[:, 1:1 + n] > 0)).all(1))),
        "kinds": float(np.mean(((kinds > 0) == (targets[:, 1 + n:-1] > 0)).all(1))),
        "count": float(np.mean(count.argmax(1) == targets[:, -1])),
    }
    print(f"trained {args.steps} steps in {seconds:.0f} s, final loss "
          f"{np.mean(losses[-50:]):.4f}; wrote {args.out}")
    print("accuracy on 500 held-out scenes:", accuracy,
          "feature shape", features(net, images[:4]).shape)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
