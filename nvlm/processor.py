"""Chat messages or prompt text + images -> the model's inputs, for NVLM-D, -X and -H.

Each ``<image>`` placeholder becomes the image's tile-tagged text, built as text and tokenized together with
the rest of the prompt, as HF ``chat()`` and vLLM do: the tags are not special tokens, and BPE merges
across their edges. Per architecture (spec sections 3-6):
- D: ``<Image>`` + per crop (tile tag + 256 x ``<|vision_pad|>``) + ``</Image>``; ``pixel_values`` = all crops.
- X: ``<Image><tile_1>...<tile_global_thumbnail></Image>``, tags only; every crop goes to the cross-attention
  memory (``memory_pixel_values``). Each tag's tokens read only their own crop; other tokens read every
  crop of the images that ended before them; text before any image reads nothing.
- H: ``<Image><tile_global_thumbnail>`` + 256 x ``<|vision_pad|>`` + ``</Image>``; ``pixel_values`` = thumbnails,
  the regular tiles go to the memory, each after its tag's tokens (``memory_tag_ids``). A one-crop image
  has no regular tile: its single crop is its thumbnail.
A token that straddles two pieces (BPE merges ``><``) reads what both read.
"""

from __future__ import annotations

import base64
import json
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, overload

import torch
from tokenizers import normalizers

from nvlm.config import ConfigError, NVLMConfig, read_json_object
from nvlm.hf_config import from_json_file, model_dir
from nvlm.image import ImageProcessor, load_image
from nvlm.template import IMAGE_PLACEHOLDER, PromptError, Rendered, check_text, render
from nvlm.tokenizer import Tokenizer

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


PROMPT_FORMAT_KEY = "nvlm_prompt_format"  # preprocessor_config.json: the prompt format a directory's model expects


class BatchInputs(dict):
    """The model's keyword arguments; a dict, so ``model(**inputs)`` works, plus ``to(device)``."""

    def to(self, device: torch.device | str) -> BatchInputs:
        return BatchInputs({k: v.to(device) for k, v in self.items()})


@dataclass
class Encoded:
    """One prompt tokenized: ids, their character spans in ``text``, and (X/H) the crops each token reads."""

    text: str  # the prompt with its images expanded
    input_ids: list[int]
    offsets: list[tuple[int, int]]
    cross_attention_mask: torch.Tensor | None  # (T, K) bool over this prompt's K memory crops; None for D


