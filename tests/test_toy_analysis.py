"""The model-free analysis of generated shapes images: caption matching, edge F1, the feature
net and the Frechet distance."""

import dataclasses

import equinox as eqx
import numpy as np
import pytest

from codi_eqx.toy import _analysis as analysis
from codi_eqx.toy import shapes


@pytest.fixture(scope="module")
def rendered():
    drawn = shapes.scenes(0, 300, "any")
    return drawn, [shapes.render(s) for s in drawn]


def _noisy(image, rng, sigma=8.0):
    return np.clip(image + rng.normal(0.0, sigma, image.shape), 0, 255).astype(np.uint8)


def test_analysis_reads_generator_images(rendered):
    drawn, pairs = rendered
    rng = np.random.default_rng(0)
    clean = [analysis.caption_match(image, s.caption) for s, (image, _) in zip(drawn, pairs)]
    noisy = [analysis.caption_match(_noisy(image, rng), s.caption)
             for s, (image, _) in zip(drawn, pairs)]
    assert np.mean(clean) >= 0.99
    assert np.mean(noisy) >= 0.99
    a = analysis.analyse_image(pairs[0][0])
    assert a.background == drawn[0].background
    assert sorted(a.shapes) == sorted((s.colour, s.kind) for s in drawn[0].shapes)


def test_random_noise_does_not_match(rendered):
    drawn, _ = rendered
    rng = np.random.default_rng(1)
    matches = [analysis.caption_match(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8),
                                      s.caption) for s in drawn[:100]]
    assert np.mean(matches) <= 0.05


def test_wrong_background_or_kind_fails():
    drawn = shapes.scenes(2, 20, "any")
    for scene in drawn:
        image, _ = shapes.render(scene)
        used = {scene.background} | {s.colour for s in scene.shapes}
        other = next(c for c in shapes.COLOURS if c not in used)
        recoloured = image.copy()
        recoloured[np.all(image == shapes.COLOURS[scene.background], axis=-1)] = \
            shapes.COLOURS[other]
        parts = analysis.caption_match_parts(recoloured, scene.caption)
        assert not parts["background"] and not parts["all"]
        assert parts["colours"] and parts["kinds"] and parts["count"]
        assert analysis.caption_match(recoloured,
                                      dataclasses.replace(scene, background=other).caption)

        first = scene.shapes[0]
        kind = next(k for k in shapes.SHAPES if k != first.kind)
        swapped = dataclasses.replace(
            scene, shapes=(dataclasses.replace(first, kind=kind),) + scene.shapes[1:])
        image, _ = shapes.render(swapped)
        parts = analysis.caption_match_parts(image, scene.caption)
        assert not parts["kinds"] and not parts["all"]
        assert parts["background"] and parts["colours"] and parts["count"]
        assert analysis.caption_match(image, swapped.caption)


def test_count_must_match():
    scene = next(s for s in shapes.scenes(3, 50, "any") if len(s.shapes) == 2)
    image, _ = shapes.render(scene)
    single = dataclasses.replace(scene, shapes=scene.shapes[:1])
    parts = analysis.caption_match_parts(image, single.caption)
    assert not parts["count"] and not parts["all"]


def test_edge_f1(rendered):
    _, pairs = rendered
    own = [analysis.edge_f1(edges, image) for image, edges in pairs[:60]]
    assert min(own) >= 0.95
    rng = np.random.default_rng(2)
    assert min(analysis.edge_f1(edges, _noisy(image, rng)) for image, edges in pairs[:30]) >= 0.9
    other = [analysis.edge_f1(pairs[i + 1][1], pairs[i][0]) for i in range(60)]
    assert np.mean(other) < 0.3 and np.median(other) < 0.5
    flat = np.full((64, 64, 3), shapes.COLOURS["blue"], np.uint8)
    assert analysis.edge_f1(pairs[0][1], flat) == 0.0
    # a (64, 64) boolean condition works the same
    assert analysis.edge_f1(pairs[0][1][..., 0] > 0, pairs[0][0]) == own[0]
    # no condition edge: 1 for an image without edges, 0 for one with
    empty = np.zeros((64, 64), bool)
    assert analysis.edge_f1(empty, flat) == 1.0
    assert analysis.edge_f1(empty, pairs[0][0]) == 0.0


def test_image_border_is_no_edge():
    image = np.full((64, 64, 3), shapes.COLOURS["white"], np.uint8)
    image[:, 40:] = shapes.COLOURS["red"]  # a region touching three sides of the image
    edges = analysis.image_edges(image)
    assert edges[:, 40].all() and edges.sum() == 64
    condition = np.zeros((64, 64), bool)
    condition[:, 40] = True
    assert analysis.edge_f1(condition, image) == 1.0


def test_frechet_distance():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 8))
    b = rng.normal(size=(500, 8))
    assert analysis.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    d_ab, d_ba = analysis.frechet_distance(a, b), analysis.frechet_distance(b, a)
    assert d_ab == pytest.approx(d_ba, rel=1e-6, abs=1e-9)
    shifted = b + 1.0
    assert analysis.frechet_distance(a, shifted) > d_ab + 5.0
    # N(0, I) against N(mu, I): about |mu|^2
    assert analysis.frechet_distance(a, shifted) == pytest.approx(8.0 + d_ab, rel=0.1)
    # N(0, I) against N(0, 4 I): tr(I + 4 I - 2 * 2 I) = D
    assert analysis.frechet_distance(a, 2.0 * b) == pytest.approx(8.0, rel=0.2)
    with pytest.raises(ValueError):
        analysis.frechet_distance(a, b[:, :4])


@pytest.mark.slow
def test_feature_net_trains_saves_and_loads(tmp_path):
    seen = []
    net = analysis.train_feature_net(seed=0, steps=3, batch_size=8,
                                     progress=lambda n, info: seen.append(info["step"]))
    assert seen == [1, 2, 3]
    images = np.stack([shapes.render(s)[0] for s in shapes.scenes(1, 5, "any")])
    feats = analysis.features(net, images, chunk=4)
    assert feats.shape == (5, analysis.FEATURE_DIM) and feats.dtype == np.float32
    assert np.all(np.isfinite(feats))
    path = analysis.save_feature_net(net, tmp_path / "features.eqx")
    loaded = analysis.load_feature_net(path)
    assert eqx.tree_equal(net, loaded)
    np.testing.assert_array_equal(analysis.features(loaded, images, chunk=4), feats)
    assert analysis.features(net, images[:0]).shape == (0, analysis.FEATURE_DIM)
