"""The families' own processor classes: subclasses of transformers processors, whose import
loads transformers' model code. They live here, apart from their family modules, so that a
family module is imported (a sweep planned, a model described) without them; the family
modules import this module where a model's processor is built or loaded.
"""

from __future__ import annotations

from typing import Any, ClassVar

from transformers import InternVLProcessor, Qwen2_5_VLProcessor, Qwen2VLProcessor

__all__ = ["ImageOnlyQwen2VLProcessor", "ImageOnlyQwen2_5_VLProcessor", "InternVLImageProcessor"]


class _ImageOnly:
    """Mixin: the family's processor without its video processor.

    prunelab feeds images only, and in transformers 5 ``Qwen2VLProcessor`` cannot be built
    without torchvision (its video processor needs it). Saved processors keep the family's
    class name, so ``AutoProcessor`` still loads them where torchvision is installed.
    """

    saved_class: ClassVar[str] = ""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        output = super().to_dict()
        output["processor_class"] = self.saved_class
        return output


class ImageOnlyQwen2VLProcessor(_ImageOnly, Qwen2VLProcessor):
    """``Qwen2VLProcessor`` for images only (see :class:`_ImageOnly`)."""

    saved_class = "Qwen2VLProcessor"


class ImageOnlyQwen2_5_VLProcessor(_ImageOnly, Qwen2_5_VLProcessor):
    """``Qwen2_5_VLProcessor`` for images only (see :class:`_ImageOnly`)."""

    saved_class = "Qwen2_5_VLProcessor"


class InternVLImageProcessor(InternVLProcessor):
    """``InternVLProcessor`` for images only: no video processor (which needs torchvision).

    Same prompt expansion and tiling as the stock processor; loads a hub or local checkpoint's
    image processor and tokenizer.
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        image_seq_length: int = 256,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            image_processor,
            tokenizer,
            None,
            image_seq_length=image_seq_length,
            chat_template=chat_template,
            **kwargs,
        )
