"""Word-level tokenizer for the tiny and toy models (built offline, saved with the model)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

__all__ = ["IMAGE_TOKEN", "SPECIAL_TOKENS", "build_word_tokenizer"]

IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>", IMAGE_TOKEN]
CHAT_WORDS = ["user", "assistant", ":", "?", ".", ",", "\n"]


def build_word_tokenizer(
    words: Iterable[str], extra_special_tokens: Mapping[str, str] | None = None
) -> PreTrainedTokenizerFast:
    """A lower-casing word-level tokenizer over ``words`` plus special and chat tokens.

    ``extra_special_tokens`` maps attribute names to family-specific special tokens (e.g.
    ``{"vision_start_token": "<|vision_start|>"}``); each becomes one unsplittable token and the
    tokenizer attribute of that name, as processors expect.
    """
    extra = {"image_token": IMAGE_TOKEN, **(extra_special_tokens or {})}
    vocab: dict[str, int] = {}
    for token in [*SPECIAL_TOKENS, *extra.values(), *CHAT_WORDS, *sorted(set(words))]:
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
        extra_special_tokens=extra,
    )
    # special tokens match as a whole before the word splitter runs (e.g. "<|image_pad|>")
    fast.add_special_tokens({"additional_special_tokens": list(extra.values())})
    return fast
