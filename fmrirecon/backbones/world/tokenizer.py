"""A word-level tokenizer for the world's closed caption vocabulary, as a transformers fast tokenizer.

The world's captions use a few dozen words, so a BPE vocabulary would be wasted: each lower-cased word (and
each punctuation run) is one token. Sequences are ``[BOS] words... [EOS] [PAD]...``; CLIP's text tower pools
the first ``[EOS]`` (``eos_token_id`` in its config). Saved with ``save_pretrained`` (``tokenizer.json``
holds the vocabulary), loaded back with ``AutoTokenizer.from_pretrained``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[BOS]", "[EOS]")
# the same split as tokenizers' Whitespace pre-tokenizer: runs of word characters, runs of punctuation
_WORD = re.compile(r"\w+|[^\w\s]+")


def words_of(text: str) -> list[str]:
    """Lower-cased words and punctuation runs, the tokenizer's units."""
    return _WORD.findall(text.lower())


def build_word_tokenizer(texts: Iterable[str], max_length: int):
    """A ``PreTrainedTokenizerFast`` whose vocabulary is the special tokens plus every word of ``texts``.

    Args:
        texts: the corpus (all captions of the training world).
        max_length: ``model_max_length`` = context length ``L`` including ``[BOS]`` and ``[EOS]``.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab_words = sorted({word for text in texts for word in words_of(text)})
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *vocab_words])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[BOS] $A [EOS]", special_tokens=[("[BOS]", vocab["[BOS]"]), ("[EOS]", vocab["[EOS]"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        model_max_length=max_length,
        pad_token="[PAD]",
        unk_token="[UNK]",
        bos_token="[BOS]",
        eos_token="[EOS]",
        padding_side="right",
        truncation_side="right",
    )
