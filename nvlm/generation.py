"""Generation, kept apart from the model: prefill, then one token at a time from the KV cache.

``stream`` yields the next token of every row at each step (a finished row yields ``pad_token_id``);
``generate`` collects them into (B, n) new-token ids. Greedy by default; with ``do_sample`` the logits
go through temperature, top-k and top-p. ``top_p <= 0`` keeps only the most likely token (the released
``llm_config`` says ``top_p: 0``, which must not break sampling), as ``top_k <= 0`` and ``top_p >= 1``
disable those filters.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator

import torch

from nvlm.models.cache import KVCache
from nvlm.models.llm import position_ids_from_mask

if TYPE_CHECKING:
    from nvlm.models.nvlm import NVLM


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    eos_token_id: int | list[int] | None = None  # stop tokens; None: the LLM config's eos
    pad_token_id: int | None = None  # written after a row stops; None: its first stop token (or 0)
    seed: int | None = None
    stop_token_ids: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")


def sample(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, V) logits -> (B,) token ids."""
    if not p.do_sample or p.temperature == 0 or p.top_k == 1:
        return logits.argmax(-1)
    logits = logits.float() / p.temperature
    if p.top_k > 0:
        kth = logits.topk(min(p.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= max(p.top_p, 0.0)  # the tokens before it already hold top_p
        drop[:, 0] = False  # always keep the most likely token
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _stop_ids(model: "NVLM", p: SamplingParams) -> list[int]:
    eos = p.eos_token_id if p.eos_token_id is not None else model.config.llm.eos_token_id
    ids = [eos] if isinstance(eos, int) else list(eos or [])
    return ids + [i for i in p.stop_token_ids if i not in ids]


def no_placeholder(model: "NVLM", logits: torch.Tensor) -> torch.Tensor:
    """Never choose the image placeholder: fed back without pixels it would break the next step (a weak
    model, such as a tiny one early in training, does pick it)."""
    i = model.config.image_token_id
    if i is not None and 0 <= i < logits.shape[-1]:
        logits[..., i] = float("-inf")
    return logits


@torch.inference_mode()
def stream(
    model: "NVLM",
    input_ids: torch.Tensor,  # (B, T), left-padded
    pixel_values: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,  # (B, T)
    **params: object,
) -> Iterator[torch.Tensor]:
    """Yield (B,) next-token ids per step until every row has stopped or ``max_new_tokens`` is reached.

    ``params`` are ``SamplingParams`` fields, plus NVLM-X/H's memory inputs from the processor; the
    cross-attention keys and values are computed once at prefill and kept in the cache.
    """
    from nvlm.models.nvlm import MEMORY_INPUTS

    memory = {k: params.pop(k) for k in MEMORY_INPUTS if k in params}
    p = SamplingParams(**params)
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    b, t = input_ids.shape
    device = model.device
    input_ids = input_ids.to(device)
    mask = (torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device)).long()
    stops = _stop_ids(model, p)
    pad = p.pad_token_id if p.pad_token_id is not None else (stops[0] if stops else 0)
    generator = None
    if p.seed is not None:
        generator = torch.Generator(device=model.language_model.lm_head.weight.device).manual_seed(p.seed)
    if p.max_new_tokens == 0:
        return
    cache = KVCache(model.config.llm.num_layers, t + p.max_new_tokens)
    positions = position_ids_from_mask(mask)  # (B, T)
    logits = model(input_ids, pixel_values, mask, positions, cache=cache, num_logits_to_keep=1, **memory).logits
    logits = no_placeholder(model, logits)
    stop_tensor = torch.tensor(stops, device=logits.device)
    done = torch.zeros(b, dtype=torch.bool, device=logits.device)
    last_pos = positions[:, -1:]
    for step in range(p.max_new_tokens):
        token = sample(logits[:, -1], p, generator)  # finished rows keep decoding, but yield padding
        yield torch.where(done, torch.full_like(token, pad), token)
        done |= torch.isin(token, stop_tensor)
        if bool(done.all()) or step + 1 == p.max_new_tokens:
            return
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        last_pos = last_pos + 1
        logits = model(token[:, None], None, mask, last_pos, cache=cache, num_logits_to_keep=1).logits
        logits = no_placeholder(model, logits)


def generate(
    model: "NVLM",
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
