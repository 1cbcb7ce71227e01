"""One training example: the prompt renderer's tokens, which of them are supervised, and the image crops.

Labels come from the same renderer and processor as inference (``Processor.render`` + ``Processor.encode``), so
training sees exactly the tokens a chat request produces. Only assistant text is supervised, with the
``<|im_end|>`` that closes each answer; system and user text, the ``<|im_start|>assistant\\n`` prefix (as in
Megatron's NVLM SFT), image tokens, tags and padding are not (spec section 7.4).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from nvlm.data.records import RecordError
from nvlm.image import load_image
from nvlm.processor import Processor
from nvlm.template import IMAGE_PLACEHOLDER, PromptError, parse_messages

IGNORE = -100  # cross_entropy's ignore_index


@dataclass
class Example:
    input_ids: torch.Tensor  # (T,)
    targets: torch.Tensor  # (T,) the next token where it is supervised, else IGNORE (already shifted)
    pixels: list[torch.Tensor]  # per image: (n_crops, 3, S, S)
    cross_attention_mask: torch.Tensor | None  # (T, K) for X/H

    def __len__(self) -> int:
        return self.input_ids.numel()

    @property
    def num_supervised(self) -> int:
        return int((self.targets != IGNORE).sum())


def encode_example(processor: Processor, messages: list[dict[str, Any]], max_len: int) -> Example:
    """Render, tokenize and label one conversation; ``RecordError`` when it cannot be trained on (a malformed
    conversation, a ``PromptError`` of the renderer, the image token written as text, an unreadable image, no
    answer, over ``max_len`` tokens). The example's image tokens are exactly those of its images."""
    try:
        if any(processor.config.image_token in m.content for m in parse_messages(messages)):
            raise RecordError(f"image token text: {processor.config.image_token} written in a message")
        rendered = processor.render(messages, add_generation_prompt=False)
        if not any(role == "assistant" and text.strip() for text, role in rendered.segments):
            raise RecordError("no assistant answer to learn from")
        try:
            pixels = [processor.image_processor(load_image(src)) for src in rendered.images]
        except (ValueError, OSError) as e:
            raise RecordError(f"image: {e}") from None
        crops = [p.shape[0] for p in pixels]
        enc = processor.encode(rendered.text, crops)
    except PromptError as e:
        raise RecordError(f"bad conversation: {e}") from None
    if len(enc.input_ids) > max_len:
        raise RecordError(f"too long: {len(enc.input_ids)} tokens > {max_len}")
    # character ranges of the assistant segments in the expanded text
    supervised, pos, image = [], 0, 0
    for text, role in rendered.segments:
        n = text.count(IMAGE_PLACEHOLDER)
        length = len(processor.expand(text, crops[image : image + n]))
        if role == "assistant":
            supervised.append((pos, pos + length))
        pos, image = pos + length, image + n
    assert pos == len(enc.text), "segments do not add up to the rendered prompt"
    ids = torch.tensor(enc.input_ids, dtype=torch.long)
    sup = torch.tensor([any(a <= s < b for a, b in supervised) and e > s for s, e in enc.offsets])
    targets = torch.full_like(ids, IGNORE)
    targets[:-1] = torch.where(sup[1:], ids[1:], IGNORE)  # position t predicts token t + 1
    if not (targets != IGNORE).any():
        raise RecordError("no supervised token left")
    return Example(ids, targets, pixels, enc.cross_attention_mask)
