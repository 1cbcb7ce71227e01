"""Checkpoint I/O in the released NVLM-D-72B layout."""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import IMAGE_TOKEN_ID
from reference.hf_nvlm_d import released_config
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from nvlm import preset
from nvlm.checkpoint import CheckpointError
from nvlm.config import ConfigError
from nvlm.hf_config import from_hf, from_json_file, to_hf
from nvlm.pretrained import NVLM


def _all_tensors(path):
    index = json.loads((path / "model.safetensors.index.json").read_text())
    out = {}
    for f in set(index["weight_map"].values()):
        out.update(load_file(str(path / f)))
    return out, index


def test_released_config_reads_to_the_preset():
    """The released 72B config.json (as published) gives the nvlm-d-72b preset."""
    cfg = released_config(151654)
    cfg["force_image_size"] = 448
    cfg["vision_config"].update(
        hidden_size=3200, num_hidden_layers=45, num_attention_heads=25, intermediate_size=12800, image_size=448
    )
    cfg["llm_config"].update(
        hidden_size=8192,
        intermediate_size=29568,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        rope_theta=1000000.0,
        vocab_size=152064,
        max_position_embeddings=32768,
        bos_token_id=151643,
        eos_token_id=151645,
    )
    cfg["torch_dtype"] = "bfloat16"
    del cfg["image_token_id"]
    assert from_hf(cfg) == preset("nvlm-d-72b")
    assert preset("nvlm-d-72b").tokens_per_tile == 256
    assert preset("nvlm-d-72b").projector.hidden_size == 29568


def test_save_writes_the_released_layout_and_round_trips_bit_identically(nvlm_d_dir, tmp_path):
    model = NVLM.from_pretrained(nvlm_d_dir)
    model.save_pretrained(tmp_path / "out", max_shard_size=20_000)
    tensors, index = _all_tensors(tmp_path / "out")
    original, _ = _all_tensors(nvlm_d_dir)
    assert set(tensors) == set(original) == set(index["weight_map"])
    assert len(set(index["weight_map"].values())) > 1 and index["metadata"]["total_size"] > 0
    # 5 real + 7 dummy heads of 8 channels, as vLLM's NVLM_D and the HF remote code expect
    assert tensors["vision_model.encoder.layers.0.attn.qkv.weight"].shape == (3 * 12 * 8, 40)
    assert tensors["vision_model.encoder.layers.0.attn.proj.weight"].shape == (40, 12 * 8)
    assert tensors["vision_model.encoder.layers.0.attn.q_norm.weight"].shape == (12 * 8,)
    for name, t in original.items():
        if "q_norm" in name or "k_norm" in name:  # dummy norm weights multiply zeros
            assert torch.equal(tensors[name][:40], t[:40])
        else:
            assert torch.equal(tensors[name], t), name
    with safe_open(str(tmp_path / "out" / next(iter(index["weight_map"].values()))), "pt") as f:
        assert f.metadata() == {"format": "pt"}
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["architectures"] == ["NVLM_D"] and cfg["llm_config"]["architectures"] == ["Qwen2ForCausalLM"]
    assert cfg["vision_config"]["num_attention_heads"] == 5
    again = NVLM.from_pretrained(tmp_path / "out")
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert n1 == n2 and torch.equal(p1, p2)


def test_loads_an_unpadded_vit(nvlm_d_dir, tmp_path, reference):
    """A checkpoint with 5 heads and no dummy ones loads to the same model."""
    dst = tmp_path / "unpadded"
    shutil.copytree(nvlm_d_dir, dst)
    for f in dst.glob("*.safetensors"):
        sd = load_file(str(f))
        for name in list(sd):
            t = sd[name]
            if name.endswith("attn.qkv.weight"):
                sd[name] = torch.cat([part[:40] for part in t.split(96)])
            elif name.endswith(("q_norm.weight", "k_norm.weight")):
                sd[name] = t[:40]
            elif name.endswith("attn.proj.weight"):
                sd[name] = t[:, :40].contiguous()
        save_file(sd, str(f), metadata={"format": "pt"})
    ids = torch.tensor([[1, 2] + [IMAGE_TOKEN_ID] * 4 + [3]])
    pixels = torch.randn(1, 3, 56, 56)
    a = NVLM.from_pretrained(dst)(ids, pixel_values=pixels).logits
    b = NVLM.from_pretrained(nvlm_d_dir)(ids, pixel_values=pixels).logits
    assert torch.equal(a, b)


