"""What each architecture does with a prompt's image: the one place where NVLM-D, -X and -H differ.

An image is cut into crops: its regular tiles, then the thumbnail (a one-crop image has only the thumbnail).
Each crop either joins the decoder's sequence (its tile tag, then ``tokens_per_tile`` image tokens whose
embeddings the crop's features replace) or goes to the cross-attention memory, read by the gated blocks:

- D: every crop in the sequence; no memory, no cross-attention blocks (spec sections 3-4);
- X: every crop in the memory; the sequence holds the tags only, each tag's tokens reading their own crop
  (section 5);
- H: the thumbnail in the sequence, the regular tiles in the memory, each after its tag's embeddings, so the
  tags do not appear in the sequence (section 6).

The model (which modules exist, what ``forward`` accepts), the processor (text, masks, crops), the device
map, the configs, the HF mapping and the memory plan read these fields instead of testing the name.
Imports nothing: it sits below the configs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, TypeVar

Arch = Literal["D", "X", "H"]
T = TypeVar("T")


@dataclass(frozen=True)
class Architecture:
    name: Arch
    tiles_in_sequence: bool  # the regular tiles join the sequence (else they go to the memory)
    thumbnail_in_sequence: bool  # the thumbnail (or a lone crop) joins the sequence
    tags_in_memory: bool  # a memory crop is preceded, in the memory, by its tag's embeddings (else the tag is text)
    projector_layers: int  # ``mlp1``'s linear layers
    hf_names: tuple[str, ...]  # config.json ``architectures`` names; the first is written
    released: bool  # a released checkpoint (and HF remote code, vLLM support) exists

    @property
    def cross_attention(self) -> bool:
        """Some crop goes to the memory: the model has gated cross-attention blocks (``xattn_layers.*``), the
        processor makes ``memory_*`` inputs and a cross-attention mask."""
        return not (self.tiles_in_sequence and self.thumbnail_in_sequence)

    @property
    def sequence_images(self) -> bool:
        """Some crop joins the sequence: the model takes ``pixel_values`` (NVLM-X refuses them)."""
        return self.tiles_in_sequence or self.thumbnail_in_sequence

    def sequence_crops(self, n_crops: int) -> int:
        """How many of an image's ``n_crops`` crops (the last ones: the thumbnail last) join the sequence."""
        if n_crops < 1:
            raise ValueError(f"an image has at least one crop, not {n_crops}")
        return (n_crops - 1) * self.tiles_in_sequence + self.thumbnail_in_sequence

    def memory_crops(self, n_crops: int) -> int:
        """How many of an image's crops (the first ones) go to the cross-attention memory."""
        return n_crops - self.sequence_crops(n_crops)

    def split_crops(self, crops: T) -> tuple[T, T]:
        """An image's crops (a tensor or list of n, thumbnail last) -> (in the sequence, in the memory)."""
        m = self.memory_crops(len(crops))  # type: ignore[arg-type]
        return crops[m:], crops[:m]  # type: ignore[index]

    def image_pieces(self, tags: list[str], image_start: str, image_end: str, pad: str) -> list[tuple[str, int | None]]:
        """An image's text as pieces, each with the memory crop (of this image) that only it reads, or None.
        ``tags``: the crops' tags (the thumbnail's last); ``pad``: the image tokens of one crop."""
        m = self.memory_crops(len(tags))
        own = [] if self.tags_in_memory else [(tags[k], k) for k in range(m)]  # X: a tag reads its crop
        sequence = "".join(tag + pad for tag in tags[m:])
        return [(image_start, None), *own, (sequence + image_end, None)]


ARCHITECTURES: dict[str, Architecture] = {
    "D": Architecture("D", True, True, False, 2, ("NVLM_D", "NVLM_D_Model"), released=True),
    "X": Architecture("X", False, False, False, 1, ("NVLM_X",), released=False),
    "H": Architecture("H", False, True, True, 2, ("NVLM_H",), released=False),
}
# "NVLM_D_Model": the class name that the released remote code's save_pretrained writes.
BY_HF_NAME = {name: a.name for a in ARCHITECTURES.values() for name in a.hf_names}


def architecture(name: str) -> Architecture:
    """The architecture named ``name`` ("D", "X" or "H"); a ``ValueError`` for any other."""
    try:
        return ARCHITECTURES[name]
    except (KeyError, TypeError):
        raise ValueError(f"arch must be D, X or H, not {name!r}") from None
