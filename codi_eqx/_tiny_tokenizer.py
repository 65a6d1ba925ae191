"""A tiny CLIP byte-level BPE tokenizer written from scratch, for the demo and the tests (offline).

`write_tiny_clip_tokenizer(folder)` writes `vocab.json`, `merges.txt`, `tokenizer_config.json`
and `special_tokens_map.json` in the layout of Stable Diffusion's `tokenizer/` folder, so that
`transformers.CLIPTokenizer.from_pretrained(folder)` loads it without the network.

The vocabulary follows CLIP's order: the 256 byte symbols, the same 256 closing a word
(`</w>`), one token per merge, then `<|startoftext|>` and `<|endoftext|>` (the last two ids).
Every lower-case text therefore tokenises (at worst one token per byte), and a handful of
merges give whole-word tokens for the prompts the tests use.
"""

from __future__ import annotations

import json
from pathlib import Path
from collections.abc import Sequence

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"

# Pairs merged in this order; each adds the concatenation as one token.
MERGES: tuple[tuple[str, str], ...] = (
    ("h", "o"),
    ("t", "o</w>"),
    ("p", "ho"),
    ("pho", "to</w>"),
    ("o", "f</w>"),
    ("c", "a"),
    ("ca", "t</w>"),
    ("d", "o"),
    ("do", "g</w>"),
    ("r", "e"),
    ("re", "d</w>"),
)


def _byte_symbols() -> list[str]:
    """The printable stand-in for each byte 0..255 used by byte-level BPE (GPT-2's table)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


def bpe(word: str, merges: Sequence[tuple[str, str]]) -> list[str]:
    """The tokens of one lower-case ASCII word under byte-level BPE with `merges` (in rank
    order), the closing symbol carrying `</w>`, as CLIP's tokenizer splits it."""
    rank: dict[tuple[str, str], int] = {}
    for i, m in enumerate(merges):
        rank.setdefault(m, i)
    never = len(merges)
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    while len(parts) > 1:
        pairs = [(rank.get((a, b), never), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
        best, i = min(pairs)
        if best == never:
            break
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts


def word_merges(words: Sequence[str], base: Sequence[tuple[str, str]] = MERGES
                ) -> tuple[tuple[str, str], ...]:
    """`base` followed by the merges that make each of `words` (lower-case ASCII) one token."""
    merges = list(base)
    for _ in range(64):
        split = [(w, bpe(w, merges)) for w in words]
        todo = [(w, parts) for w, parts in split if len(parts) > 1]
        if not todo:
            return tuple(merges)
        for _, parts in todo:
            if (parts[0], parts[1]) not in merges:
                merges.append((parts[0], parts[1]))
    raise RuntimeError("word_merges did not converge")  # pragma: no cover


def tiny_clip_vocab(merges: Sequence[tuple[str, str]] = MERGES) -> dict[str, int]:
    """The token -> id table: 512 byte symbols, one token per merge, 2 specials (525 tokens
    with the default merges)."""
    symbols = _byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + [a + b for a, b in merges] + [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}


def write_tiny_clip_tokenizer(folder: str | Path, model_max_length: int = 16,
                              words: Sequence[str] = ()) -> Path:
    """Write the tiny tokenizer to `folder` (created if needed) and return the folder.

    Each of `words` becomes a single token. Prompts are padded with `<|endoftext|>` (Stable
    Diffusion 1.x's choice) to `model_max_length` under `padding="max_length"`.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    merge_list = word_merges(words) if words else MERGES
    vocab = tiny_clip_vocab(merge_list)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merge_list)
    (folder / "merges.txt").write_text(merges, encoding="utf-8")
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    config = {
        **special,
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": model_max_length,
        "do_lower_case": True,
        "errors": "replace",
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")
    return folder
