"""A small, deterministic, generated English-like corpus: no downloads, same bytes everywhere.

`tandem://corpus` in `spec.trainer.builtin.dataset.uri` trains on it; `tandem train corpus FILE` writes it
out. Sentences come from a fixed grammar driven by `random.Random(seed)`, so the text has structure a
tiny model learns within a few dozen steps (the loss drops quickly from ln(vocab)) yet is not trivial.
"""

from __future__ import annotations

import random
from typing import Final

_SUBJECTS = (
    "the cat",
    "a dog",
    "the old sailor",
    "my neighbour",
    "the little robot",
    "a tired farmer",
    "the queen",
    "our teacher",
    "the red fox",
    "a curious child",
    "the baker",
    "the wind",
)
_VERBS = (
    "sees",
    "finds",
    "carries",
    "follows",
    "paints",
    "remembers",
    "builds",
    "watches",
    "hears",
    "loves",
    "forgets",
    "opens",
)
_OBJECTS = (
    "the river",
    "a small boat",
    "the green door",
    "an apple",
    "the tall tower",
    "a letter",
    "the morning bell",
    "a broken clock",
    "the garden",
    "a silver key",
    "the map",
    "the moon",
)
_PLACES = (
    "in the village",
    "by the sea",
    "under the bridge",
    "at dawn",
    "after the rain",
    "near the mill",
    "on the hill",
    "before dinner",
    "in the forest",
    "at the market",
)
_CONNECT = ("and then", "but", "so", "while", "because")

CORPORA: Final = {"corpus": (20_000, 1234), "corpus-small": (2_000, 1234)}
"""Built-in corpora: name -> (sentences, seed). `corpus` is about 1 MB, `corpus-small` about 100 kB."""


def sentence(rng: random.Random) -> str:
    """One sentence of the grammar."""
    s = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}"
    if rng.random() < 0.6:
        s += f" {rng.choice(_PLACES)}"
    if rng.random() < 0.3:
        s += f", {rng.choice(_CONNECT)} {rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}"
    return s[0].upper() + s[1:] + "."


def generate(sentences: int = 20_000, seed: int = 1234) -> str:
    """The corpus text: paragraphs of 3-7 sentences separated by blank lines."""
    rng = random.Random(seed)
    out: list[str] = []
    para: list[str] = []
    target = rng.randint(3, 7)
    for _ in range(sentences):
        para.append(sentence(rng))
        if len(para) == target:
            out.append(" ".join(para))
            para, target = [], rng.randint(3, 7)
    if para:
        out.append(" ".join(para))
    return "\n\n".join(out) + "\n"


def builtin_corpus(name: str = "corpus") -> bytes:
    """The bytes of a built-in corpus (`KeyError` for an unknown name)."""
    sentences, seed = CORPORA[name]
    return generate(sentences, seed).encode("utf-8")
