"""Megatron-Core interop (nvlm.mcore): the converted model against Megatron's own way of computing from its rank
tensors, the writer's files against the same forward, bit-identical round trips, and the refusals."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from mcore_fixtures import megatron_logits, megatron_tensors, read_megatron, save_megatron, tiny_config, write_megatron
from PIL import Image

from nvlm.checkpoint import CheckpointError, iter_checkpoint
from nvlm.cli import main
from nvlm.hf_config import to_hf
from nvlm.mcore import convert_to_hf, convert_to_mcore
from nvlm.pretrained import NVLM
from nvlm.processor import Processor
from nvlm.template import MEGATRON_TEMPLATE
from nvlm.tokenizer import Tokenizer, build_tiny_tokenizer

CFG = tiny_config()
TOL = 1e-5


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("tok")
    build_tiny_tokenizer().save(d)
    return d


@pytest.fixture(scope="module")
def cfg_json(tmp_path_factory: pytest.TempPathFactory) -> Path:
    f = tmp_path_factory.mktemp("cfg") / "config.json"
    f.write_text(json.dumps(to_hf(CFG)))
    return f


@pytest.fixture(scope="module")
def mcore_tp2(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("mcore-tp2")
    return root, write_megatron(root, CFG, tp=2, pp=1, seed=3)


def _inputs(image_token_id: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Text ids, the same with two 2-crop images' worth of image tokens, and those crops."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 480, (2, 24), generator=g)
    with_images = ids.clone()
    with_images[:, 3:11] = image_token_id  # 2 crops x 4 tokens per row
    return ids, with_images, torch.randn(4, 3, 56, 56, generator=g)


def _assert_matches(model: NVLM, ranks: dict, tp: int, pp: int) -> None:
    ids, with_images, pixels = _inputs(model.config.image_token_id)
    with torch.no_grad():
        text = model(ids).logits
        image = model(with_images, pixels).logits
    torch.testing.assert_close(text, megatron_logits(ranks, tp, pp, CFG, ids), atol=TOL, rtol=0)
    ref = megatron_logits(ranks, tp, pp, CFG, with_images, pixels, model.config.image_token_id)
    torch.testing.assert_close(image, ref, atol=TOL, rtol=0)
    assert (image - model(with_images, torch.zeros_like(pixels)).logits).abs().max() > 1e-3  # the images matter


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return dict(iter_checkpoint(path))


# ------------------------------------------------------------------------------------------ reading


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("pp", [1, 2])
def test_converted_logits_equal_megatrons_forward(tmp_path: Path, tok_dir: Path, tp: int, pp: int) -> None:
    """Every TP x PP layout, TE 1.x and 2.x extra states, iter_* and release, stale PP in the split files' args."""
    ranks = write_megatron(
        tmp_path, CFG, tp, pp, seed=tp + 10 * pp, te_major=2 if tp == 2 else 1, release=tp == 4, stale_pp_args=pp == 2
    )
    model = NVLM.from_pretrained(tmp_path, tokenizer=tok_dir, config=CFG)
    assert model.config.projector.norm_eps == 1e-6  # Megatron's --norm-epsilon, not nn.LayerNorm's 1e-5
    _assert_matches(model, ranks, tp, pp)


