"""The CLIP text encoder of Stable Diffusion (SD 1.x: OpenAI CLIP, `quick_gelu`; SD 2.x:
OpenCLIP, `gelu`), as an Equinox module.

A pre-norm transformer with causal self-attention: token plus learned position embeddings,
`num_hidden_layers` blocks of `x + attn(ln1(x))`, `x + mlp(ln2(x))`, and a final layer norm.
The model returns the final hidden state of every token (what the UNet cross-attends to).

Field names equal the checkpoint's attribute names, so the parameter at
`text_model.encoder.layers[0].self_attn.q_proj.weight` is the tensor
`text_model.encoder.layers.0.self_attn.q_proj.weight`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Optional

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray

from ..nn import Embedding, LayerNorm, Linear
from ..nn._attention import attention_implementation


def quick_gelu(x: Float[Array, "*shape"]) -> Float[Array, "*shape"]:
    """`x * sigmoid(1.702 x)`, the sigmoid approximation of GELU used by OpenAI's CLIP."""
    return x * jax.nn.sigmoid(1.702 * x)


def _gelu_exact(x: Float[Array, "*shape"]) -> Float[Array, "*shape"]:
    return jax.nn.gelu(x, approximate=False)


def _gelu_tanh(x: Float[Array, "*shape"]) -> Float[Array, "*shape"]:
    return jax.nn.gelu(x, approximate=True)


# The activations a text encoder config may name (`hidden_act`).
ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "quick_gelu": quick_gelu,
    "gelu": _gelu_exact,
    "gelu_new": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
}


