"""``nvlm train --plan``: parameter and optimiser bytes by hand, frozen vs trained, sharding, the smallest
fit, activations against what autograd really saves, the CLI (config.json only), and a measured CPU peak."""

import contextlib
import itertools
import json
import os
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.nn.attention import SDPBackend, sdpa_kernel

from nvlm import NVLM
from nvlm.cli import main
from nvlm.data.labels import IGNORE, encode_example
from nvlm.data.packing import collate
from nvlm.hf_config import to_hf
from nvlm.image import ImageProcessor
from nvlm.presets import preset
from nvlm.processor import Processor
from nvlm.tokenizer import build_tiny_tokenizer
from nvlm.train.config import TrainConfig
from nvlm.train.plan import CPU, GPU, count_activations, meta_model, plan, resolved, smallest_fit
from nvlm.train.stages import set_trainable

ROOT = Path(__file__).parent.parent
BENCHMARKS, RECIPES = ROOT / "benchmarks", ROOT / "recipes"


def _tiny_counts() -> tuple[int, int, int]:
    """(ViT, projector, LLM) parameter counts of the tiny preset, by hand from its dimensions."""
    vit_layer = 40 + 40 * 120 + 40 + 40 + (40 * 40 + 40) + 40 + 40 + (40 * 80 + 80) + (80 * 40 + 40) + 40
    vit = 40 + (3 * 14 * 14 * 40 + 40) + 17 * 40 + 2 * vit_layer  # class token, patch conv, positions, layers
    projector = 2 * 160 + 160 * 128 + 128 * 64  # LayerNorm, two linears
    llm_layer = 2 * 64 + (64 * 64 + 64) + 2 * (64 * 32 + 32) + 64 * 64 + 3 * 64 * 128
    llm = 512 * 64 + 2 * llm_layer + 64 + 64 * 512  # embeddings, layers, norm, lm_head
    return vit, projector, llm


