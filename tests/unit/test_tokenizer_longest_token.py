"""The longest token's characters, which bound how much of a prompt the causal-lm runtime tokenizes
(`prompt_chars`): the scan that decodes only the longest vocabulary entries of a byte-level BPE gives what
decoding every id one by one gives, on real `tokenizers` tokenizers."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from tandem.workloads.models.tokenizer import HFTokenizer, train_bpe
from tandem.workloads.serve.runtimes.causal_lm import _prompt_chars

#: English, accented Latin, CJK and emoji: multi-byte characters make long byte-level entries that decode
#: to few characters (an entry of 3 CJK characters has 9 byte-characters), and merges that end inside a
#: character decode to U+FFFD.
CORPUS = [
    "the quick brown fox jumps over the lazy dog. " * 50,
    "internationalization and responsibilities " * 40,
    "crème brûlée à la française, déjà vu " * 40,
    "中文字符测试中文字符测试 " * 60,
    "🙂🚀🙂🚀 emoji everywhere " * 40,
]


def per_token(tok: HFTokenizer) -> int:
    """The definition: every id decoded on its own (what the runtime did before)."""
    return max(len(tok.decode([i], skip_special=False)) for i in range(tok.vocab_size))


def longest_entry(tok: HFTokenizer) -> int:
    return max(len(tok._tok.id_to_token(i) or "") for i in range(tok.vocab_size))


@pytest.mark.parametrize("specials", [(), ("<|a-special-token-longer-than-every-word|>",)])
def test_byte_level_bpe_gives_the_per_token_decodes_longest(specials: tuple[str, ...]) -> None:
    tok = train_bpe(CORPUS, vocab_size=600, special_tokens=specials)
    want = per_token(tok)
    assert tok.longest_token_chars() == want
    if specials:
        assert want == len(specials[0])  # a special token counts as written
    else:
        # The longest entry (multi-byte characters) is not the longest text: the scan had to look past it.
        assert longest_entry(tok) > want
    assert _prompt_chars(tok, 32) == 32 * want


def test_another_decoder_decodes_every_id() -> None:
    """WordPiece (BERT's): `##` continuations decode without their prefix; no byte-level bound applies."""
    raw = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.decoder = decoders.WordPiece()
    raw.train_from_iterator(
        CORPUS,
        trainers.WordPieceTrainer(vocab_size=400, special_tokens=["[UNK]", "[SEP]"], show_progress=False),
    )
    tok = HFTokenizer(raw)
    assert tok.longest_token_chars() == per_token(tok) > 1