def test_convert_writes_a_standalone_hf_directory(tmp_path: Path, tok_dir: Path, cfg_json: Path, mcore_tp2) -> None:
    src, ranks = mcore_tp2
    dst = tmp_path / "hf"
    assert main(["convert", str(src), str(dst), "--tokenizer", str(tok_dir), "--config", str(cfg_json)]) == 0
    model = NVLM.from_pretrained(dst)
    _assert_matches(model, ranks, 2, 1)
    hf = json.loads((dst / "config.json").read_text())
    assert hf["llm_config"]["rope_scaling"] is None and hf["projector_config"]["norm_eps"] == 1e-6
    stored = _tensors(dst)
    assert stored["vision_model.encoder.layers.0.attn.qkv.weight"].shape == (3 * 12 * 8, 40)  # released padding
    assert (
        "language_model.model.embed_tokens.weight" in stored and stored["language_model.lm_head.weight"].shape[0] == 512
    )
    tok = Tokenizer.from_pretrained(dst)
    assert tok.chat_template == MEGATRON_TEMPLATE
    # Tile tags are tokenized on their own, as Megatron's MultimodalTokenizer did; the HF string would merge "><".
    original = build_tiny_tokenizer()
    assert tok.encode("<Image><tile_1>") == original.encode("<Image>") + original.encode("<tile_1>")
    assert original.encode("<Image><tile_1>") != tok.encode("<Image><tile_1>")
    processor = Processor.from_pretrained(dst)  # nvlm chat / serve / eval: Megatron's prompt format by default
    question = [{"role": "user", "content": "What is this?"}]
    assert processor.render(question).text == processor.render(question, chat_template=MEGATRON_TEMPLATE).text
    assert processor.render(question).text != Processor.from_pretrained(dst, chat_template="nvlm").render(question).text
    inputs = processor("<image>\nWhat is this?", [Image.new("RGB", (56, 56), "red")])
    assert (inputs["input_ids"] == model.config.image_token_id).sum() == 4 and model(**inputs).logits.shape[-1] == 512


def test_qwen2_tokenizer_gets_the_image_token(tmp_path: Path, mcore_tp2) -> None:
    """A Qwen2-72B-Instruct-like tokenizer (3 added tokens, no <|vision_pad|>): the image token takes the next id."""
    data = json.loads(build_tiny_tokenizer().backend.to_str())
    data["added_tokens"] = [a for a in data["added_tokens"] if a["id"] < 492]
    qwen2 = tmp_path / "qwen2"
    qwen2.mkdir()
    (qwen2 / "tokenizer.json").write_text(json.dumps(data))
    (qwen2 / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}))
    cfg = convert_to_hf(mcore_tp2[0], tmp_path / "hf", qwen2, CFG)
    assert cfg.image_token_id == 492
    assert Tokenizer.from_pretrained(tmp_path / "hf").token_to_id("<|vision_pad|>") == 492
    assert NVLM.from_pretrained(tmp_path / "hf").config.image_token_id == 492


# ------------------------------------------------------------------------------------------ writing


def _our_model(seed: int = 0) -> NVLM:
    torch.manual_seed(seed)
    model = NVLM(CFG)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def test_written_rank_files_run_as_megatron(tmp_path: Path) -> None:
    model = _our_model()
    model.save_pretrained(tmp_path / "ours")
    it_dir = convert_to_mcore(tmp_path / "ours", tmp_path / "mcore", tp=2, pp=2, iteration=7)
    assert (tmp_path / "mcore" / "latest_checkpointed_iteration.txt").read_text().strip() == "7"
    ranks, tp, pp = read_megatron(it_dir)  # weights_only torch.load with argparse.Namespace only
    assert (tp, pp) == (2, 2)
    ids, with_images, pixels = _inputs(model.config.image_token_id)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, megatron_logits(ranks, 2, 2, CFG, ids), atol=TOL, rtol=0)
        ref = megatron_logits(ranks, 2, 2, CFG, with_images, pixels, model.config.image_token_id)
        torch.testing.assert_close(model(with_images, pixels).logits, ref, atol=TOL, rtol=0)
    first, last = ranks[(1, 0)], ranks[(1, 1)]
    assert "language_model.decoder.layers.1.self_attention.core_attention._extra_state" in first
    assert first["vision_model.decoder.layers.0.mlp.linear_fc1._extra_state"] is None
    assert (
        "language_model.output_layer._extra_state" in last
        and "language_model.decoder.layers.2.mlp.linear_fc2.weight" not in last
    )
    with torch.serialization.safe_globals([__import__("argparse").Namespace]):
        state = torch.load(it_dir / "mp_rank_00_000" / "model_optim_rng.pt", weights_only=True)
    args = state["args"]
    assert (state["checkpoint_version"], args.tensor_model_parallel_size, args.pipeline_model_parallel_size) == (
        3.0,
        2,
        2,
    )
    assert (args.num_layers, args.num_query_groups, args.padded_vocab_size) == (4, 4, 512)