@dataclass(frozen=True)
class CLIPTextConfig:
    """The hyperparameters of a CLIP text encoder, as in its `config.json`.

    The defaults are those of the config format (OpenAI's ViT-B/32 text tower); Stable
    Diffusion's files always state the sizes.
    """

    vocab_size: int = 49408
    """Number of token ids (49408 for CLIP's BPE vocabulary)."""
    hidden_size: int = 512
    """Width of the token embeddings and of every block (768 in SD 1.x, 1024 in SD 2.x)."""
    intermediate_size: int = 2048
    """Hidden width of each block's MLP."""
    num_hidden_layers: int = 12
    """Number of transformer blocks (SD 2.x's files state 23: OpenCLIP's penultimate layer)."""
    num_attention_heads: int = 8
    """Attention heads per block; must divide `hidden_size`."""
    max_position_embeddings: int = 77
    """Length of the learned position table: the longest token sequence the model accepts."""
    hidden_act: str = "quick_gelu"
    """MLP activation: `quick_gelu` (SD 1.x), `gelu` (exact, SD 2.x), `gelu_new` or
    `gelu_pytorch_tanh` (tanh approximation)."""
    layer_norm_eps: float = 1e-5
    """Epsilon of every layer norm."""
    pad_token_id: Optional[int] = 1
    """Id of the padding token (recorded for the tokenizer's sake; not used by the model)."""
    bos_token_id: Optional[int] = 49406
    """Id of `<|startoftext|>` (recorded, not used by the model)."""
    eos_token_id: Optional[int] = 49407
    """Id of `<|endoftext|>`: the pooled output is the state at its first occurrence; where
    it is 2 (older configs), at the largest token id, as transformers reads them."""
    projection_dim: int = 512
    """Width of the text projection of `CLIPTextModelWithProjection` (SDXL's second text
    encoder: 1280); recorded only for `CLIPTextModel`, which has none."""

    def __post_init__(self):
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(
                f"CLIPTextConfig: hidden_act {self.hidden_act!r} is not supported "
                f"(expected one of {', '.join(ACTIVATIONS)})"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"CLIPTextConfig: hidden_size {self.hidden_size} does not split into "
                f"{self.num_attention_heads} attention heads"
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "max_position_embeddings"):
            if getattr(self, name) < 1:
                raise ValueError(
                    f"CLIPTextConfig: {name} must be positive, got {getattr(self, name)}"
                )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CLIPTextConfig":
        """The config of a text encoder's `config.json` (unknown keys are ignored).

        A full CLIP config (text and vision towers) is accepted too: its `text_config` is used.
        """
        if isinstance(d.get("text_config"), Mapping):
            d = d["text_config"]
        elif isinstance(d.get("text_config_dict"), Mapping):
            d = d["text_config_dict"]
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict (the keys of a transformers text encoder config)."""
        return dataclasses.asdict(self)


class CLIPTextEmbeddings(eqx.Module):
    """Token embedding plus learned absolute position embedding."""

    token_embedding: Embedding
    position_embedding: Embedding

    def __init__(self, config: CLIPTextConfig, *, dtype=jnp.float32, key: PRNGKeyArray):
        tkey, pkey = jax.random.split(key)
        d = config.hidden_size
        self.token_embedding = Embedding(config.vocab_size, d, dtype=dtype, key=tkey)
        self.position_embedding = Embedding(
            config.max_position_embeddings, d, dtype=dtype, key=pkey
        )

    def __call__(self, input_ids: Int[Array, " seq"]) -> Float[Array, "seq d"]:
        seq = input_ids.shape[0]
        limit = self.position_embedding.weight.shape[0]
        if seq > limit:
            raise ValueError(
                f"CLIPTextModel: {seq} tokens, but the model has {limit} positions "
                f"(tokenise with max_length={limit} and truncation)"
            )
        positions = jnp.arange(seq, dtype=jnp.int32)
        return self.token_embedding(input_ids) + self.position_embedding(positions)


class CLIPAttention(eqx.Module):
    """Multi-head self-attention with biased `q_proj`, `k_proj`, `v_proj`, `out_proj`."""

    q_proj: Linear
    k_proj: Linear
    v_proj: Linear
    out_proj: Linear
    num_heads: int = eqx.field(static=True)
    causal: bool = eqx.field(static=True)

    def __init__(
        self, dim: int, num_heads: int, *, causal: bool = True, dtype=jnp.float32,
        key: PRNGKeyArray,
    ):
        kq, kk, kv, ko = jax.random.split(key, 4)
        self.q_proj = Linear(dim, dim, dtype=dtype, key=kq)
        self.k_proj = Linear(dim, dim, dtype=dtype, key=kk)
        self.v_proj = Linear(dim, dim, dtype=dtype, key=kv)
        self.out_proj = Linear(dim, dim, dtype=dtype, key=ko)
        self.num_heads = num_heads
        self.causal = causal

    def __call__(self, x: Float[Array, "seq d"]) -> Float[Array, "seq d"]:
        seq = x.shape[0]
        q, k, v = (
            proj(x).reshape(seq, self.num_heads, -1)
            for proj in (self.q_proj, self.k_proj, self.v_proj)
        )
        # q, k, v share one dtype; JAX's attention promotes internally to float32 logits,
        # which strict dtype promotion would refuse for bfloat16 / float16 inputs.
        with jax.numpy_dtype_promotion("standard"):
            out = jax.nn.dot_product_attention(
                q, k, v, is_causal=self.causal, implementation=attention_implementation(q, k)
            )
        return self.out_proj(out.reshape(seq, -1))


class CLIPMLP(eqx.Module):
    """`fc2(act(fc1(x)))`."""

    fc1: Linear
    fc2: Linear
    hidden_act: str = eqx.field(static=True)

    def __init__(
        self, dim: int, hidden: int, hidden_act: str, *, dtype=jnp.float32, key: PRNGKeyArray
    ):
        k1, k2 = jax.random.split(key)
        self.fc1 = Linear(dim, hidden, dtype=dtype, key=k1)
        self.fc2 = Linear(hidden, dim, dtype=dtype, key=k2)
        self.hidden_act = hidden_act

    def __call__(self, x: Float[Array, "seq d"]) -> Float[Array, "seq d"]:
        return self.fc2(ACTIVATIONS[self.hidden_act](self.fc1(x)))


class CLIPEncoderLayer(eqx.Module):
    """A pre-norm transformer block: `x + attn(ln1(x))`, then `x + mlp(ln2(x))`."""

    self_attn: CLIPAttention
    layer_norm1: LayerNorm
    mlp: CLIPMLP
    layer_norm2: LayerNorm

    def __init__(self, config: CLIPTextConfig, *, dtype=jnp.float32, key: PRNGKeyArray):
        akey, mkey = jax.random.split(key)
        d = config.hidden_size
        self.self_attn = CLIPAttention(d, config.num_attention_heads, dtype=dtype, key=akey)
        self.layer_norm1 = LayerNorm(d, eps=config.layer_norm_eps, dtype=dtype)
        self.mlp = CLIPMLP(
            d, config.intermediate_size, config.hidden_act, dtype=dtype, key=mkey
        )
        self.layer_norm2 = LayerNorm(d, eps=config.layer_norm_eps, dtype=dtype)

    def __call__(self, x: Float[Array, "seq d"]) -> Float[Array, "seq d"]:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(eqx.Module):
    """The stack of transformer blocks."""

    layers: tuple[CLIPEncoderLayer, ...]

    def __init__(self, config: CLIPTextConfig, *, dtype=jnp.float32, key: PRNGKeyArray):
        keys = jax.random.split(key, config.num_hidden_layers)
        self.layers = tuple(CLIPEncoderLayer(config, dtype=dtype, key=k) for k in keys)


class CLIPTextTransformer(eqx.Module):
    """Embeddings, encoder and final layer norm (the checkpoint's `text_model`)."""

    embeddings: CLIPTextEmbeddings
    encoder: CLIPEncoder
    final_layer_norm: LayerNorm

    def __init__(self, config: CLIPTextConfig, *, dtype=jnp.float32, key: PRNGKeyArray):
        ekey, lkey = jax.random.split(key)
        self.embeddings = CLIPTextEmbeddings(config, dtype=dtype, key=ekey)
        self.encoder = CLIPEncoder(config, dtype=dtype, key=lkey)
        self.final_layer_norm = LayerNorm(
            config.hidden_size, eps=config.layer_norm_eps, dtype=dtype
        )


class CLIPTextModel(eqx.Module):
    """The CLIP text encoder; `model(input_ids)` is the last hidden state `(seq, hidden_size)`.

    **Arguments** (`__init__`): `config`, `dtype` of the parameters (and of the computation;
    layer norms compute their statistics in float32), `key` for the random initialisation.

    Build it empty with `eqx.filter_eval_shape` and fill it from a checkpoint with
    `codi_eqx.weights.load_text_encoder`.
    """

    text_model: CLIPTextTransformer
    config: CLIPTextConfig = eqx.field(static=True)

    def __init__(self, config: CLIPTextConfig, *, dtype=jnp.float32, key: PRNGKeyArray):
        self.text_model = CLIPTextTransformer(config, dtype=dtype, key=key)
        self.config = config

    def hidden_states(self, input_ids: Int[Array, " seq"]) -> tuple[Float[Array, "seq d"], ...]:
        """The embeddings' output then each block's output: `num_hidden_layers + 1` arrays
        `(seq, hidden_size)`, before the final layer norm.

        For "clip skip" `n`, apply `text_model.final_layer_norm` to `hidden_states(ids)[-1 - n]`.
        """
        x = self.text_model.embeddings(input_ids)
        states = [x]
        for layer in self.text_model.encoder.layers:
            x = layer(x)
            states.append(x)
        return tuple(states)

    @jax.named_scope("codi_eqx.CLIPTextModel")
    def __call__(self, input_ids: Int[Array, " seq"]) -> Float[Array, "seq d"]:
        """**Arguments:** `input_ids` `(seq,)`, `seq <= max_position_embeddings`.

        **Returns:** the last hidden state `(seq, hidden_size)`, after the final layer norm.
        """
        x = self.text_model.embeddings(input_ids)
        for layer in self.text_model.encoder.layers:
            x = layer(x)
        return self.text_model.final_layer_norm(x)


    def pooled_output(
        self, last_hidden_state: Float[Array, "seq d"], input_ids: Int[Array, " seq"]
    ) -> Float[Array, " d"]:
        """The state at the end-of-text token of `input_ids` (CLIP's pooled output)."""
        eos = self.config.eos_token_id
        if eos == 2 or eos is None:
            index = jnp.argmax(input_ids)
        else:
            index = jnp.argmax((input_ids == eos).astype(jnp.int32))
        return last_hidden_state[index]


class CLIPTextModelWithProjection(CLIPTextModel):
    """The CLIP text encoder with its text projection (SDXL's second text encoder,
    transformers' `CLIPTextModelWithProjection`): `model(ids)` is the last hidden state as for
    `CLIPTextModel`; `text_embeds(ids)` the projected pooled output."""

    text_projection: Linear

    def __init__(self, config: CLIPTextConfig, *, dtype=jnp.float32, key: PRNGKeyArray):
        tkey, pkey = jax.random.split(key)
        super().__init__(config, dtype=dtype, key=tkey)
        self.text_projection = Linear(
            config.hidden_size, config.projection_dim, use_bias=False, dtype=dtype, key=pkey)

    def text_embeds(self, input_ids: Int[Array, " seq"]) -> Float[Array, " p"]:
        """The projection of the pooled output `(projection_dim,)`."""
        return self.project(self(input_ids), input_ids)

    def project(
        self, last_hidden_state: Float[Array, "seq d"], input_ids: Int[Array, " seq"]
    ) -> Float[Array, " p"]:
        """`text_embeds` from an already computed last hidden state."""
        return self.text_projection(self.pooled_output(last_hidden_state, input_ids))
