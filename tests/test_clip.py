"""The CLIP text encoder against transformers' `CLIPTextModel`, and its weight conversion."""

from __future__ import annotations

import dataclasses
import json
import re

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from codi_eqx._tiny_tokenizer import write_tiny_clip_tokenizer
from codi_eqx.models import CLIPTextConfig, CLIPTextModel
from weights_conversion import WeightsError, module_keys, read_tensors, save_file
from weights_conversion.clip import CLIP_NAME_MAP, load_text_encoder, save_text_encoder

PROMPTS = ["a photo of a cat", "A red dog, on the grass!"]
MAX_LENGTH = 16


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    folder = write_tiny_clip_tokenizer(tmp_path_factory.mktemp("tokenizer"), MAX_LENGTH)
    return transformers.CLIPTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def input_ids(tokenizer) -> np.ndarray:
    ids = tokenizer(
        PROMPTS, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="np"
    ).input_ids
    assert ids.shape == (2, MAX_LENGTH) and ids.max() < len(tokenizer)
    assert not np.array_equal(ids[0], ids[1])
    return ids


def _randomise(model: torch.nn.Module, seed: int) -> None:
    """Every parameter random (layer norms included), at scales that keep activations O(1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "layer_norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.3 * noise)
            elif name.endswith("bias") or "layer_norm" in name:
                p.copy_(0.3 * noise)
            elif "embedding" in name:
                p.copy_(noise)
            else:
                p.copy_(noise / np.sqrt(p.shape[1]))


def _reference(tokenizer, hidden_act: str, seed: int) -> transformers.CLIPTextModel:
    config = transformers.CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=3,
        num_attention_heads=4, max_position_embeddings=MAX_LENGTH, hidden_act=hidden_act,
        layer_norm_eps=1e-5, projection_dim=24, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    model = transformers.CLIPTextModel(config).eval()
    _randomise(model, seed)
    return model


@pytest.fixture(scope="module", params=["quick_gelu", "gelu"])
def reference(request, tokenizer, tmp_path_factory):
    """(transformers model, the folder it saved itself to)."""
    model = _reference(tokenizer, request.param, seed=len(request.param))
    folder = tmp_path_factory.mktemp(f"clip_{request.param}")
    model.save_pretrained(folder)
    return model, folder


def _theirs(model: transformers.CLIPTextModel, ids: np.ndarray, **kw):
    with torch.no_grad():
        return model(torch.from_numpy(ids.astype(np.int64)), **kw)


@eqx.filter_jit
def _batched(model: CLIPTextModel, ids: jax.Array) -> jax.Array:
    return jax.vmap(model)(ids)


def _ours(model: CLIPTextModel, ids: np.ndarray) -> np.ndarray:
    return np.asarray(_batched(model, jnp.asarray(ids, dtype=jnp.int32)))


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| / max |b|."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def test_parity_with_transformers(reference, input_ids):
    torch_model, folder = reference
    assert not any(k.startswith("text_model.") for k in read_tensors(folder))  # transformers 5
    model = load_text_encoder(folder)
    theirs = _theirs(torch_model, input_ids).last_hidden_state.numpy()
    ours = _ours(model, input_ids)
    assert ours.shape == theirs.shape == (2, MAX_LENGTH, 32)
    err = _rel(ours, theirs)
    act = torch_model.config.hidden_act
    print(f"\nCLIP {act} fp32: max|ours - theirs| / max|theirs| = {err:.2e}")
    assert err <= 1e-4


def test_hidden_states_parity(reference, input_ids):
    torch_model, folder = reference
    model = load_text_encoder(folder)
    theirs = _theirs(torch_model, input_ids, output_hidden_states=True).hidden_states
    ids = jnp.asarray(input_ids[0], dtype=jnp.int32)
    ours = eqx.filter_jit(CLIPTextModel.hidden_states)(model, ids)
    assert len(ours) == len(theirs) == model.config.num_hidden_layers + 1
    for o, t in zip(ours, theirs):
        assert _rel(o, t[0].numpy()) <= 1e-4
    last = eqx.filter_jit(model.text_model.final_layer_norm)(ours[-1])
    np.testing.assert_allclose(np.asarray(last), _ours(model, input_ids)[0], rtol=0, atol=1e-6)


def test_bf16(reference, input_ids):
    torch_model, folder = reference
    fp32 = _ours(load_text_encoder(folder), input_ids)
    model = load_text_encoder(folder, dtype=jnp.bfloat16)
    assert all(a.dtype == jnp.bfloat16 for a in module_keys(model).values())
    out = _batched(model, jnp.asarray(input_ids, dtype=jnp.int32))
    assert out.dtype == jnp.bfloat16
    out = np.asarray(out.astype(jnp.float32))
    err = _rel(out, fp32)
    print(f"\nCLIP {torch_model.config.hidden_act} bf16 vs fp32: {err:.2e}")
    assert np.all(np.isfinite(out)) and err <= 3e-2


def _legacy_tensors(folder) -> dict[str, np.ndarray]:
    """The tensors as Stable Diffusion's checkpoints spell them: `text_model.` prefix, the
    `position_ids` buffer, and (as in a text encoder with projection) `text_projection`."""
    tensors = {f"text_model.{k}": np.asarray(v) for k, v in read_tensors(folder).items()}
    n = tensors["text_model.embeddings.position_embedding.weight"].shape[0]
    tensors["text_model.embeddings.position_ids"] = np.arange(n, dtype=np.int64)[None]
    tensors["text_projection.weight"] = np.zeros((24, 32), np.float32)
    return tensors


def test_legacy_spelling(reference, input_ids, tmp_path):
    torch_model, folder = reference
    save_file(_legacy_tensors(folder), tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    ours = _ours(load_text_encoder(tmp_path), input_ids)
    assert _rel(ours, _theirs(torch_model, input_ids).last_hidden_state.numpy()) <= 1e-4


@pytest.mark.parametrize("problem", ["missing", "unexpected", "misshapen"])
def test_loading_errors_name_the_tensor(reference, tmp_path, problem):
    _, folder = reference
    tensors = _legacy_tensors(folder)
    name = "text_model.encoder.layers.1.mlp.fc1.weight"
    if problem == "missing":
        del tensors[name]
    elif problem == "unexpected":
        name = "text_model.encoder.layers.3.mlp.fc1.weight"
        tensors[name] = np.zeros((48, 32), np.float32)
    else:
        tensors[name] = np.zeros((48, 31), np.float32)
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    words = {
        "missing": "missing tensor", "unexpected": "unexpected tensor", "misshapen": "wrong shape"
    }
    with pytest.raises(WeightsError, match=f"{words[problem]}.*{re.escape(name)}"):
        load_text_encoder(tmp_path)


def test_save_round_trip(reference, input_ids, tmp_path):
    torch_model, folder = reference
    model = load_text_encoder(folder)
    save_text_encoder(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["CLIPTextModel"]
    assert config["model_type"] == "clip_text_model"
    assert set(read_tensors(tmp_path)) == {
        CLIP_NAME_MAP.checkpoint_key(k) for k in module_keys(model)
    }
    again = load_text_encoder(tmp_path)
    assert again.config == model.config
    for (k, a), (k2, b) in zip(module_keys(model).items(), module_keys(again).items()):
        assert k == k2 and a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b)), k
    # transformers reads what we wrote and computes exactly what the original computed.
    reloaded = transformers.CLIPTextModel.from_pretrained(tmp_path).eval()
    assert reloaded.config.hidden_act == torch_model.config.hidden_act
    expected = _theirs(torch_model, input_ids).last_hidden_state
    assert torch.equal(_theirs(reloaded, input_ids).last_hidden_state, expected)


def test_config_from_dict():
    text = {
        "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2,
        "num_attention_heads": 4, "max_position_embeddings": 77, "hidden_act": "gelu",
        "layer_norm_eps": 1e-5, "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2,
        "projection_dim": 512, "model_type": "clip_text_model", "torch_dtype": "float16",
        "architectures": ["CLIPTextModel"], "attention_dropout": 0.0,
    }
    config = CLIPTextConfig.from_dict(text)
    assert config.hidden_act == "gelu" and config.hidden_size == 64 and config.eos_token_id == 2
    assert CLIPTextConfig.from_dict({"text_config": text, "vision_config": {}}) == config
    assert CLIPTextConfig.from_dict(config.to_dict()) == config
    assert transformers.CLIPTextConfig(**config.to_dict()).hidden_size == 64
    with pytest.raises(ValueError, match="hidden_act"):
        dataclasses.replace(config, hidden_act="relu")
    with pytest.raises(ValueError, match="heads"):
        dataclasses.replace(config, num_attention_heads=5)


def test_too_many_tokens():
    config = CLIPTextConfig(
        vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=8,
    )
    model = eqx.filter_eval_shape(CLIPTextModel, config, key=jax.random.key(0))
    shape = eqx.filter_eval_shape(model, jnp.zeros((8,), jnp.int32)).shape
    assert shape == (8, 16)
    with pytest.raises(ValueError, match="positions"):
        eqx.filter_eval_shape(model, jnp.zeros((9,), jnp.int32))


@pytest.fixture(scope="module", params=["eos", "legacy-eos-2"])
def projected(request, tokenizer, tmp_path_factory):
    """transformers' `CLIPTextModelWithProjection` (SDXL's second text encoder, OpenCLIP
    bigG's gelu), saved; with the tokenizer's end-of-text id, and with the older configs'
    `eos_token_id = 2` (pooled at the largest token id)."""
    eos = tokenizer.eos_token_id if request.param == "eos" else 2
    config = transformers.CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=3,
        num_attention_heads=4, max_position_embeddings=MAX_LENGTH, hidden_act="gelu",
        layer_norm_eps=1e-5, projection_dim=24, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos, pad_token_id=tokenizer.pad_token_id,
    )
    model = transformers.CLIPTextModelWithProjection(config).eval()
    _randomise(model, seed=11)
    folder = tmp_path_factory.mktemp(f"clip_projected_{request.param}")
    model.save_pretrained(folder)
    return model, folder


def test_with_projection_parity(projected, input_ids):
    """Last and penultimate hidden states and the projected pooled output (what SDXL's
    pipeline takes from its second encoder) against transformers, fp32 and bf16."""
    from codi_eqx.models import CLIPTextModelWithProjection

    torch_model, folder = projected
    model = load_text_encoder(folder)
    assert isinstance(model, CLIPTextModelWithProjection)
    theirs = _theirs(torch_model, input_ids, output_hidden_states=True)
    ids = jnp.asarray(input_ids, jnp.int32)

    @eqx.filter_jit
    def run(m, ids):
        def one(i):
            states = m.hidden_states(i)
            last = m.text_model.final_layer_norm(states[-1])
            return last, states[-2], m.project(last, i), m.text_embeds(i)
        return jax.vmap(one)(ids)

    last, penultimate, embeds, embeds_direct = run(model, ids)
    errs = {
        "last": _rel(last, theirs.last_hidden_state.numpy()),
        "penultimate": _rel(penultimate, theirs.hidden_states[-2].numpy()),
        "text_embeds": _rel(embeds, theirs.text_embeds.numpy()),
    }
    print(f"\nCLIP with projection fp32 (eos {torch_model.config.eos_token_id}): {errs}")
    assert max(errs.values()) <= 1e-4
    np.testing.assert_array_equal(np.asarray(embeds), np.asarray(embeds_direct))
    model16 = load_text_encoder(folder, dtype=jnp.bfloat16)
    _, _, embeds16, _ = run(model16, ids)
    assert _rel(np.asarray(embeds16, np.float32), theirs.text_embeds.numpy()) <= 3e-2


def test_with_projection_save_round_trip(projected, input_ids, tmp_path):
    """Saved by this project: transformers reads the same class and the same outputs."""
    torch_model, folder = projected
    model = load_text_encoder(folder)
    save_text_encoder(model, tmp_path / "enc")
    config = json.loads((tmp_path / "enc" / "config.json").read_text())
    assert config["architectures"] == ["CLIPTextModelWithProjection"]
    assert eqx.tree_equal(load_text_encoder(tmp_path / "enc"), model)
    back = transformers.CLIPTextModelWithProjection.from_pretrained(tmp_path / "enc").eval()
    ref = _theirs(torch_model, input_ids).text_embeds.numpy()
    np.testing.assert_allclose(_theirs(back, input_ids).text_embeds.numpy(), ref, atol=1e-6)


def test_plain_encoder_ignores_a_projection(projected, input_ids, tmp_path):
    """The same weights under a plain `CLIPTextModel` config load without the projection
    (its tensor consumed), with the same hidden states."""
    import shutil

    _, folder = projected
    shutil.copytree(folder, tmp_path / "plain")
    config = json.loads((folder / "config.json").read_text())
    assert "text_projection.weight" in read_tensors(folder)
    (tmp_path / "plain" / "config.json").write_text(
        json.dumps({**config, "architectures": ["CLIPTextModel"]}))
    plain = load_text_encoder(tmp_path / "plain")
    assert type(plain) is CLIPTextModel
    np.testing.assert_array_equal(_ours(plain, input_ids), _ours(load_text_encoder(folder), input_ids))
