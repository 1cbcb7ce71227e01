"""Generation on tensors, as ``model.generate``: a pre-collated batch in, new token ids out.

A thin client of ``nvlm.engine``: the batch is prefilled as it is and decoded there. ``stream`` yields the
next token of every row at each step (a finished row yields ``pad_token_id``); ``generate`` collects them
into (B, n) new-token ids. The settings are ``nvlm.sampling.SamplingParams``' fields.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from nvlm.engine import Engine, first_error
from nvlm.models.cache import MEMORY_INPUTS
from nvlm.models.nvlm import NVLMModel
from nvlm.sampling import SamplingParams


def stream(
    model: NVLMModel,
    input_ids: torch.Tensor,  # (B, T), left-padded
    pixel_values: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,  # (B, T)
    **params: object,
) -> Iterator[torch.Tensor]:
    """Yield (B,) next-token ids per step until every row has stopped or ``max_new_tokens`` is reached.

    ``params`` are ``SamplingParams`` fields, plus NVLM-X/H's memory inputs from the processor; the
    cross-attention keys and values are computed once at prefill and kept in the cache.
    """
    batch = {
        "input_ids": input_ids,
        "pixel_values": pixel_values,
        "attention_mask": attention_mask,
        **{k: params.pop(k) for k in MEMORY_INPUTS if k in params},
    }
    p = SamplingParams(**params)  # type: ignore[arg-type]
    engine = Engine(model, max_batch=max(1, input_ids.shape[0] if input_ids.dim() == 2 else 1))
    seqs = engine.add_batch(batch, p)
    stops = p.stop_ids(model.config.llm.eos_token_id)
    pad = p.pad_token_id if p.pad_token_id is not None else (stops[0] if stops else 0)
    step = 0
    while engine.has_work:
        engine.step()
        first_error(seqs)
        # the first step gives two tokens per row (prefill, then one decode step); rows then advance together
        while all(len(s.tokens) > step or s.finished for s in seqs) and any(len(s.tokens) > step for s in seqs):
            yield torch.tensor([s.tokens[step] if len(s.tokens) > step else pad for s in seqs])
            step += 1


def generate(
    model: NVLMModel,
    input_ids: torch.Tensor,
    pixel_values: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    **params: object,
) -> torch.Tensor:
    """(B, n) new token ids, n <= max_new_tokens; rows that stopped early are padded."""
    steps = list(stream(model, input_ids, pixel_values, attention_mask, **params))
    if not steps:
        return torch.zeros(input_ids.shape[0] if input_ids.dim() > 1 else 1, 0, dtype=torch.long)
    return torch.stack(steps, dim=1)
