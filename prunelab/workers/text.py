"""Word-level tokenizer for the tiny and toy models (built offline, saved with the model)."""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

__all__ = ["IMAGE_TOKEN", "SPECIAL_TOKENS", "build_word_tokenizer"]

IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>", IMAGE_TOKEN]
CHAT_WORDS = ["user", "assistant", ":", "?", ".", ",", "\n"]


def build_word_tokenizer(words: Iterable[str]) -> PreTrainedTokenizerFast:
    """A lower-casing word-level tokenizer over ``words`` plus special and chat tokens."""
    vocab: dict[str, int] = {}
    for token in [*SPECIAL_TOKENS, *CHAT_WORDS, *sorted(set(words))]:
        vocab.setdefault(token, len(vocab))
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
    )
    return fast
