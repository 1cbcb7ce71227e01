"""The tokenizer of a converted Megatron model: NVLM's special tokens and the prompt Megatron trained it with.

From a Qwen2-72B-Instruct (Megatron's ``--tokenizer-model``) or NVLM-D-72B tokenizer directory:
- the image token (``cfg.image_token``, ``<|vision_pad|>``) is added as a special token when missing (Qwen2 has
  151,643 + 3 tokens, so it takes id 151,646: the row Megatron's own ``<image>`` token had, MCORE_SPEC 2.8);
- tile tags are made pre-tokenizer pieces of their own, so that ``<Image><tile_1>`` tokenizes as Megatron's
  ``MultimodalTokenizer`` did, each tag on its own (``model.py:196-216``), not with BPE merging ``><`` across the
  tag's edge as the HF prompt string would (MCORE_SPEC 5 items 4-5);
- the chat template is Megatron's qwen2p0 format, the ``nvlm`` eval profile's (EVAL_SPEC 1.1).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from tokenizers import AddedToken, Regex, pre_tokenizers

from nvlm.config import NVLMConfig
from nvlm.template import MEGATRON_TEMPLATE
from nvlm.tokenizer import Tokenizer, TokenizerError


def tag_pattern(cfg: NVLMConfig) -> str:
    """A regex matching every tile tag and the thumbnail tag of ``cfg``."""
    tile = re.escape(cfg.tile_tag).replace(re.escape("{}"), r"\d+")
    return f"{tile}|{re.escape(cfg.thumbnail_tag)}"


def for_megatron_model(path: str | Path, cfg: NVLMConfig) -> Tokenizer:
    """The tokenizer of ``path`` with the changes above; ``TokenizerError`` if it does not fit the model."""
    tok = Tokenizer.from_pretrained(path)
    tk = tok.backend
    if tk.token_to_id(cfg.image_token) is None:
        tk.add_special_tokens([AddedToken(cfg.image_token, normalized=False, special=True)])
        extra = tok.config.get("additional_special_tokens") or []
        tok.config["additional_special_tokens"] = [*extra, cfg.image_token]
    if tok.vocab_size > cfg.llm.vocab_size:
        raise TokenizerError(
            f"{path}: {tok.vocab_size} tokens (with the image token) do not fit the model's "
            f"{cfg.llm.vocab_size}-row vocabulary"
        )
    pattern = tag_pattern(cfg)
    if cfg.tile_tag and cfg.thumbnail_tag and json.dumps(pattern)[1:-1] not in tk.to_str():  # not yet isolated
        isolate = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
        tk.pre_tokenizer = isolate if tk.pre_tokenizer is None else pre_tokenizers.Sequence([isolate, tk.pre_tokenizer])
    tok.config["chat_template"] = MEGATRON_TEMPLATE
    return tok
