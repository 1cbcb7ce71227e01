import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # tests/reference/* are importable as `reference.*`

from reference.hf_nvlm_d import Reference, write_nvlm_d_checkpoint

from nvlm.hf_config import to_hf

IMAGE_TOKEN_ID = 500  # a tiny vocabulary's image placeholder id, for tests that build input ids by hand

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def reference() -> Reference:
    return Reference()


@pytest.fixture(scope="session")
def nvlm_d_dir(reference: Reference, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny NVLM-D checkpoint in the released layout (padded ViT heads, 3 shards, index)."""
    return write_nvlm_d_checkpoint(reference, tmp_path_factory.mktemp("nvlm-d"), IMAGE_TOKEN_ID)


@pytest.fixture(scope="session")
def tiny_model_dir(nvlm_d_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference checkpoint plus the tiny tokenizer: a directory that stands alone."""
    import shutil

    from nvlm.tokenizer import build_tiny_tokenizer

    path = tmp_path_factory.mktemp("tiny-nvlm-d") / "model"
    shutil.copytree(nvlm_d_dir, path)
    tok = build_tiny_tokenizer()
    assert tok.token_to_id("<|vision_pad|>") == IMAGE_TOKEN_ID
    tok.save(path)
    return path


@pytest.fixture(scope="module")
def tiny_d_config_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with the tiny-d preset's config.json and the tiny tokenizer, no weights: enough for a Processor."""
    import json

    from nvlm.presets import preset
    from nvlm.tokenizer import build_tiny_tokenizer

    d = tmp_path_factory.mktemp("tiny-d")
    (d / "config.json").write_text(json.dumps(to_hf(preset("tiny-d"))))
    build_tiny_tokenizer().save(d)
    return d


def open_gates(model) -> None:
    """Open an NVLM-X/H model's cross-attention gates (closed at 0 they leave the text LLM unchanged)."""
    with torch.no_grad():
        for block in model.xattn_layers:
            block.attn_gate.fill_(0.8)
            block.ffn_gate.fill_(-0.6)
