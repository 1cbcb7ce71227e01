"""What a real client of the released NVLM-D-72B showed (issue 16 item 6): the answer stripped as the released
``chat()`` strips it, and transformers' dynamic RoPE past ``max_position_embeddings`` as an option."""

from dataclasses import replace

import pytest
import torch

import nvlm.chat
from nvlm import preset
from nvlm.chat import Chat
from nvlm.engine import Sequence, Update
from nvlm.hf_config import from_hf, to_hf
from nvlm.models.llm import LanguageModel
from nvlm.processor import Processor
from nvlm.tokenizer import StreamDecoder


@pytest.fixture()
def chat_answering(tiny_d_config_dir, monkeypatch):
    """A Chat whose engine 'generates' the tokens of a given text (one token a step, text as it decodes)."""
    processor = Processor.from_pretrained(tiny_d_config_dir)

    def make(answer: str) -> Chat:
        ids = processor.tokenizer.encode(answer)

        class Scripted:
            def __init__(self, model, processor, max_batch):
                self.ids, self.decoder = list(ids), StreamDecoder(processor.tokenizer, skip_special_tokens=True)

            def add_batch(self, inputs, params):
                self.seq = Sequence([], params)
                return [self.seq]

            @property
            def has_work(self):
                return bool(self.ids)

            def step(self):
                token = self.ids.pop(0)
                text = self.decoder.feed(token) + ("" if self.ids else self.decoder.flush())
                self.seq.text += text
                return [Update(self.seq, token, text)]

        monkeypatch.setattr(nvlm.chat, "Engine", Scripted)
        return Chat(model=None, processor=processor)  # type: ignore[arg-type]

    return make


@pytest.mark.parametrize("answer", ["\n  Hello there.  \n", " a  b ", "plain", "  \n ", "x\n\ny  "])
def test_chat_strips_the_answer_streamed_and_whole(chat_answering, answer):
    chat = chat_answering(answer)
    pieces = list(chat.stream("Hi"))
    assert chat.processor.tokenizer.decode(chat.processor.tokenizer.encode(answer)) == answer  # the stub is exact
    assert "".join(pieces) == answer.strip()
    assert all(pieces) and (not pieces or not pieces[0][0].isspace())
    assert chat.messages[-1] == {"role": "assistant", "content": answer.strip()}
    assert chat_answering(answer).ask("Hi") == answer.strip()


def _qwen2_pair(dynamic: bool):
    """Our LLM and transformers' Qwen2ForCausalLM with the same weights and rope_scaling dynamic, factor 3."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = replace(
        preset("tiny-d").llm,
        max_position_embeddings=16,
        rope_scaling={"type": "dynamic", "factor": 3.0},
        dynamic_rope=dynamic,
    )
    torch.manual_seed(0)
    ref = Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads,
            num_key_value_heads=cfg.num_kv_heads,
            max_position_embeddings=cfg.max_position_embeddings,
            rms_norm_eps=cfg.rms_norm_eps,
            tie_word_embeddings=False,
            rope_parameters={"rope_type": "dynamic", "factor": 3.0, "rope_theta": cfg.rope_theta},
        )
    ).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(0.15 * torch.randn_like(p))
    ours = LanguageModel(cfg)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref


def test_dynamic_rope_matches_transformers_past_max_positions():
    ours, ref = _qwen2_pair(dynamic=True)
    ids = torch.randint(0, 400, (1, 64))  # 64 positions, max_position_embeddings 16: the base grows
    positions = torch.arange(64)[None]
    with torch.no_grad():
        want = ref(ids).logits
        torch.testing.assert_close(ours(ours.embed(ids), positions), want, atol=1e-4, rtol=1e-4)
        # within the limit: plain RoPE
        torch.testing.assert_close(
            ours(ours.embed(ids[:, :12]), positions[:, :12]), ref(ids[:, :12]).logits, atol=1e-4, rtol=1e-4
        )
        plain, _ = _qwen2_pair(dynamic=False)  # the default (the released code's choice) differs past 16
        assert (plain(plain.embed(ids), positions) - want).abs().max() > 1e-3  # 10x the tolerance above


def test_dynamic_rope_needs_a_dynamic_rope_scaling():
    from nvlm.config import ConfigError

    with pytest.raises(ConfigError, match="dynamic_rope needs rope_scaling"):
        replace(preset("tiny-d"), llm=replace(preset("tiny-d").llm, dynamic_rope=True)).validate()
    cfg = replace(preset("nvlm-d-72b"), llm=replace(preset("nvlm-d-72b").llm, dynamic_rope=True)).validate()
    assert from_hf(to_hf(cfg)) == cfg  # kept in config.json's llm_config