class Processor:
    """Tokenizer + image tiling + the NVLM prompt format, in one object."""

    def __init__(
        self, tokenizer: Tokenizer, image_processor: ImageProcessor, config: NVLMConfig, chat_template: str = "nvlm"
    ) -> None:
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.config = config
        self.chat_template = chat_template  # "nvlm", "checkpoint", or Jinja source
        self.image_token_id = tokenizer.token_to_id(config.image_token)
        self._max_token_bytes: int | None = None  # computed at the first min_tokens()

    @classmethod
    def from_pretrained(
        cls, path: str | Path, chat_template: str | None = None, max_tiles: int | None = None
    ) -> Processor:
        """Read config.json, the tokenizer files and (optionally) preprocessor_config.json.

        config.json fixes the tile size; ``max_dynamic_patch`` / ``min_dynamic_patch`` / ``use_thumbnail`` in
        preprocessor_config.json, then ``max_tiles`` here, override its tiling (e.g. fewer tiles for memory).
        ``chat_template`` None: the directory's own prompt format (``nvlm_prompt_format`` in
        preprocessor_config.json, "checkpoint" for a model converted from Megatron-Core), else "nvlm".
        """
        path = model_dir(path)
        cfg = from_json_file(path / "config.json")
        tiling: dict[str, Any] = {
            "max_tiles": cfg.max_tiles,
            "min_tiles": cfg.min_tiles,
            "use_thumbnail": cfg.use_thumbnail,
        }
        pre = path / "preprocessor_config.json"
        data: dict[str, Any] = read_json_object(pre) if pre.is_file() else {}
        if chat_template is None:
            chat_template = str(data.get(PROMPT_FORMAT_KEY, "nvlm"))
        if data:
            for key in ("image_size", "crop_size", "size"):
                size = _side(data.get(key))
                if size is not None and size != cfg.tile_size:
                    raise ConfigError(f"{pre}: {key} {size} differs from the model's tile size {cfg.tile_size}")
            for src, dst in (
                ("max_dynamic_patch", "max_tiles"),
                ("min_dynamic_patch", "min_tiles"),
                ("use_thumbnail", "use_thumbnail"),
            ):
                if src in data:
                    tiling[dst] = data[src]
            try:  # the config's checks (types, 1 <= min <= max <= the limit) before any grid is enumerated
                replace(cfg, **tiling).validate()
            except ConfigError as e:
                raise ConfigError(f"{pre}: {e}") from None
        if max_tiles is not None:
            tiling["max_tiles"] = max_tiles
            tiling["min_tiles"] = min(tiling["min_tiles"], max_tiles)
        images = ImageProcessor(tile_size=cfg.tile_size, **tiling)
        return cls(Tokenizer.from_pretrained(path), images, cfg, chat_template)

    def save_pretrained(self, path: str | Path) -> None:
        """Tokenizer files + an HF CLIP-style preprocessor_config.json (the released checkpoint's shape).

        No processor_config.json: transformers' AutoProcessor would look for a class it cannot import.
        """
        path = Path(path)
        self.tokenizer.save(path)
        ip, cfg, size = self.image_processor, self.config, self.config.tile_size
        pre = {
            "crop_size": size,
            "do_center_crop": True,
            "do_normalize": True,
            "do_resize": True,
            "feature_extractor_type": "CLIPFeatureExtractor",
            "image_mean": IMAGENET_MEAN,
            "image_size": size,
            "image_std": IMAGENET_STD,
            "resample": 3,
            "size": size,
            "dynamic_image_size": True,
            "max_dynamic_patch": getattr(ip, "max_tiles", cfg.max_tiles),
            "min_dynamic_patch": getattr(ip, "min_tiles", cfg.min_tiles),
            "use_thumbnail": getattr(ip, "use_thumbnail", cfg.use_thumbnail),
        }
        if self.chat_template == "checkpoint":  # the tokenizer's template is this model's prompt format
            pre[PROMPT_FORMAT_KEY] = "checkpoint"
        (path / "preprocessor_config.json").write_text(json.dumps(pre, indent=2) + "\n")

    # ------------------------------------------------------------------------------------ prompt text

    def tags(self, n_crops: int) -> list[str]:
        """The tags of an image's crops: ``<tile_1>`` ... then the thumbnail's (a single crop has only that)."""
        if n_crops < 1:
            raise ValueError(f"an image has at least one crop, not {n_crops}")
        c = self.config
        return [c.tile_tag.format(k) for k in range(1, n_crops)] + [c.thumbnail_tag]

    def memory_crops(self, n_crops: int) -> int:
        """How many of an image's crops go to the cross-attention memory."""
        return self.config.architecture.memory_crops(n_crops)

    def _image_pieces(self, n_crops: int) -> list[tuple[str, int | None]]:
        """An image's text as pieces, each with the memory crop (of this image) that only it reads, or None."""
        c = self.config
        return c.architecture.image_pieces(
            self.tags(n_crops), c.image_start, c.image_end, c.image_token * c.tokens_per_tile
        )

    def _image_tokens(self, n_crops: int) -> int:
        """How many image tokens the string of an image with ``n_crops`` crops holds."""
        return self.config.architecture.sequence_crops(n_crops) * self.config.tokens_per_tile

    @property
    def reserved(self) -> tuple[str, ...]:
        """Text no prompt may hold (it would become image tokens without an image): the image token."""
        return (self.config.image_token,)

    def min_tokens(self, text: str) -> int:
        """A lower bound on the token count of ``text``, without tokenizing it (microseconds per MB of
        ASCII): its normalised UTF-8 bytes over the most bytes any one token stands for. 0 when the
        vocabulary has an unknown token (one of which can stand for any amount of text)."""
        if self._max_token_bytes is None:
            backend = self.tokenizer.backend
            model = backend.model
            if getattr(model, "unk_token", None) is not None or getattr(model, "unk_id", None) is not None:
                self._max_token_bytes = 0
            else:
                vocab = backend.decode_batch([[i] for i in range(backend.get_vocab_size())], skip_special_tokens=False)
                self._max_token_bytes = max(len(t.encode("utf-8")) for t in vocab)
        if not self._max_token_bytes:
            return 0
        return -(-len(_normalize(self.tokenizer.backend.normalizer, text).encode("utf-8")) // self._max_token_bytes)

    def image_string(self, n_crops: int) -> str:
        """The tile-tagged text of one image with ``n_crops`` crops (the last crop is the thumbnail)."""
        return "".join(piece for piece, _ in self._image_pieces(n_crops))

    def expand(self, text: str, crops_per_image: Sequence[int]) -> str:
        """Replace the k-th ``<image>`` in ``text`` by the string of image k."""
        return self.encode(text, crops_per_image, tokenize=False).text

    def encode(self, text: str, crops_per_image: Sequence[int], tokenize: bool = True) -> Encoded:
        """Expand ``text``'s images, tokenize, and (X/H) work out which memory crops each token reads."""
        parts = [check_text(p, self.reserved, "the prompt text") for p in text.split(IMAGE_PLACEHOLDER)]
        if len(parts) - 1 != len(crops_per_image):
            raise PromptError(
                f"the prompt has {len(parts) - 1} {IMAGE_PLACEHOLDER} placeholders "
                f"but {len(crops_per_image)} images were given"
            )
        pieces, seen = [parts[0]], 0
        reads_upto = [(0, 0)]  # (first char, memory crops of the images that ended before it)
        only: list[tuple[int, int, int]] = []  # (start, end, crop) spans that read a single crop (X's tags)
        pos = len(parts[0])
        for n, rest in zip(crops_per_image, parts[1:], strict=True):
            for piece, k in self._image_pieces(n):
                if k is not None:
                    only.append((pos, pos + len(piece), seen + k))
                pieces.append(piece)
                pos += len(piece)
            seen += self.memory_crops(n)
            reads_upto.append((pos - len(self.config.image_end), seen))  # from ``</Image>`` on
            pieces.append(rest)
            pos += len(rest)
        full = "".join(pieces)
        if not tokenize:
            return Encoded(full, [], [], None)
        ids, offsets = self.tokenizer.encode_with_offsets(full)
        want = sum(self._image_tokens(n) for n in crops_per_image)
        if ids.count(self.image_token_id) != want:  # e.g. a normalizer that turned other text into the token
            raise PromptError(
                f"the prompt has {ids.count(self.image_token_id)} {self.config.image_token!r} tokens "
                f"(the model's image token) but its images need {want}"
            )
        bos = self.tokenizer.bos_token_id
        if self.tokenizer.add_bos_token and bos is not None and (not ids or ids[0] != bos):
            ids, offsets = [bos, *ids], [(0, 0), *offsets]
        xmask = None
        if self.config.architecture.cross_attention:
            xmask = torch.zeros(len(ids), seen, dtype=torch.bool)
            for t, (s, e) in enumerate(offsets):
                last = max(e - 1, s)  # reads grow along the text: the last char reads the most
                xmask[t, : max(m for c, m in reads_upto if c <= last)] = True
                for a, b, k in only:
                    if s < b and a < max(e, s + 1):
                        xmask[t, k] = True
        return Encoded(full, ids, offsets, xmask)

    # ------------------------------------------------------------------------------------- batching

    def __call__(self, text: str | Sequence[str], images: Any = None, return_tensors: str = "pt") -> BatchInputs:
        """Left-padded ``input_ids`` / ``attention_mask``, and ``pixel_values`` of all crops when there are images.

        ``images`` is a flat list (taken in order across prompts) or one list per prompt.
        """
        if return_tensors != "pt":
            raise ValueError(f"only return_tensors='pt' is supported, not {return_tensors!r}")
        texts = [text] if isinstance(text, str) else list(text)
        if not texts:
            raise PromptError("no prompt text given")
        per_prompt = self._assign_images(texts, images)
        rows, pixels = [], []
        for t, imgs in zip(texts, per_prompt, strict=True):
            pix = [self.image_processor(load_image(_source(im))) for im in imgs]
            pixels.append(pix)
            rows.append(self.encode(t, [p.shape[0] for p in pix]))
        return self.collate(rows, pixels)

    def collate(self, rows: Sequence[Encoded], pixels: Sequence[Sequence[torch.Tensor]]) -> BatchInputs:
        """Left-pad encoded prompts into a batch; route each prompt's crops (n_crops, 3, S, S) by architecture."""
        width = max(len(r.input_ids) for r in rows)
        pad = _first_not_none(self.tokenizer.pad_token_id, self.tokenizer.eos_token_id, 0)
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            if r.input_ids:
                input_ids[i, width - len(r.input_ids) :] = torch.tensor(r.input_ids, dtype=torch.long)
                mask[i, width - len(r.input_ids) :] = 1
        out = BatchInputs(input_ids=input_ids, attention_mask=mask)
        masks = [r.cross_attention_mask for r in rows]
        return self.add_images(out, pixels, [(i, width - len(r.input_ids)) for i, r in enumerate(rows)], masks)

    def split_crops(self, crops: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """An image's crops (n, 3, S, S) -> (in the sequence, in the cross-attention memory), by architecture."""
        return self.config.architecture.split_crops(crops)

    def add_images(
        self,
        batch: BatchInputs,
        pixels: Sequence[Sequence[torch.Tensor]],
        places: Sequence[tuple[int, int]],
        masks: Sequence[torch.Tensor | None],
    ) -> BatchInputs:
        """Add the image inputs of prompts placed in ``batch``: prompt j (its images' crops ``pixels[j]``, its
        (T_j, K_j) cross-attention mask) sits in row ``places[j][0]`` from token ``places[j][1]`` on. Several
        prompts may share a row (packing); give them in row-major order, as the model reads images in that order."""
        b, width = batch["input_ids"].shape
        split = [[self.split_crops(p) for p in ps] for ps in pixels]
        in_sequence = [s for ps in split for s, _ in ps if len(s)]
        if in_sequence:
            batch["pixel_values"] = torch.cat(in_sequence).float()
        counts = [0] * b
        for (row, _), ps in zip(places, split, strict=True):
            counts[row] += sum(len(m) for _, m in ps)
        if not any(counts):
            return batch
        xmask = torch.zeros(b, width, max(counts), dtype=torch.bool)
        filled = [0] * b
        memory: list[list[torch.Tensor]] = [[] for _ in range(b)]  # crops row by row, as the model reads them
        tiles: list[list[int]] = [[] for _ in range(b)]
        for (row, start), ps, mask in zip(places, split, masks, strict=True):
            if mask is None:  # only an architecture without cross-attention has none, and no memory crops
                continue
            t, k = mask.shape
            xmask[row, start : start + t, filled[row] : filled[row] + k] = mask
            filled[row] += k
            memory[row] += [m for _, m in ps if len(m)]
            tiles[row] += [len(m) for _, m in ps if len(m)]
        batch["memory_pixel_values"] = torch.cat([m for ms in memory for m in ms]).float()
        batch["memory_crops"] = torch.tensor(counts, dtype=torch.long)
        batch["cross_attention_mask"] = xmask
        if self.config.architecture.tags_in_memory:
            batch["memory_tag_ids"] = self._tag_ids([n for row in tiles for n in row])
        return batch

    def _tag_ids(self, tiles_per_image: Sequence[int]) -> torch.Tensor:
        """(N_mem, L_tag) token ids of each memory tile's ``<tile_k>`` tag, -1 after a shorter tag."""
        tags = [self.tokenizer.encode(self.config.tile_tag.format(k)) for n in tiles_per_image for k in range(1, n + 1)]
        out = torch.full((len(tags), max(len(t) for t in tags)), -1, dtype=torch.long)
        for i, t in enumerate(tags):
            out[i, : len(t)] = torch.tensor(t)
        return out

    def _assign_images(self, texts: list[str], images: Any) -> list[list[Any]]:
        counts = [t.count(IMAGE_PLACEHOLDER) for t in texts]
        if images is None:
            images = []
        elif not isinstance(images, (list, tuple)):
            images = [images]
        nested = bool(images) and all(isinstance(x, (list, tuple)) for x in images)
        if nested:
            if len(images) != len(texts):
                raise PromptError(f"{len(texts)} prompts but {len(images)} per-prompt image lists")
            for i, (n, imgs) in enumerate(zip(counts, images, strict=True)):
                if n != len(imgs):
                    raise PromptError(
                        f"prompt {i} has {n} {IMAGE_PLACEHOLDER} placeholders but {len(imgs)} images were given"
                    )
            return [list(x) for x in images]
        if sum(counts) != len(images):
            raise PromptError(
                f"the prompts have {sum(counts)} {IMAGE_PLACEHOLDER} placeholders but {len(images)} images were given"
            )
        out, start = [], 0
        for n in counts:
            out.append(list(images[start : start + n]))
            start += n
        return out

    # --------------------------------------------------------------------------------- chat messages

    def render(self, messages: Any, add_generation_prompt: bool = True, chat_template: str | None = None) -> Rendered:
        """One conversation through template.py, in this processor's (or the given) prompt format."""
        name = chat_template or self.chat_template
        tok = self.tokenizer
        if name == "nvlm":
            return render(messages, "nvlm", add_generation_prompt=add_generation_prompt, reserved=self.reserved)
        if name == "checkpoint" or "{%" in name or "{{" in name:
            source = tok.chat_template if name == "checkpoint" else name
            special: dict[str, Any] = {k: _name(tok.config.get(k)) for k in ("bos_token", "eos_token", "pad_token")}
            eot = special["eos_token"] or "<|im_end|>"
            return render(
                messages,
                "checkpoint",
                jinja_template=source,
                add_generation_prompt=add_generation_prompt,
                end_of_turn=eot,
                reserved=self.reserved,
                **special,
            )
        raise PromptError(f"unknown chat_template {name!r}: use 'nvlm', 'checkpoint' or Jinja source")

    @overload
    def apply_chat_template(
        self,
        messages_or_batch: Any,
        add_generation_prompt: bool = ...,
        tokenize: Literal[True] = ...,
        chat_template: str | None = ...,
    ) -> BatchInputs: ...

    @overload
    def apply_chat_template(
        self,
        messages_or_batch: Any,
        add_generation_prompt: bool = ...,
        *,
        tokenize: Literal[False],
        chat_template: str | None = ...,
    ) -> str | list[str]: ...

    def apply_chat_template(
        self,
        messages_or_batch: Any,
        add_generation_prompt: bool = True,
        tokenize: bool = True,
        chat_template: str | None = None,
    ) -> BatchInputs | str | list[str]:
        """A conversation or a list of them -> model inputs (or, with ``tokenize=False``, the prompt text)."""
        batch = (
            isinstance(messages_or_batch, (list, tuple))
            and bool(messages_or_batch)
            and all(isinstance(c, (list, tuple)) for c in messages_or_batch)
        )
        convs = list(messages_or_batch) if batch else [messages_or_batch]
        rendered = [self.render(c, add_generation_prompt, chat_template) for c in convs]
        texts = [r.text for r in rendered]
        images = [[load_image(_source(im)) for im in r.images] for r in rendered]
        if tokenize:
            return self(texts, images)
        out = [
            self.expand(t, [self.image_processor.num_crops(*im.size) for im in ims])
            for t, ims in zip(texts, images, strict=True)
        ]
        return out if batch else out[0]

    # ------------------------------------------------------------------------------------- decoding

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.reshape(-1).tolist()
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def batch_decode(
        self, sequences: Sequence[Sequence[int]] | torch.Tensor, skip_special_tokens: bool = True
    ) -> list[str]:
        return [self.decode(s, skip_special_tokens) for s in sequences]

    @property
    def eos_token_ids(self) -> list[int]:
        """Generation stop tokens: ``<|im_end|>`` (the end of an assistant turn), then the tokenizer's eos."""
        ids = []
        try:
            ids.append(self.tokenizer.token_to_id("<|im_end|>"))
        except ValueError:
            pass
        eos = self.tokenizer.eos_token_id
        if eos is not None and eos not in ids:
            ids.append(eos)
        return ids


def _source(image: Any) -> Any:
    """``data:`` and ``file://`` URLs -> bytes / paths that ``load_image`` reads; anything else unchanged."""
    if isinstance(image, str):
        if image.startswith("data:"):
            head, _, data = image.partition(",")
            if ";base64" not in head:
                raise PromptError("only base64 data: URLs are supported for images")
            try:
                return base64.b64decode(data, validate=True)
            except ValueError as e:
                raise PromptError(f"bad base64 in image data: URL ({e})") from None
        if image.startswith("file://"):
            return image[len("file://") :]
        if image.startswith(("http://", "https://")):
            raise PromptError(f"remote image URLs are not fetched ({image[:60]}); pass a path, bytes or a data: URL")
    return image


def _normalize(normalizer: Any, text: str) -> str:
    """``text`` as the tokenizer's normalizer leaves it; NFC/NFKC by Python's unicodedata (instant on
    text that is already normal, such as ASCII), anything else by the normalizer itself."""
    if normalizer is None:
        return text
    for form in ("NFC", "NFKC"):
        if type(normalizer) is getattr(normalizers, form):
            return unicodedata.normalize(form, text)
    return normalizer.normalize_str(text)


def _side(v: Any) -> int | None:
    if isinstance(v, int):
        return v
    if isinstance(v, dict):
        return v.get("height") or v.get("shortest_edge")
    return None


def _name(tok: Any) -> str | None:
    return tok.get("content") if isinstance(tok, dict) else tok


def _first_not_none(*xs: int | None) -> int:
    return next(x for x in xs if x is not None)
