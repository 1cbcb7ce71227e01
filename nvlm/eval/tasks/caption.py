"""COCO and Flickr30k captions, scored with CIDEr x 100 (EVAL_SPEC 2.11).

nvlm: ``<image>\\nProvide a one-sentence caption for provided image.`` (Megatron NVLM-1.0), the caption cut
to its first line, then ``rstrip('.').lower()`` as Megatron's ``evaluate_coco.py`` does. official:
``<image>\\nGive a brief description of this image in one sentence.`` (Megatron HEAD), 64 new tokens.
CIDEr's IDF comes from the references scored, so a ``--limit`` subset is not comparable with the full set.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from nvlm.eval.metrics import cider
from nvlm.eval.tasks.base import (
    NVLM_SYSTEM,
    DataError,
    Prompt,
    Sample,
    Task,
    check_unique,
    need,
    parquet_files,
    read_json,
    read_parquet,
)

PROMPTS = {
    "nvlm": "Provide a one-sentence caption for provided image.",
    "official": "Give a brief description of this image in one sentence.",
}


class Caption(Task):
    max_tokens = {"official": 64, "nvlm": 16}
    main_metric = "CIDEr"

    def __init__(
        self,
        name: str,
        dirname: str,
        split: str,
        karpathy: str,
        image_dirs: tuple[str, ...],
        megatron_json: str | None,
        hf: str,
        layout: str,
    ) -> None:
        self.name, self.dirname, self.split = name, dirname, split
        self.karpathy, self.image_dirs, self.megatron_json, self.hf = karpathy, image_dirs, megatron_json, hf
        self.layout = layout

    def load(self, root: str | Path) -> list[Sample]:
        d = self.find_dir(root)
        if self.megatron_json and (d / self.megatron_json).is_file():
            return self._load_megatron(d / self.megatron_json)
        if (d / self.karpathy).is_file():
            return self._load_karpathy(d / self.karpathy)
        files = parquet_files(d, self.hf)
        if not files:
            raise self.missing(d, f"{self.megatron_json or self.karpathy} or {self.hf}-*.parquet")
        out = []
        for i, (where, row) in enumerate(read_parquet(files)):
            caps = row.get("answer") if row.get("answer") is not None else row.get("caption")
            (image,) = need(row, where, "image")
            if not caps:
                raise DataError(f"{where}: no reference captions ('answer' or 'caption')")
            sid = row.get("question_id") or row.get("img_id") or row.get("filename") or i
            out.append(Sample(str(sid), [image], {"references": [str(c) for c in caps]}))
        return check_unique(out, str(d))

    def _load_megatron(self, path: Path) -> list[Sample]:
        """BLIP/Megatron ``coco_karpathy_test.json``: ``[{"image": "val2014/...jpg", "caption": [...]}]``."""
        records = read_json(path)
        out = []
        for i, r in enumerate(records if isinstance(records, list) else []):
            where = f"{path}: record {i}"
            image, caps = need(r, where, "image", "caption")
            out.append(
                Sample(
                    Path(image).stem,
                    [self._image(path.parent, image, where)],
                    {"references": [caps] if isinstance(caps, str) else list(caps)},
                )
            )
        return check_unique(out, str(path))

    def _load_karpathy(self, path: Path) -> list[Sample]:
        """Karpathy's ``dataset_*.json``: images with ``split``, ``filepath``/``filename`` and ``sentences``."""
        data = read_json(path)
        out = []
        for i, im in enumerate(data.get("images", []) if isinstance(data, dict) else []):
            where = f"{path}: image {i}"
            split, filename, sentences = need(im, where, "split", "filename", "sentences")
            if split != "test":
                continue
            rel = f"{im['filepath']}/{filename}" if im.get("filepath") else filename
            sid = im.get("cocoid", im.get("imgid", Path(filename).stem))
            out.append(
                Sample(str(sid), [self._image(path.parent, rel, where)], {"references": [s["raw"] for s in sentences]})
            )
        return check_unique(out, str(path))

    def _image(self, d: Path, rel: str, where: str) -> Path:
        for base in (d, *(d / x for x in self.image_dirs)):
            if (base / rel).is_file():
                return base / rel
        raise DataError(f"{where}: image {rel} not found under {d} or {', '.join(self.image_dirs)}")

    def prompt(self, sample: Sample, profile: str) -> Prompt:
        return Prompt(NVLM_SYSTEM, f"<image>\n{PROMPTS[profile]}", list(sample.images))

    def postprocess(self, raw: str, profile: str) -> str:
        text = super().postprocess(raw, profile)
        return text.rstrip(".").lower() if profile == "nvlm" else text

    def score(self, predictions: Sequence[str], samples: Sequence[Sample], profile: str) -> dict[str, float]:
        value, _ = cider(list(predictions), [s.fields["references"] for s in samples])
        return {"CIDEr": 100.0 * value}


COCO = Caption(
    "coco_caption",
    "coco",
    "test",
    "dataset_coco.json",
    ("images",),
    "coco_karpathy_test.json",
    "val",
    """coco/
  coco_karpathy_test.json + val2014/*.jpg       (Megatron's: [{"image": "val2014/...", "caption": [...]}])
or dataset_coco.json + <filepath>/<filename>     (Karpathy split, test images)
or data/val-*.parquet                            (HF lmms-lab/COCO-Caption2017, val2017: a different set)""",
)
FLICKR30K = Caption(
    "flickr30k",
    "flickr30k",
    "test",
    "dataset_flickr30k.json",
    ("flickr30k-images", "images"),
    None,
    "test",
    """flickr30k/
  dataset_flickr30k.json + flickr30k-images/*.jpg  (Karpathy split, 1,000 test images)
or data/test-*.parquet                             (HF lmms-lab/flickr30k: all 31,783 images)""",
)