def _edit_shard(path, fn):
    for f in path.glob("*.safetensors"):
        sd = load_file(str(f))
        fn(sd)
        save_file(sd, str(f), metadata={"format": "pt"})


def test_missing_tensor_is_named(nvlm_d_dir, tmp_path):
    dst = shutil.copytree(nvlm_d_dir, tmp_path / "c")
    _edit_shard(dst, lambda sd: sd.pop("language_model.model.layers.1.mlp.up_proj.weight", None))
    with pytest.raises(
        CheckpointError, match=r"missing tensors: language_model\.model\.layers\.1\.mlp\.up_proj\.weight"
    ):
        NVLM.from_pretrained(dst)


def test_misshapen_tensor_is_named(nvlm_d_dir, tmp_path):
    dst = shutil.copytree(nvlm_d_dir, tmp_path / "c")

    def shrink(sd):
        if "mlp1.1.weight" in sd:
            sd["mlp1.1.weight"] = sd["mlp1.1.weight"][:, :100].contiguous()

    _edit_shard(dst, shrink)
    with pytest.raises(CheckpointError, match=r"'mlp1\.1\.weight' has shape \(128, 100\).*\(128, 160\)"):
        NVLM.from_pretrained(dst)


def test_unexpected_tensor_and_missing_shard_are_errors(nvlm_d_dir, tmp_path):
    dst = shutil.copytree(nvlm_d_dir, tmp_path / "c")
    save_file({"extra.weight": torch.zeros(2)}, str(dst / "model-00001-of-00003.safetensors"))
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'extra\.weight'"):
        NVLM.from_pretrained(dst)
    (dst / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model-00002-of-00003\.safetensors: missing"):
        NVLM.from_pretrained(dst)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c.update(architectures=["LlavaForCausalLM"]), "is not NVLM_D"),
        (lambda c: c.pop("vision_config"), "lacks the key 'vision_config'"),
        (lambda c: c["llm_config"].update(architectures=["GPT2LMHeadModel"], model_type="gpt2"), "need Qwen2 or Llama"),
        (lambda c: c["vision_config"].update(num_attention_heads=3), "not divisible by num_heads"),
        (lambda c: c.update(ps_version="v1"), "pixel shuffle v2"),
        (lambda c: c["llm_config"].update(hidden_size="big"), "wrong type|invalid"),
    ],
)
def test_wrong_config_json_is_a_clear_error(nvlm_d_dir, tmp_path, edit, message):
    dst = shutil.copytree(nvlm_d_dir, tmp_path / "c")
    cfg = json.loads((dst / "config.json").read_text())
    edit(cfg)
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=message):
        NVLM.from_pretrained(dst)


def test_unparsable_config_and_no_weights(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        NVLM.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(to_hf(preset("tiny-d"))))
    with pytest.raises(CheckpointError, match=r"no model\.safetensors\.index\.json"):
        NVLM.from_pretrained(tmp_path)


