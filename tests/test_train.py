"""The training loop: it learns, packing changes nothing, stages train exactly their modules, kill -9 resumes."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from train_data import COLORS, write_colors

from nvlm import NVLM, Processor
from nvlm.data.labels import IGNORE, encode_example
from nvlm.data.packing import collate
from nvlm.data.records import to_messages
from nvlm.hf_config import from_hf
from nvlm.presets import preset
from nvlm.pretrained import load_parts
from nvlm.train.config import TrainConfig
from nvlm.train.loop import train
from nvlm.train.stages import set_trainable

PY = sys.executable


def _cfg(init, data, out, **kw) -> TrainConfig:
    base = dict(
        init=str(init),
        stage=2,
        data=[{"path": str(data / "train.jsonl"), "weight": 3}, {"path": str(data / "text.jsonl"), "weight": 1}],
        seq_len=256,
        micro_batch_size=2,
        steps=60,
        lr=3e-3,
        min_lr=3e-4,
        warmup_steps=5,
        max_tiles=1,
        out_dir=str(out),
        save_every=1000,
        log_every=1000,
        device="cpu",
    )
    return TrainConfig(**{**base, **kw})


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("arch", "DX")
def test_a_tiny_model_learns_its_training_questions(arch, tiny_model_dir, tmp_path):
    data = write_colors(tmp_path / "data")
    final = train(_cfg(tiny_model_dir, data, tmp_path / "run", arch=arch, steps=50))
    losses = _losses(tmp_path / "run")
    assert losses[-1] < 0.1 * losses[0]
    model, processor = NVLM.from_pretrained(final), Processor.from_pretrained(final)
    assert model.config.arch == arch
    for name in COLORS:
        conv = [
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": str(data / "images" / f"{name}.png")},
                    {"type": "text", "text": "Color?"},
                ],
            }
        ]
        out = model.generate(
            **processor.apply_chat_template(conv), max_new_tokens=4, eos_token_id=processor.eos_token_ids
        )
        assert processor.decode(out[0]).strip() == name


def test_a_stage_can_train_without_tile_tags_and_keep_them_in_the_model(tiny_model_dir, tmp_path):
    """Megatron's pretraining omits ``--use-tile-tags``: the data loses its tags, the saved model keeps them."""
    data = write_colors(tmp_path / "data", wide=True)
    tokens = {}
    for tags in (True, False):
        run = tmp_path / f"tags-{tags}"
        final = train(_cfg(tiny_model_dir, data, run, steps=2, max_tiles=4, pack=False, seed=1, tile_tags=tags))
        tokens[tags] = [json.loads(line)["tokens"] for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert NVLM.from_pretrained(final).config.tile_tag == "<tile_{}>"
    assert all(a > b for a, b in zip(tokens[True], tokens[False], strict=True)), tokens


@pytest.mark.parametrize("arch", "DXH")
def test_packed_and_unpacked_losses_are_equal(arch, tiny_model_dir, tmp_path):
    data = write_colors(tmp_path, wide=True)
    model = NVLM.from_pretrained(tiny_model_dir, arch=arch)
    if arch != "D":
        with torch.no_grad():
            for block in model.xattn_layers:
                block.attn_gate.fill_(0.7)
                block.ffn_gate.fill_(0.5)
    processor = Processor.from_pretrained(tiny_model_dir)
    processor = Processor(processor.tokenizer, processor.image_processor, model.config)
    lines = (data / "train.jsonl").read_text().splitlines() + (data / "text.jsonl").read_text().splitlines()
    examples = [encode_example(processor, to_messages(json.loads(x), data), 512) for x in lines]

    def loss(batch):
        targets = batch.pop("targets")
        logits = model(**batch).logits
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum")

    packed = collate(processor, [examples[:3], examples[3:6], examples[6:]], seq_len=256)
    assert int(packed["attention_mask"].max()) == 3
    assert int(packed["attention_mask"].amax(1).sum()) == len(examples)  # the loop's count of samples a step
    unpacked = collate(processor, [[e] for e in examples])
    torch.testing.assert_close(loss(packed), loss(unpacked), atol=1e-4, rtol=1e-5)
    # what the trainer computes: logits at the supervised positions only, the same values and gradients
    packed = collate(processor, [examples[:3], examples[3:6], examples[6:]], seq_len=256)
    targets = packed.pop("targets")
    at = targets != IGNORE
    assert 0 < int(at.sum()) < at.numel() // 4
    some, full = model(**packed, logits_at=at).logits, model(**packed).logits
    torch.testing.assert_close(some, full[at])
    weight = model.mlp1[1].weight
    (grad,) = torch.autograd.grad(F.cross_entropy(some, targets[at]), weight)
    (reference,) = torch.autograd.grad(
        F.cross_entropy(full.flatten(0, 1), targets.flatten(), ignore_index=IGNORE), weight
    )
    torch.testing.assert_close(grad, reference)


EXPECTED = {
    ("D", 1): {"mlp1"},
    ("X", 1): {"mlp1", "xattn_layers"},
    ("H", 1): {"mlp1", "xattn_layers"},
    ("D", 2): {"mlp1", "language_model"},
    ("X", 2): {"mlp1", "xattn_layers", "language_model"},
    ("H", 2): {"mlp1", "xattn_layers", "language_model"},
}


@pytest.mark.parametrize("arch,stage", list(EXPECTED))
def test_stage_presets_train_exactly_tables_10_and_11(arch, stage):
    from PIL import Image

    from nvlm.image import ImageProcessor
    from nvlm.tokenizer import build_tiny_tokenizer

    model = NVLM(preset(f"tiny-{arch.lower()}"))
    with torch.no_grad():
        for block in getattr(model, "xattn_layers", []):
            block.attn_gate.fill_(0.5)
            block.ffn_gate.fill_(0.5)
    set_trainable(model, stage)
    processor = Processor(build_tiny_tokenizer(), ImageProcessor(tile_size=56), model.config)
    conv = [
        {
            "role": "user",
            "content": [{"type": "image", "image": Image.new("RGB", (112, 56))}, {"type": "text", "text": "hi"}],
        }
    ]
    model(**processor.apply_chat_template(conv)).logits.sum().backward()
    with_grad = {n.split(".")[0] for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad == EXPECTED[(arch, stage)]
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert all(model.get_parameter(n).grad is None for n in frozen)
    assert all(n.startswith(("vision_model.", "language_model.")) for n in frozen)


def test_a_recipe_can_name_what_trains_instead_of_the_stage():
    model = NVLM(preset("tiny-d"))
    names = set_trainable(model, 1, ["vision_model.", "mlp1."])
    assert names and all(n.startswith(("vision_model.", "mlp1.")) for n in names)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(names)
    with pytest.raises(ValueError, match="nothing would train"):
        set_trainable(model, 1, ["vision."])


def test_training_from_random_weights_draws_the_llm_as_transformers_does():
    """initializer_range 0.02 for every linear and embedding weight (PyTorch's embeddings have std 1)."""
    import tempfile

    from nvlm.tokenizer import build_tiny_tokenizer
    from nvlm.train.config import TrainConfig
    from nvlm.train.loop import build

    with tempfile.TemporaryDirectory() as tok:
        build_tiny_tokenizer().save(tok)
        model, _, _ = build(
            TrainConfig(preset="demo-d", tokenizer=tok, data=[{"path": "x.jsonl"}]), torch.device("cpu"), 1
        )
    llm = model.language_model
    for w in (llm.model.embed_tokens.weight, llm.lm_head.weight, llm.model.layers[0].self_attn.q_proj.weight):
        assert abs(float(w.detach().std()) - 0.02) < 0.002
    assert model.config.llm.eos_token_id == 491 and model.config.image_token_id == 500


def test_recipes_load_with_overrides_and_paper_defaults():
    root = Path(__file__).parent.parent / "recipes"
    for recipe in root.glob("*.yaml"):
        cfg = TrainConfig.load(recipe, ["--steps", "7", "--lr=2e-4", "--data", "x.jsonl"])
        assert cfg.steps == 7 and cfg.lr == 2e-4 and cfg.data == [{"path": "x.jsonl"}]
    cfg = TrainConfig.load(root / "nvlm-x-72b-sft.yaml").resolve("X")
    assert (cfg.lr, cfg.min_lr, cfg.betas, cfg.weight_decay, cfg.grad_clip, cfg.seq_len) == (
        1e-5,
        1e-7,
        (0.9, 0.98),
        0.05,
        1.0,
        1024,
    )
    cfg = TrainConfig(stage=1, data=[{"path": "x"}]).resolve("H")
    assert (cfg.max_tiles, cfg.warmup_steps, cfg.betas) == (6, 1000, (0.9, 0.98))
    with pytest.raises(ValueError, match="unknown"):
        TrainConfig.load(None, ["--learning_rate", "1"])


def test_paths_and_names_are_taken_as_written(tmp_path):
    # `--init 300` once reached Path(300) and died in a TypeError: a directory may be named by digits.
    cfg = TrainConfig.load(None, ["--init", "300", "--out_dir", "2024", "--tokenizer", "1e-3", "--data", "x.jsonl"])
    assert (cfg.init, cfg.out_dir, cfg.tokenizer) == ("300", "2024", "1e-3")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("init: 300\nout_dir: 2024\ndata: x.jsonl\n")
    assert (TrainConfig.load(recipe).init, TrainConfig.load(recipe).out_dir) == ("300", "2024")
    recipe.write_text("init: [1, 2]\ndata: x.jsonl\n")
    with pytest.raises(ValueError, match="init: a path or a name"):
        TrainConfig.load(recipe)


def test_kill_9_then_resume_follows_the_uninterrupted_curve(tiny_model_dir, tmp_path):
    data = write_colors(tmp_path / "data")
    args = [
        "--init",
        str(tiny_model_dir),
        "--stage",
        "2",
        "--data",
        json.dumps([{"path": str(data / "train.jsonl"), "weight": 3}, {"path": str(data / "text.jsonl")}]),
        "--seq_len",
        "256",
        "--micro_batch_size",
        "2",
        "--grad_accum",
        "2",
        "--steps",
        "120",
        "--lr",
        "3e-3",
        "--min_lr",
        "3e-4",
        "--warmup_steps",
        "5",
        "--max_tiles",
        "1",
        "--save_every",
        "5",
        "--keep_last",
        "2",
        "--log_every",
        "1000",
        "--device",
        "cpu",
    ]
    cmd = [PY, "-m", "nvlm.cli", "train"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
    subprocess.run([*cmd, *args, "--out_dir", str(tmp_path / "straight")], check=True, env=env, capture_output=True)
    run = tmp_path / "killed"
    proc = subprocess.Popen(
        [*cmd, *args, "--out_dir", str(run)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 120
    while not list((run / "checkpoints").glob("step_00000015")) and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert done and len(_losses(run)) < 120, "the run finished before it could be killed"
    subprocess.run([*cmd, *args, "--out_dir", str(run)], check=True, env=env, capture_output=True)
    assert _losses(run) == _losses(tmp_path / "straight")
    assert len(list((run / "checkpoints").glob("step_*"))) == 2  # keep_last


def test_start_from_a_vit_and_an_llm_checkpoint(reference, tmp_path):
    from safetensors.torch import save_file

    sd = reference.nvlm_d_state_dict()
    save_file(
        {k.removeprefix("vision_model."): v.contiguous() for k, v in sd.items() if k.startswith("vision_model.")},
        str(tmp_path / "vit.safetensors"),
    )
    reference.llm.save_pretrained(tmp_path / "llm")
    (tmp_path / "vit").mkdir()
    (tmp_path / "vit.safetensors").rename(tmp_path / "vit" / "model.safetensors")
    from reference.hf_nvlm_d import released_config

    for arch in "DXH":
        cfg = from_hf(released_config(500)).with_arch(arch)
        model = load_parts(cfg, tmp_path / "vit", tmp_path / "llm")
        ours = model.state_dict()
        for k, v in sd.items():
            if k.startswith("language_model."):
                assert torch.equal(ours[k], v), k
        assert torch.equal(
            ours["vision_model.embeddings.patch_embedding.weight"], sd["vision_model.embeddings.patch_embedding.weight"]
        )
        if arch != "D":
            assert all(b.attn_gate.item() == 0 for b in model.xattn_layers)


def test_activation_checkpointing_keeps_loss_and_gradients(tiny_model_dir):
    """NVLM-X with images in its cross-attention memory (gates open, so the blocks shape the output): the same
    loss and gradients with activation checkpointing, the cross-attention blocks' own gradients included."""
    from conftest import open_gates

    from nvlm.train.distributed import apply_activation_checkpointing

    torch.manual_seed(0)
    ids = torch.randint(0, 400, (2, 16))
    memory = {
        "memory_pixel_values": torch.randn(3, 3, 56, 56),
        "memory_crops": torch.tensor([1, 2]),
        "cross_attention_mask": torch.ones(2, 16, 2, dtype=torch.bool),
    }
    memory["cross_attention_mask"][0, :, 1] = False  # row 0 has one crop
    grads, losses = [], []
    for recompute in (False, True):
        torch.manual_seed(1)  # the fresh cross-attention blocks of the conversion: the same in both runs
        model = NVLM.from_pretrained(tiny_model_dir, arch="X").train()
        open_gates(model)
        set_trainable(model, 2)
        if recompute:
            apply_activation_checkpointing(model)
        loss = model(ids, **memory).logits.square().mean()
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    xattn = [n for n in grads[0] if n.startswith("xattn_layers.") and grads[0][n].abs().sum() > 0]
    assert any(".attn." in n or "q_proj" in n for n in xattn), "no cross-attention block saw the images"
    torch.testing.assert_close(losses[0], losses[1])
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n])
