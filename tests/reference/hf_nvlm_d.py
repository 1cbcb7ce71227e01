"""An independent NVLM-D reference built from transformers' tiny random models.

``Qwen2ForCausalLM`` is the LLM; ``InternVLVisionModel`` (RMSNorm, QK-norm over the whole width, layer
scale, no final norm) is InternViT; the projector is a plain ``nn.Sequential``. ``write_nvlm_d_checkpoint``
writes them in the released NVLM-D-72B layout, by hand: attention padded with 7 dummy heads, shards plus
index, and a ``config.json`` shaped like the released one. ``reference_logits`` runs the HF modules the
way the released ``modeling_nvlm_d.py`` does.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import InternVLVisionConfig, InternVLVisionModel, Qwen2Config, Qwen2ForCausalLM

DUMMY_HEADS = 7


class Reference(nn.Module):
    def __init__(self, vocab_size: int = 512, image_size: int = 56, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.llm = Qwen2ForCausalLM(
            Qwen2Config(
                vocab_size=vocab_size,
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                rope_theta=10000.0,
                rms_norm_eps=1e-6,
                max_position_embeddings=4096,
                tie_word_embeddings=False,
                attn_implementation="eager",
            )
        )
        self.vit = InternVLVisionModel(
            InternVLVisionConfig(
                hidden_size=40,
                num_hidden_layers=2,
                num_attention_heads=5,
                intermediate_size=80,
                image_size=image_size,
                patch_size=14,
                norm_type="rms_norm",
                use_qk_norm=True,
                attention_bias=False,
                layer_scale_init_value=0.1,
                use_absolute_position_embeddings=True,
                use_mean_pooling=True,
                layer_norm_eps=1e-6,
                hidden_act="gelu",
                attn_implementation="eager",
            )
        )
        self.mlp1 = nn.Sequential(
            nn.LayerNorm(160), nn.Linear(160, 128, bias=False), nn.GELU(), nn.Linear(128, 64, bias=False)
        )
        with torch.no_grad():  # HF zero-inits biases, norms and layer scales: make every tensor count
            for name, p in self.named_parameters():
                if name.endswith(
                    (
                        "norm.weight",
                        "layernorm.weight",
                        "_layernorm.weight",
                        "layernorm_before.weight",
                        "layernorm_after.weight",
                        "mlp1.0.weight",
                    )
                ):
                    p.copy_(1 + 0.3 * torch.randn_like(p))
                else:
                    p.copy_(0.15 * torch.randn_like(p))
        self.eval()

    @torch.no_grad()
    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.vit(pixel_values).last_hidden_state[:, 1:]  # (N, P, C)
        n, p, c = x.shape
        side = int(p**0.5)
        x = x.reshape(n, side, side, c)
        # InternVL's pixel shuffle (v2), from transformers, as the independent channel order
        from transformers.models.internvl.modeling_internvl import InternVLModel

        x = InternVLModel.pixel_shuffle(None, x, 0.5).reshape(n, -1, 4 * c)
        return self.mlp1(x)

    @torch.no_grad()
    def logits(
        self,
        input_ids: torch.Tensor,
        image_token_id: int,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        embeds = self.llm.get_input_embeddings()(input_ids).clone()
        if pixel_values is not None:
            feats = self.image_features(pixel_values).reshape(-1, embeds.shape[-1])
            embeds[input_ids == image_token_id] = feats
        kwargs = {}
        if attention_mask is not None:
            kwargs = {"attention_mask": attention_mask, "position_ids": (attention_mask.cumsum(-1) - 1).clamp(min=0)}
        return self.llm(inputs_embeds=embeds, **kwargs).logits

    def nvlm_d_state_dict(self) -> dict[str, torch.Tensor]:
        """The released key names, ViT attention padded with 7 zero heads (layout [q|k|v][32 heads][hd])."""
        out: dict[str, torch.Tensor] = {}
        vit = {k: v.detach().clone() for k, v in self.vit.state_dict().items()}
        hd = 8  # 40 / 5
        zeros_rows = torch.zeros(DUMMY_HEADS * hd, 40)
        out["vision_model.embeddings.class_embedding"] = vit["embeddings.cls_token"]
        out["vision_model.embeddings.patch_embedding.weight"] = vit["embeddings.patch_embeddings.projection.weight"]
        out["vision_model.embeddings.patch_embedding.bias"] = vit["embeddings.patch_embeddings.projection.bias"]
        out["vision_model.embeddings.position_embedding"] = vit["embeddings.position_embeddings"]
        for i in range(2):
            src, dst = f"encoder.layer.{i}.", f"vision_model.encoder.layers.{i}."
            q, k, v = (vit[src + f"attention.{n}_proj.weight"] for n in "qkv")
            out[dst + "attn.qkv.weight"] = torch.cat([q, zeros_rows, k, zeros_rows, v, zeros_rows])
            for n in "qk":
                out[dst + f"attn.{n}_norm.weight"] = torch.cat(
                    [vit[src + f"attention.{n}_norm.weight"], torch.ones(DUMMY_HEADS * hd)]
                )
            out[dst + "attn.proj.weight"] = torch.cat(
                [vit[src + "attention.projection_layer.weight"], torch.zeros(40, DUMMY_HEADS * hd)], 1
            )
            out[dst + "attn.proj.bias"] = vit[src + "attention.projection_layer.bias"]
            out[dst + "ls1"], out[dst + "ls2"] = vit[src + "lambda_1"], vit[src + "lambda_2"]
            for n in ("fc1", "fc2"):
                out[dst + f"mlp.{n}.weight"], out[dst + f"mlp.{n}.bias"] = (
                    vit[src + f"mlp.{n}.weight"],
                    vit[src + f"mlp.{n}.bias"],
                )
            out[dst + "norm1.weight"] = vit[src + "layernorm_before.weight"]
            out[dst + "norm2.weight"] = vit[src + "layernorm_after.weight"]
        for k, v in self.mlp1.state_dict().items():
            out["mlp1." + k] = v.detach().clone()
        for k, v in self.llm.state_dict().items():
            out["language_model." + k] = v.detach().clone()
        return out


def released_config(image_token_id: int, vocab_size: int = 512, image_size: int = 56) -> dict:
    """A config.json shaped like nvidia/NVLM-D-72B's, with tiny dimensions."""
    return {
        "architectures": ["NVLM_D"],
        "model_type": "NVLM_D",
        "auto_map": {
            "AutoConfig": "configuration_nvlm_d.NVLM_D_Config",
            "AutoModel": "modeling_nvlm_d.NVLM_D_Model",
            "AutoModelForCausalLM": "modeling_nvlm_d.NVLM_D_Model",
        },
        "downsample_ratio": 0.5,
        "dynamic_image_size": True,
        "force_image_size": image_size,
        "max_dynamic_patch": 6,
        "min_dynamic_patch": 1,
        "ps_version": "v2",
        "select_layer": -1,
        "template": "chatml",
        "torch_dtype": "float32",
        "use_backbone_lora": 0,
        "use_llm_lora": 0,
        "use_thumbnail": True,
        "image_token_id": image_token_id,
        "llm_config": {
            "_name_or_path": "Qwen/Qwen2-72B-Instruct",
            "architectures": ["Qwen2ForCausalLM"],
            "attention_bias": True,
            "bos_token_id": None,
            "eos_token_id": None,
            "hidden_act": "silu",
            "hidden_size": 64,
            "intermediate_size": 128,
            "max_position_embeddings": 4096,
            "model_type": "llama",
            "num_attention_heads": 4,
            "num_hidden_layers": 2,
            "num_key_value_heads": 2,
            "rms_norm_eps": 1e-6,
            "rope_scaling": {"factor": 3.0, "type": "dynamic"},
            "rope_theta": 10000.0,
            "tie_word_embeddings": False,
            "top_k": 1,
            "top_p": 0,
            "vocab_size": vocab_size,
        },
        "vision_config": {
            "architectures": ["InternVisionModel"],
            "hidden_act": "gelu",
            "hidden_size": 40,
            "image_size": image_size,
            "initializer_factor": 0.1,
            "intermediate_size": 80,
            "layer_norm_eps": 1e-6,
            "model_type": "intern_vit_6b",
            "norm_type": "rms_norm",
            "num_attention_heads": 5,
            "num_channels": 3,
            "num_hidden_layers": 2,
            "patch_size": 14,
            "qk_normalization": True,
            "qkv_bias": False,
            "use_flash_attn": True,
        },
    }


def write_nvlm_d_checkpoint(ref: Reference, path: Path, image_token_id: int, shards: int = 3) -> Path:
    """Shards + index + config.json, as the release lays them out."""
    path.mkdir(parents=True, exist_ok=True)
    state = ref.nvlm_d_state_dict()
    names = list(state)
    per = -(-len(names) // shards)
    weight_map = {}
    for i in range(shards):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        chunk = {k: state[k].contiguous() for k in names[i * per : (i + 1) * per]}
        save_file(chunk, str(path / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(chunk, fname))
    total = sum(t.numel() * t.element_size() for t in state.values())
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    (path / "config.json").write_text(json.dumps(released_config(image_token_id), indent=2))
    return path