def test_parameter_gradient_and_optimizer_bytes_equal_a_hand_count():
    vit, projector, llm = _tiny_counts()
    total = vit + projector + llm
    cfg = preset("tiny-d")
    one = plan(cfg, TrainConfig(stage=1), devices=1, device_gib=80, cpu=True)  # stage 1 trains mlp1
    assert (one.params_total, one.params_trained) == (total, projector)
    assert one.parameters == 4 * total and one.gradients == 4 * projector and one.optimizer == 8 * projector
    gpu = plan(cfg, TrainConfig(stage=2), devices=1, device_gib=80)  # stage 2: all but the ViT
    assert gpu.params_trained == projector + llm
    assert gpu.parameters == 4 * (projector + llm) + 2 * vit  # fp32 masters, the frozen ViT in bf16
    assert gpu.gradients == 4 * (projector + llm) and gpu.optimizer == 8 * (projector + llm)
    assert plan(cfg, TrainConfig(stage=2), devices=1, device_gib=80, cpu=True).transients == 0  # runs unsharded
    # two gloo ranks: the root (the ViT's class token, patch conv and positions: frozen) unsharded, then the widest
    # unit (a decoder layer, the projector, the embeddings, or the final norm with lm_head) gathered twice
    # (computed + prefetched) with its whole gradient, 2 x 4 B per trained element
    root_frozen = 40 + (3 * 14 * 14 * 40 + 40) + 17 * 40
    widest = max((llm - 2 * 512 * 64 - 64) // 2, projector, 512 * 64, 64 + 64 * 512)
    two = plan(cfg, TrainConfig(stage=2), devices=2, device_gib=80, cpu=True)
    assert two.transients == 4 * root_frozen + 2 * widest * 4 + 8 * widest


def test_frozen_parameters_get_no_gradient_or_optimizer_state():
    cfg = preset("nvlm-d-72b")
    s1, s2 = (plan(cfg, TrainConfig(stage=s), devices=8, device_gib=80) for s in (1, 2))
    assert s1.params_total == s2.params_total
    trained_more = (s2.params_trained - s1.params_trained) / 8  # the LLM, per device
    assert s2.parameters - s1.parameters == pytest.approx(2 * trained_more, rel=1e-3)  # bf16 -> fp32
    assert s2.optimizer - s1.optimizer == pytest.approx(8 * trained_more, rel=1e-3)
    only_norm = plan(preset("tiny-d"), TrainConfig(stage=1, trainable=["mlp1.0."]), devices=1, device_gib=80, cpu=True)
    assert only_norm.params_trained == 2 * 160 and only_norm.optimizer == 8 * 320 and only_norm.gradients == 4 * 320


def test_more_devices_need_less_memory_each_and_hsdp_shards_within_a_node():
    cfg, train = preset("nvlm-x-72b"), TrainConfig.load(RECIPES / "nvlm-x-72b-sft.yaml", ["--init", "null"])
    plans = [plan(cfg, train, n, 80) for n in (8, 16, 32, 64)]
    for a, b in itertools.pairwise(plans):
        assert b.parameters < a.parameters and b.optimizer < a.optimizer and b.total < a.total
        assert b.optimizer == pytest.approx(a.optimizer / 2, rel=1e-3)
        assert b.activations == a.activations  # per-device micro-batch: unchanged
    hsdp = plan(cfg, train, 32, 80, devices_per_node=8, hsdp=True)
    assert hsdp.shard_group == 8 and hsdp.parameters == plans[0].parameters


def test_smallest_fit_is_the_least_device_count_that_fits():
    cfg, train = preset("nvlm-d-72b"), TrainConfig.load(RECIPES / "nvlm-d-72b-sft.yaml", ["--init", "null"])
    fit = smallest_fit(cfg, train, 80)
    assert fit is not None and fit.fits and fit.devices % 8 == 0 and fit.devices > 8  # whole nodes
    assert not plan(cfg, train, fit.devices - 8, 80).fits
    small = smallest_fit(preset("tiny-d"), TrainConfig(stage=2), 1)
    assert small is not None and small.devices == 1
    assert smallest_fit(cfg, train, 80, hsdp=True) is None  # one node's shards cannot hold the 72B SFT state
    no_ac = replace(train, activation_checkpointing=False)
    assert smallest_fit(cfg, no_ac, 80) is None  # ~100 GiB of activations per device: no device count helps


SMALL = dict(hidden_size=96, intermediate_size=200, num_heads=4, num_kv_heads=2, num_layers=3)


@pytest.mark.parametrize("kind", ["fp32", "bf16", "bf16-math"])
@pytest.mark.parametrize("arch,stage", [(a, s) for a in "DXH" for s in (1, 2)])
def test_activation_count_matches_what_autograd_saves(arch, stage, kind, monkeypatch):
    """A training forward (model + loss) of 2 rows of one example each (a 2-tile image) and 4 padding slots
    (the plan counts full rows: padding reads no memory and runs no attention); every tensor
    autograd saves, parameters aside, against the plan's count: fp32 is the CPU layout; bf16 the GPU's with
    a fused attention kernel, bf16-math the GPU's as CUDA runs a masked GQA call (the math kernel, forced
    here for the calls with a mask: the decoder's per-document attention has none, and CUDA's flash takes it)."""
    dtype = torch.float32 if kind == "fp32" else torch.bfloat16
    layout = {"fp32": CPU, "bf16": replace(GPU, masked_gqa_math=False), "bf16-math": GPU}[kind]
    base = preset("tiny-d")
    cfg = replace(
        base, llm=replace(base.llm, **SMALL), projector=replace(base.projector, hidden_size=200, output_size=96)
    )
    cfg = cfg.with_arch(arch)
    model = NVLM(cfg).to(dtype)
    set_trainable(model, stage)
    processor = Processor(
        build_tiny_tokenizer(), ImageProcessor(tile_size=56, max_tiles=2, min_tiles=1, use_thumbnail=True), cfg
    )
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": Image.new("RGB", (112, 56), (200, 10, 10))},
                {"type": "text", "text": "Color?"},
            ],
        },
        {"role": "assistant", "content": "red"},
    ]
    example = encode_example(processor, messages, 96)
    t = len(example.input_ids) + 4  # rows the example fills but for a few slots, as packed rows end
    batch = collate(processor, [[example]] * 2, t)
    targets = batch.pop("targets")
    for key in ("pixel_values", "memory_pixel_values"):
        if key in batch:
            batch[key] = batch[key].to(dtype)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in params:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    sdpa = F.scaled_dot_product_attention

    def as_cuda(*args, **kwargs):  # a masked GQA call gets the math kernel, an unmasked one a fused kernel
        masked = (len(args) > 3 and args[3] is not None) or kwargs.get("attn_mask") is not None
        with sdpa_kernel(SDPBackend.MATH) if masked else contextlib.nullcontext():
            return sdpa(*args, **kwargs)

    if kind == "bf16-math":
        monkeypatch.setattr(F, "scaled_dot_product_attention", as_cuda)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(**batch).logits
        F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum")
    train = resolved(cfg, TrainConfig(stage=stage, seq_len=t, micro_batch_size=2, max_tiles=2))
    counted = count_activations(meta_model(cfg, train), train, layout)
    assert counted.saved == pytest.approx(sum(saved.values()), rel=0.03)