def test_dtype_argument_casts_floats(nvlm_d_dir):
    model = NVLM.from_pretrained(nvlm_d_dir, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    ids = torch.tensor([[1, 2, 3]])
    assert model(ids).logits.dtype == torch.bfloat16


# --- the released files of nvidia/NVLM-D-72B (tests/fixtures/nvlm-d-72b, see its SOURCE.md) ----------------
RELEASED = Path(__file__).parent / "fixtures" / "nvlm-d-72b"


def test_from_hf_on_the_released_config_json():
    cfg = from_json_file(RELEASED / "config.json")
    assert cfg == preset("nvlm-d-72b")
    assert cfg.llm.rope_scaling == {"factor": 3.0, "type": "dynamic"} and not cfg.llm.dynamic_rope


def test_released_index_names_exactly_the_model_tensors():
    """Every tensor name of the 46-shard index is a tensor of the 72B model built on meta, and back."""
    index = json.loads((RELEASED / "model.safetensors.index.json").read_text())
    with torch.device("meta"):
        model = NVLM(from_json_file(RELEASED / "config.json"))
    assert set(index["weight_map"]) == set(model.state_dict())
    assert len(set(index["weight_map"].values())) == 46


def test_checkpoint_chat_template_is_the_released_one(tmp_path):
    """chat_template="checkpoint" renders the released tokenizer_config.json's Jinja template as transformers does."""
    from nvlm.processor import Processor
    from nvlm.tokenizer import build_tiny_tokenizer

    (tmp_path / "config.json").write_text(json.dumps(to_hf(preset("tiny-d"))))
    build_tiny_tokenizer().save(tmp_path)
    shutil.copy(RELEASED / "tokenizer_config.json", tmp_path / "tokenizer_config.json")
    processor = Processor.from_pretrained(tmp_path, chat_template="checkpoint")
    assert (
        processor.tokenizer.chat_template
        == json.loads((RELEASED / "tokenizer_config.json").read_text())["chat_template"]
    )
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Yo"},
        {"role": "user", "content": "Why?"},
    ]
    hf = pytest.importorskip("transformers").AutoTokenizer.from_pretrained(tmp_path)  # the same files
    want = hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert processor.apply_chat_template(msgs, tokenize=False) == want
    no_system = processor.apply_chat_template(msgs[1:2], tokenize=False)
    assert no_system == hf.apply_chat_template(msgs[1:2], tokenize=False, add_generation_prompt=True)
    assert no_system.startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud.")  # the template's default


def test_remote_code_save_pretrained_config_loads(nvlm_d_dir, tmp_path):
    """The released remote code's save_pretrained writes "architectures": ["NVLM_D_Model"] (the class name),
    model_type NVLM_D, llm_config as Qwen2Config.to_dict (model_type qwen2; transformers >= 4.45 adds rope_type)."""
    dst = shutil.copytree(nvlm_d_dir, tmp_path / "saved")
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(architectures=["NVLM_D_Model"], model_type="NVLM_D", use_backbone_lora=0, use_llm_lora=0)
    cfg["llm_config"].update(
        model_type="qwen2", rope_scaling={"factor": 3.0, "type": "dynamic", "rope_type": "dynamic"}
    )
    (dst / "config.json").write_text(json.dumps(cfg))
    ids = torch.tensor([[1, 2] + [IMAGE_TOKEN_ID] * 4 + [3]])
    pixels = torch.randn(1, 3, 56, 56)
    saved = NVLM.from_pretrained(dst)
    assert saved.config.arch == "D"
    assert torch.equal(
        saved(ids, pixel_values=pixels).logits, NVLM.from_pretrained(nvlm_d_dir)(ids, pixel_values=pixels).logits
    )


@pytest.mark.parametrize(
    "name, where",
    [
        ("vision_model.encoder.layers.0.attn.qkv.weight", lambda t: t[40:96]),  # q's dummy rows
        ("vision_model.encoder.layers.1.attn.qkv.weight", lambda t: t[-8:]),  # v's last dummy head
        ("vision_model.encoder.layers.0.attn.proj.weight", lambda t: t[:, 40:]),
    ],
)
def test_non_zero_dummy_heads_are_refused(nvlm_d_dir, tmp_path, name, where):
    dst = shutil.copytree(nvlm_d_dir, tmp_path / "c")

    def touch(sd):
        if name in sd:
            where(sd[name]).fill_(0.01)

    _edit_shard(dst, touch)
    with pytest.raises(CheckpointError, match=rf"{re.escape(name)}: its dummy heads .* are not all zero"):
        NVLM.from_pretrained(dst)
