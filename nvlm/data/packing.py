"""Batches of training examples, several to a row (packed; the rows are filled first-fit by
``nvlm.data.loader.Batcher`` as examples stream in) or one per row.

A packed row numbers its examples 1, 2, ... in ``attention_mask``: each attends only to itself and its
positions restart (``nvlm.models.llm.documents``), its images and cross-attention memory stay its
own, and its targets were shifted inside the example, so packing changes nothing but speed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from nvlm.data.labels import IGNORE, Example
from nvlm.processor import BatchInputs, Processor


def collate(processor: Processor, rows: Sequence[Sequence[Example]], seq_len: int | None = None) -> BatchInputs:
    """Rows of examples -> right-padded model inputs plus ``targets`` (B, T) for the loss."""
    width = seq_len or max(sum(len(e) for e in row) for row in rows)
    pad = processor.tokenizer.pad_token_id or 0
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    targets = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    pixels, places, xmasks = [], [], []
    for r, row in enumerate(rows):
        start = 0
        for doc, ex in enumerate(row, start=1):
            end = start + len(ex)
            input_ids[r, start:end], targets[r, start:end], mask[r, start:end] = ex.input_ids, ex.targets, doc
            pixels.append(ex.pixels)
            places.append((r, start))
            xmasks.append(ex.cross_attention_mask)
            start = end
    batch = processor.add_images(BatchInputs(input_ids=input_ids, attention_mask=mask), pixels, places, xmasks)
    batch["targets"] = targets
    return batch


def padding_fraction(batch: BatchInputs) -> float:
    """The share of the batch's token slots that hold padding."""
    return 1.0 - float(batch["attention_mask"].gt(0).float().mean())