def test_round_trip_ours_mcore_ours_is_bit_identical(tmp_path: Path, tok_dir: Path) -> None:
    _our_model(1).save_pretrained(tmp_path / "ours")
    convert_to_mcore(tmp_path / "ours", tmp_path / "mcore", tp=4, pp=2)
    convert_to_hf(tmp_path / "mcore", tmp_path / "back", tok_dir, tmp_path / "ours" / "config.json")
    before, after = _tensors(tmp_path / "ours"), _tensors(tmp_path / "back")
    assert before.keys() == after.keys()
    for name, t in before.items():
        assert torch.equal(t, after[name]), name


def test_mcore_tp2_to_ours_to_tp4_to_ours_is_bit_identical(tmp_path: Path, tok_dir: Path, mcore_tp2) -> None:
    convert_to_hf(mcore_tp2[0], tmp_path / "a", tok_dir, CFG)
    assert main(["convert", str(tmp_path / "a"), str(tmp_path / "tp4"), "--tp", "4"]) == 0
    convert_to_hf(tmp_path / "tp4", tmp_path / "b", tok_dir, CFG)
    a, b = _tensors(tmp_path / "a"), _tensors(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    tp4 = read_megatron(tmp_path / "tp4" / "release")[0]
    assert tp4[(3, 0)]["language_model.decoder.layers.0.mlp.linear_fc1.weight"].shape == (2 * 128 // 4, 64)


# ------------------------------------------------------------------------------------------ refusals


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_pickle_that_would_run_code_is_refused(tmp_path: Path, tok_dir: Path, capsys) -> None:
    marker = tmp_path / "pwned"
    write_megatron(tmp_path / "ck", CFG, tp=2, pp=1)
    rank = tmp_path / "ck" / "iter_0031500" / "mp_rank_01" / "model_optim_rng.pt"
    state = {"args": _Evil(marker), "checkpoint_version": 3.0, "model": {}}
    torch.save(state, rank)
    with pytest.raises(CheckpointError, match=r"mp_rank_01.*refused to unpickle the global posix\.system"):
        convert_to_hf(tmp_path / "ck", tmp_path / "out", tok_dir, CFG)
    assert main(["convert", str(tmp_path / "ck"), str(tmp_path / "out"), "--tokenizer", str(tok_dir)]) == 2
    err = capsys.readouterr().err
    assert "posix.system" in err and len(err.strip().splitlines()) == 1
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_truncated_rank_file(tmp_path: Path, tok_dir: Path) -> None:
    write_megatron(tmp_path, CFG, tp=2, pp=1)
    rank = tmp_path / "iter_0031500" / "mp_rank_01" / "model_optim_rng.pt"
    data = rank.read_bytes()
    rank.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"mp_rank_01/model_optim_rng.pt: truncated"):
        NVLM.from_pretrained(tmp_path, tokenizer=tok_dir, config=CFG)


def _broken(root: Path, kind: str) -> None:
    ranks = megatron_tensors(CFG, 2, 2, vit_heads=12, vocab_rows=576)
    qkv = "language_model.decoder.layers.1.self_attention.linear_qkv.weight"
    if kind == "unknown":
        for t in range(2):
            ranks[(t, 1)]["language_model.decoder.layers.0.mlp.router.weight"] = torch.zeros(4, 64)
    elif kind == "missing":
        for t in range(2):
            del ranks[(t, 1)][qkv]
    elif kind == "one rank lacks it":
        del ranks[(1, 1)][qkv]
    elif kind == "shape":
        ranks[(1, 1)][qkv] = ranks[(1, 1)][qkv][:-8].clone()
    save_megatron(root, ranks, CFG, 2, 2, 576)
    if kind == "rank dir":
        shutil.rmtree(root / "iter_0031500" / "mp_rank_01_001")
    if kind == "other TP":  # a rank file of a TP 4 checkpoint in place of rank 1
        other = root.parent / "tp4"
        write_megatron(other, CFG, 4, 2)
        shutil.copy(
            other / "iter_0031500" / "mp_rank_01_001" / "model_optim_rng.pt",
            root / "iter_0031500" / "mp_rank_01_001" / "model_optim_rng.pt",
        )


@pytest.mark.parametrize(
    "kind, message",
    [
        (
            "unknown",
            r"mp_rank_00_001/model_optim_rng.pt: unknown tensor 'language_model.decoder.layers.0.mlp.router.weight'",
        ),
        (
            "missing",
            r"mp_rank_00_001/model_optim_rng.pt: missing tensor "
            r"'language_model.decoder.layers.1.self_attention.linear_qkv.weight'",
        ),
        (
            "one rank lacks it",
            r"mp_rank_01_001/model_optim_rng.pt: tensor 'language_model.decoder.layers.1.self_attention",
        ),
        (
            "shape",
            r"mp_rank_01_001/model_optim_rng.pt: tensor 'language_model.decoder.layers.1.self_attention.linear_qkv."
            r"weight' has shape \(56, 64\), expected \(64, 64\)",
        ),
        ("rank dir", r"mp_rank_01_001 is missing from the 2 x 2"),
        ("other TP", r"mp_rank_01_001/model_optim_rng.pt: args say TP 4, the directory holds 2 TP ranks"),
    ],
)
def test_bad_file_sets_name_the_tensor_and_file(tmp_path: Path, tok_dir: Path, kind: str, message: str) -> None:
    _broken(tmp_path / "ck", kind)
    with pytest.raises(CheckpointError, match=message):
        convert_to_hf(tmp_path / "ck", tmp_path / "out", tok_dir, CFG)
    assert not (tmp_path / "out").exists()


def test_layouts_found(tmp_path: Path, tok_dir: Path, mcore_tp2) -> None:
    """A Hugging Face download (checkpoints/ under the root) and a bare iteration directory both load; two
    iterations and no tracker is an error."""
    download = tmp_path / "NVLM-D-72B-mcore"
    shutil.copytree(mcore_tp2[0], download / "checkpoints")
    a = NVLM.from_pretrained(download, tokenizer=tok_dir, config=CFG).state_dict()
    b = NVLM.from_pretrained(mcore_tp2[0] / "iter_0031500", tokenizer=tok_dir, config=CFG).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    shutil.copytree(download / "checkpoints" / "iter_0031500", download / "checkpoints" / "iter_0000100")
    (download / "checkpoints" / "latest_checkpointed_iteration.txt").unlink()
    with pytest.raises(CheckpointError, match=r"no latest_checkpointed_iteration\.txt, and 2 iteration directories"):
        NVLM.from_pretrained(download, tokenizer=tok_dir, config=CFG)


def test_nonzero_dummy_heads_are_reported(tmp_path: Path, tok_dir: Path) -> None:
    ranks = megatron_tensors(CFG, 2, 1, vit_heads=12, vocab_rows=576)
    ranks[(1, 0)]["vision_model.decoder.layers.1.self_attention.linear_qkv.weight"][-1] = 1.0  # head 11: a dummy
    save_megatron(tmp_path, ranks, CFG, 2, 1, 576)
    with pytest.warns(UserWarning, match="dummy heads 5..11 are not all zero"):
        NVLM.from_pretrained(tmp_path, tokenizer=tok_dir, config=CFG)