def test_checkpointing_keeps_far_fewer_activations():
    train = TrainConfig.load(RECIPES / "nvlm-d-72b-sft.yaml", ["--init", "null"])
    p = plan(preset("nvlm-d-72b"), train, 64, 80)
    assert p.activation_checkpointing and p.activations == p.activations_ac
    assert p.activations_ac < p.activations_no_ac / 5


def test_cli_plans_from_a_config_json_alone(tmp_path, capsys):
    init = tmp_path / "model"
    init.mkdir()
    (init / "config.json").write_text(json.dumps(to_hf(preset("tiny-d"))))  # no weights, no tokenizer
    args = ["train", "--config", str(RECIPES / "tiny-d-sft.yaml"), "--init", str(init), "--plan"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "| parameters |" in out and "smallest fit: 1 CPU processes" in out
    assert main([*args, "--devices", "2", "--device", "cpu", "--device-memory", "4", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["plan"]["devices"] == 2 and data["plan"]["cpu"] and data["plan"]["device_gib"] == 4.0
    plan_ = data["plan"]
    states = plan_["parameters"] + plan_["gradients"] + plan_["optimizer"]
    assert plan_["total"] == states + max(plan_["activations"] + plan_["transients"], plan_["optimizer_step"])
    assert set(tmp_path.rglob("*")) == {init, init / "config.json"}  # nothing written either
    assert main(["train", "--config", str(RECIPES / "nvlm-d-72b-sft.yaml"), "--plan"]) == 2  # init not there, no preset
    assert "--preset" in capsys.readouterr().err
    assert main([*args, "--devices", "0"]) == 2
    assert capsys.readouterr().err.count("\n") == 1  # one line
    assert main([a for a in args if a != "--plan"] + ["--devices", "2"]) == 2  # a plan flag without --plan
    assert "only with --plan" in capsys.readouterr().err


def test_measured_cpu_peak_agrees_with_the_plan(tmp_path):
    """One process, stage 2, a 40M-parameter model with Qwen2's vocabulary (its logits and the parameter
    states weigh alike): peak RSS during the steps, above the baseline after imports, within 25% of the
    plan's total at the data's share of supervised positions, where the loop takes logits (measured: 1.06 of
    it; 0.66 of the plan that counts logits at every position)."""
    sys.path.insert(0, str(BENCHMARKS))
    from bench_train_memory import baseline_mib, run, write_data

    base = preset("tiny-d")
    llm = replace(base.llm, hidden_size=128, intermediate_size=344, num_layers=2, num_heads=4, vocab_size=152064)
    cfg = replace(base, llm=llm, projector=replace(base.projector, hidden_size=344, output_size=128))
    torch.manual_seed(0)
    NVLM(cfg).save_pretrained(tmp_path / "model")
    build_tiny_tokenizer().save(tmp_path / "model")
    data = write_data(tmp_path / "data")
    args = [
        "--init",
        str(tmp_path / "model"),
        "--stage",
        "2",
        "--data",
        json.dumps([{"path": str(data)}]),
        "--device",
        "cpu",
        "--steps",
        "2",
        "--seq_len",
        "256",
        "--max_tiles",
        "2",
        "--micro_batch_size",
        "1",
        "--warmup_steps",
        "1",
        "--save_every",
        "1000000",
    ]
    measured = run(1, args, tmp_path / "run", {**os.environ, "OMP_NUM_THREADS": "2"})["train"] - baseline_mib()
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    supervised = max(s["supervised_tokens"] for s in steps) / (256 * 1)  # of seq_len x micro_batch_size positions
    predicted = plan(cfg, TrainConfig.load(None, args), 1, 24, supervised=supervised).total / 2**20
    assert measured == pytest.approx(predicted, rel=0.25)


@pytest.mark.parametrize("recipe", sorted(RECIPES.glob("nvlm-*-72b-*.yaml")), ids=lambda p: p.stem)
def test_shipped_recipes_state_what_the_plan_says_and_fit(recipe):
    """Each large recipe's comment names its GPU count and memory; the plan agrees, the run fits on 80 GiB
    GPUs, and micro_batch_size x grad_accum x GPUs is the paper's global batch."""
    import re

    from nvlm.train.plan import GIB, model_config
    from nvlm.train.stages import PAPER

    text = recipe.read_text()
    gib, n = re.search(r"# ([\d.]+) GiB per 80 GiB GPU on the (\d+) GPUs this recipe is set for", text).groups()
    arch = recipe.stem.split("-")[1].upper()
    train = TrainConfig.load(recipe, ["--preset", f"nvlm-{arch.lower()}-72b"])
    p = plan(model_config(train), train, int(n), 80)
    assert p.fits and f"{p.total / GIB:.1f}" == gib
    assert train.micro_batch_size * train.grad_accum * int(n) == PAPER[(arch, train.stage)]["global_batch"]
    assert f"--nnodes {int(n) // 8} " in text
