"""How the next token is chosen: a request's sampling settings and the per-row pick from its logits.

Greedy by default; with ``do_sample`` the logits go through the repetition penalty, temperature, top-k and
top-p. ``top_p <= 0`` keeps only the most likely token (the released ``llm_config`` says ``top_p: 0``, which
must not break sampling), as ``top_k <= 0`` and ``top_p >= 1`` disable those filters. The repetition
penalty (CTRL's, as transformers applies it) divides the positive logits and multiplies the negative ones of
every token already seen, prompt included; it applies to greedy decoding too.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None  # a generator of the sequence's own (a batch's row i: seed + i)
    stop: tuple[str, ...] = ()  # stop strings: the text ends before the first one that appears
    eos_token_id: int | list[int] | None = None  # stop tokens; None: the LLM config's eos
    stop_token_ids: list[int] = field(default_factory=list)  # more stop tokens
    pad_token_id: int | None = None  # ``generate``: written after a row stops; None: its first stop token

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        self.stop = tuple(s for s in ([self.stop] if isinstance(self.stop, str) else self.stop) if s)

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0 or self.top_k == 1

    def stop_ids(self, default_eos: int | list[int] | None) -> list[int]:
        eos = self.eos_token_id if self.eos_token_id is not None else default_eos
        ids = [eos] if isinstance(eos, int) else list(eos or [])
        return ids + [i for i in self.stop_token_ids if i not in ids]


def penalize_repetition(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """(V,) logits with every ``seen`` token id's logit divided by ``penalty`` if positive, else multiplied."""
    if penalty == 1.0 or seen.numel() == 0:
        return logits
    picked = logits[seen]
    out = logits.clone()
    out[seen] = torch.where(picked > 0, picked / penalty, picked * penalty)
    return out


def sample(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, V) logits -> (B,) token ids."""
    if p.greedy:
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


def no_placeholder(logits: torch.Tensor, image_token_id: int | None) -> torch.Tensor:
    """Never choose the image placeholder: fed back without pixels it would break the next step (a weak
    model, such as a tiny one early in training, does pick it). In place; returns ``logits``."""
    if image_token_id is not None and 0 <= image_token_id < logits.shape[-1]:
        logits[..., image_token_id] = float("-inf")
    return logits
