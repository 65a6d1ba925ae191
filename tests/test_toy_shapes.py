"""The synthetic shapes world of the built-in default: generator, captions, split, tokenizer,
`codi prepare-data --synthetic shapes`."""

import json

import numpy as np
import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from cli.prepare_data import prepare_data
from codi_eqx.toy import shapes


def test_generator_is_deterministic():
    a, b = shapes.scenes(3, 40, "any"), shapes.scenes(3, 40, "any")
    assert a == b
    assert shapes.scenes(4, 40, "any") != a
    for s, t in zip(a, b):
        ia, ea = shapes.render(s)
        ib, eb = shapes.render(t)
        assert np.array_equal(ia, ib) and np.array_equal(ea, eb)


def test_captions_parse_back_to_what_was_drawn():
    for scene in shapes.scenes(0, 200, "any"):
        background, things = shapes.parse_caption(scene.caption)
        assert background == scene.background
        assert things == tuple((s.colour, s.kind) for s in scene.shapes)
        image, _ = shapes.render(scene)
        # Every named colour that the caption names is drawn, in its exact RGB value.
        assert tuple(image[0, 0]) == shapes.COLOURS[scene.background]
        for s in scene.shapes:
            assert (image == shapes.COLOURS[s.colour]).all(-1).sum() >= 60
    assert {len(s.shapes) for s in shapes.scenes(0, 50, "any")} == {1, 2}
    assert shapes.caption(shapes.Scene("blue", (shapes.Shape("circle", "red", 30.0, 30.0, 8.0),))) \
        == "a red circle on a blue background"
    two = shapes.Scene("blue", (shapes.Shape("circle", "red", 20.0, 20.0, 8.0),
                                shapes.Shape("square", "yellow", 44.0, 44.0, 8.0)))
    assert two.caption == "a red circle and a yellow square on a blue background"


@pytest.mark.parametrize("bad", ["a red circle", "a pink circle on a blue background",
                                 "a red hexagon on a blue background", ""])
def test_parse_caption_rejects_text_outside_the_grammar(bad):
    with pytest.raises(ValueError):
        shapes.parse_caption(bad)


def test_heldout_split_is_disjoint_and_training_still_sees_every_word():
    train = shapes.scenes(0, 500, "train")
    held = shapes.scenes(0, 100, "heldout")
    assert not any(c in shapes.HELDOUT for s in train for c in s.combinations)
    assert all(any(c in shapes.HELDOUT for c in s.combinations) for s in held)
    seen_colours = {s.colour for sc in train for s in sc.shapes} | {sc.background for sc in train}
    assert seen_colours == set(shapes.COLOURS)
    assert {s.kind for sc in train for s in sc.shapes} == set(shapes.SHAPES)
    assert len(shapes.COLOURS) >= 8 and {"red", "green", "blue", "yellow", "orange", "purple",
                                         "white", "black"} <= set(shapes.COLOURS)


def test_colours_are_far_apart_and_shapes_do_not_touch():
    rgb = np.array(list(shapes.COLOURS.values()), float)
    d = np.linalg.norm(rgb[:, None] - rgb[None], axis=-1)
    assert d[~np.eye(len(rgb), dtype=bool)].min() > 100
    for scene in shapes.scenes(1, 100, "any"):
        masks = [shapes.shape_mask(s) for s in scene.shapes]
        assert all(m.sum() > 50 for m in masks)
        if len(masks) == 2:
            grown = np.zeros_like(masks[0])
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    grown |= np.roll(masks[0], (dy, dx), (0, 1))
            assert not (grown & masks[1]).any()


def test_edge_map_is_the_outline_of_the_shapes():
    scene = shapes.scenes(2, 1, "any", two_shapes=True)[0]
    image, edges = shapes.render(scene)
    assert edges.shape == (64, 64, 3) and edges.dtype == np.uint8
    assert set(np.unique(edges)) == {0, 255}
    union = np.zeros((64, 64), bool)
    for s in scene.shapes:
        union |= shapes.outline(shapes.shape_mask(s))
    assert np.array_equal(edges[..., 0] == 255, union)
    # Outline pixels are inside the shapes, and no background pixel is an edge.
    bg = (image == shapes.COLOURS[scene.background]).all(-1)
    assert not (bg & union).any()


def test_scene_for_caption_draws_what_the_caption_says():
    rng = np.random.default_rng(0)
    text = "a white triangle and a black circle on a orange background"
    scene = shapes.scene_for_caption(text, rng)
    assert scene.caption == text


def test_tokenizer_has_one_token_per_word(tmp_path):
    from codi_eqx.toy._pretrain import MAX_TOKENS, teacher_tokenizer

    tok = teacher_tokenizer(tmp_path / "tokenizer")
    for word in shapes.vocabulary():
        assert len(tok.tokenize(word)) == 1, word
    longest = "a yellow triangle and a purple square on a orange background"
    ids = tok(longest).input_ids
    assert len(ids) == 13 <= MAX_TOKENS
    assert tok.decode(ids, skip_special_tokens=True) == longest


def test_prepare_data_synthetic_writes_the_seed_layout(tmp_path):
    app = typer.Typer()
    app.command("prepare-data")(prepare_data)
    app.command("other")(lambda: None)
    out = tmp_path / "shapes"
    r = CliRunner().invoke(app, ["prepare-data", "--synthetic", "shapes", "--num_images", "12",
                                 str(out)])
    assert r.exit_code == 0, r.output
    rows = [json.loads(x) for x in (out / "meta.jsonl").read_text().splitlines()]
    truth = [json.loads(x) for x in (out / "scenes.jsonl").read_text().splitlines()]
    assert len(rows) == 12 == len(truth)
    for row, t in zip(rows, truth):
        scene = shapes.scene_from_dict(t)
        assert row["caption"] == scene.caption and not t["heldout"]
        with Image.open(out / row["image"]) as im:
            assert np.array_equal(np.asarray(im), shapes.render(scene)[0])
        with Image.open(out / row["conditioning_image"]) as im:
            assert np.array_equal(np.asarray(im), shapes.render(scene)[1])
    again = CliRunner().invoke(app, ["prepare-data", "--synthetic", "shapes", str(out)])
    assert again.exit_code == 2 and "already" in again.output
    bad = CliRunner().invoke(app, ["prepare-data", "--synthetic", "stars", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "shapes" in bad.output
    held = CliRunner().invoke(app, ["prepare-data", "--synthetic", "shapes", "--num_images", "3",
                                    "--split", "heldout", str(tmp_path / "held")])
    assert held.exit_code == 0, held.output
    assert all(json.loads(x)["heldout"]
               for x in (tmp_path / "held" / "scenes.jsonl").read_text().splitlines())
