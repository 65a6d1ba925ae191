"""The tiny offline CLIP tokenizer (it lives in the package for `codi demo`)."""

from codi_eqx._tiny_tokenizer import BOS as BOS  # noqa: F401
from codi_eqx._tiny_tokenizer import EOS as EOS  # noqa: F401
from codi_eqx._tiny_tokenizer import tiny_clip_vocab as tiny_clip_vocab  # noqa: F401
from codi_eqx._tiny_tokenizer import write_tiny_clip_tokenizer as write_tiny_clip_tokenizer  # noqa: F401
