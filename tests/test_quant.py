"""Quantization while loading (nvlm.quant): int8 / int4 answers against bf16's, memory, where it runs.

The trained model is tiny-d's LLM taught the next number ("347>348;") for 300 steps (~99% right on the
200 held-out numbers it never saw). Formats without a CPU kernel (fp8) must fail clearly before loading.
"""

import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

pytest.importorskip("torchao")

from conftest import open_gates

from nvlm import NVLM, Processor, preset
from nvlm.checkpoint import CheckpointError
from nvlm.quant import (
    QuantConfig,
    QuantizationError,
    Quantizer,
    int4_group_size,
    is_quantized,
    quantized_linears,
    storage_bytes,
)
from nvlm.tokenizer import build_tiny_tokenizer

AGREEMENT = {"int8": 0.99, "int4": 0.95}  # the share of held-out answers equal to bf16's, at least


def _numbers() -> tuple[list[int], list[int]]:
    """(training numbers, 200 held-out numbers), three digits each."""
    order = torch.randperm(899, generator=torch.Generator().manual_seed(0)).add(100).tolist()
    return order[200:], order[:200]


@pytest.fixture(scope="module")
def trained_dir(tiny_model_dir, tmp_path_factory):
    """tiny-d (NVLM-D) taught the next number, saved in bf16 with the tiny tokenizer and the processor files."""
    tok = build_tiny_tokenizer()
    data = torch.tensor([tok.encode(f"{n}>{n + 1};") for n in _numbers()[0]])
    torch.manual_seed(0)
    model = NVLM(preset("tiny-d"))
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # matrices this small gain nothing from a second thread, and lose much on a busy CPU
    for _ in range(300):
        batch = data[torch.randint(0, len(data), (64,), generator=g)]
        logits = model(batch[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.set_num_threads(threads)
    path = tmp_path_factory.mktemp("trained") / "model"
    model.to(torch.bfloat16).save_pretrained(path, processor=Processor.from_pretrained(tiny_model_dir))
    return path


def _held_out_prompts() -> torch.Tensor:
    tok = build_tiny_tokenizer()
    return torch.tensor([tok.encode(f"{n}>") for n in _numbers()[1]])


def _relative_error(model, ref, ids) -> float:
    with torch.no_grad():
        a, b = model(ids).logits.float(), ref(ids).logits.float()
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def bf16(trained_dir):
    return NVLM.from_pretrained(trained_dir, dtype=torch.bfloat16)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_held_out_answers_equal_bf16s(fmt, trained_dir, bf16):
    ids = _held_out_prompts()
    model = NVLM.from_pretrained(trained_dir, quantize=fmt)
    ref_answers = bf16.generate(ids, max_new_tokens=4, eos_token_id=[])
    answers = model.generate(ids, max_new_tokens=4, eos_token_id=[])
    same = float((answers == ref_answers).all(1).float().mean())
    error = _relative_error(model, bf16, ids)
    print(f"\n{fmt}: {same:.0%} of {len(ids)} held-out answers equal bf16's; logits' relative error {error:.4f}")
    assert same >= AGREEMENT[fmt]
    assert 0 < error < {"int8": 0.05, "int4": 0.25}[fmt]


def test_what_is_quantized_and_its_bytes(trained_dir):
    """Default: every decoder linear; the ViT, projector, embeddings and lm_head stay bf16 parameters.
    int8 weights within 1.1x of half their bf16 bytes; int4 within 1.1x of a quarter plus the scales (a bf16
    scale and zero, 4 bytes, per group of input channels)."""
    for fmt in ("int8", "int4"):
        model = NVLM.from_pretrained(trained_dir, quantize=fmt)
        linears = quantized_linears(model)
        decoder = {
            n
            for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and n.startswith("language_model.model.layers.")
        }
        assert set(linears) == decoder and len(decoder) == 7 * model.config.llm.num_layers
        for name, p in model.named_parameters():
            if not any(name == f"{n}.weight" for n in decoder):
                assert type(p) is torch.nn.Parameter and p.dtype == torch.bfloat16, name
        bf16_bytes = sum(m.weight.numel() * 2 for m in linears.values())
        got = sum(storage_bytes(m.weight) for m in linears.values())
        if fmt == "int8":
            bound = 0.5 * bf16_bytes
        else:
            bound = 0.25 * bf16_bytes + 4 * sum(
                m.weight.numel() // int4_group_size(m.in_features) for m in linears.values()
            )
        print(f"\n{fmt}: {got} bytes for {bf16_bytes} bf16 bytes ({got / bf16_bytes:.3f}x; bound {1.1 * bound:.0f})")
        assert bf16_bytes * (0.5 if fmt == "int8" else 0.25) < got <= 1.1 * bound


def test_the_bf16_model_never_exists_whole(trained_dir, monkeypatch):
    """While loading, at most the one linear being quantized holds a bf16 weight (the others: meta or quantized)."""
    plain_counts = []
    original = Quantizer._quantize

    def watch(self, linear):
        plain_counts.append(
            sum(
                isinstance(m, torch.nn.Linear)
                and n.startswith("language_model.model.layers.")
                and m.weight.device.type != "meta"
                and not is_quantized(m.weight)
                for n, m in self.model.named_modules()
            )
        )
        original(self, linear)

    monkeypatch.setattr(Quantizer, "_quantize", watch)
    NVLM.from_pretrained(trained_dir, quantize="int8")
    assert len(plain_counts) == 7 * 2 and max(plain_counts) == 1


def test_a_setting_quantizes_the_vision_encoder_and_lm_head_too(trained_dir):
    model = NVLM.from_pretrained(trained_dir, quantize=QuantConfig("int8", modules=("",)), device="auto")
    names = set(quantized_linears(model))
    assert "language_model.lm_head" in names and "mlp1.1" in names
    assert "vision_model.encoder.layers.0.attn.qkv" in names  # called as a module: a quantized ViT runs
    proc = Processor.from_pretrained(trained_dir)
    inputs = proc.apply_chat_template(
        [{"role": "user", "content": [{"type": "image", "image": _image()}, {"type": "text", "text": "123>"}]}],
        add_generation_prompt=True,
    )
    assert model.generate(**inputs, max_new_tokens=2).shape == (1, 2)


def _image(color=(200, 30, 30), size=(90, 50)):
    from PIL import Image

    return Image.new("RGB", size, color)


@pytest.mark.parametrize("arch", ["X", "H"])
def test_x_and_h_batched_and_streamed_equal_alone_and_bf16(arch, trained_dir, tmp_path):
    """Cross-attention blocks (gates opened) quantized too; a left-padded batch with images gives each row's
    alone answer, streaming gives the same tokens, and int8 answers equal bf16's."""
    from nvlm.generation import stream

    model = NVLM.from_pretrained(trained_dir, arch=arch)
    open_gates(model)
    base = Processor.from_pretrained(trained_dir)
    proc = Processor(base.tokenizer, base.image_processor, model.config)
    model.save_pretrained(tmp_path / arch, processor=proc)
    q = NVLM.from_pretrained(tmp_path / arch, quantize="int8")
    ref = NVLM.from_pretrained(tmp_path / arch, dtype=torch.bfloat16)
    assert any(n.startswith("xattn_layers.") for n in quantized_linears(q))
    proc = Processor.from_pretrained(tmp_path / arch)
    questions = [("345>", [_image()]), ("417> and more text", [_image((20, 200, 20), (50, 120))]), ("300>", [])]
    convs = [
        [{"role": "user", "content": [{"type": "image", "image": im} for im in ims] + [{"type": "text", "text": t}]}]
        for t, ims in questions
    ]
    params = {"max_new_tokens": 4, "eos_token_id": []}
    alone = [torch.stack(list(stream(q, **proc.apply_chat_template(c), **params)), 1)[0].tolist() for c in convs]
    batch = proc.apply_chat_template(convs)
    together = q.generate(**batch, **params)
    assert together.tolist() == alone
    assert torch.equal(ref.generate(**batch, **params), together)


def test_errors_are_clear_and_come_before_loading(trained_dir, monkeypatch):
    with pytest.raises(QuantizationError, match=r"fp8.*CUDA.*8\.9"):
        NVLM.from_pretrained(trained_dir, quantize="fp8")
    with pytest.raises(QuantizationError, match="expected one of int8, int4, fp8"):
        NVLM.from_pretrained(trained_dir, quantize="int3")
    with pytest.raises(QuantizationError, match="bfloat16"):
        NVLM.from_pretrained(trained_dir, dtype="float32", quantize="int8")
    model = NVLM.from_pretrained(trained_dir, quantize="int4")
    with pytest.raises(CheckpointError, match="quantized model is not saved"):
        model.save_pretrained(trained_dir.parent / "copy")
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)  # torchao not installed
    with pytest.raises(QuantizationError, match=r"pip install 'nvlm\[quant\]'"):
        NVLM.from_pretrained(trained_dir, quantize="int8")


def test_eval_and_chat_take_quantize(trained_dir):
    from nvlm.chat import Chat
    from nvlm.eval.runner import EvalConfig, load

    model, _ = load(EvalConfig(model=str(trained_dir), tasks=[], quantize="int4"))
    assert model.quantization.format == "int4" and quantized_linears(model)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "nvlm.cli",
            "chat",
            "--model",
            str(trained_dir),
            "--quantize",
            "int8",
            "--max-new-tokens",
            "4",
            "213>",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    expected = Chat(NVLM.from_pretrained(trained_dir, quantize="int8"), Processor.from_pretrained(trained_dir)).ask(
        "213>", max_new_tokens=4
    )
    assert done.stdout.strip() == expected.strip()
    bad = subprocess.run(
        [sys.executable, "-m", "nvlm.cli", "chat", "--model", str(trained_dir), "--quantize", "fp8", "x"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "fp8" in bad.stderr and "Traceback" not in bad.stderr


def test_nvlm_serve_quantize_int8_streamed_and_batched_equal_alone(trained_dir):
    import httpx
    import openai

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "nvlm.cli",
            "serve",
            "--model",
            str(trained_dir),
            "--port",
            str(port),
            "--quantize",
            "int8",
            "--served-model-name",
            "q",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(600):
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                assert server.poll() is None, server.stderr.read()
                time.sleep(0.1)
        client = openai.OpenAI(base_url=url + "/v1", api_key="EMPTY", max_retries=0)

        def ask(i, **kw):
            text = f"{200 + 37 * i}>" + " please" * (i % 3)
            return client.chat.completions.create(
                model="q", messages=[{"role": "user", "content": text}], max_tokens=6, temperature=0, **kw
            )

        alone = [ask(i).choices[0].message.content for i in range(8)]
        with ThreadPoolExecutor(8) as pool:
            together = [r.choices[0].message.content for r in pool.map(ask, range(8))]
        streamed = [
            "".join(c.choices[0].delta.content or "" for c in ask(i, stream=True) if c.choices) for i in range(3)
        ]
        assert together == alone and streamed == alone[:3]
        assert any(alone)
    finally:
        server.terminate()
        server.wait(timeout=30)
