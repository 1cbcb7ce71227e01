"""Serving throughput: N concurrent clients (continuous batching) against the same requests one at a time.

    .venv/bin/python benchmarks/bench_serve.py [--preset 250m] [--clients 32] [--max-tokens 64]

Starts the server in-process on 127.0.0.1 with a random model (``tiny`` = the test preset, ``250m`` = an
LLM of hidden 1024 x 12 layers, vocab 152064, behind the tiny ViT), sends ``--clients`` chat requests with the
official ``openai`` client (a third with an image), greedy, eos disabled so every answer is
``--max-tokens`` long, first sequentially, then all at once; prints generated tokens/s of both and the ratio.
"""

from __future__ import annotations

import argparse
import base64
import io
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import openai
import torch
import uvicorn
from PIL import Image

from nvlm import NVLM, Processor, preset
from nvlm.image import ImageProcessor
from nvlm.serve.app import create_app
from nvlm.serve.engine import EngineThread
from nvlm.tokenizer import build_tiny_tokenizer


class NoStopProcessor(Processor):
    """Answers always run to max_tokens, so that both runs generate the same number of tokens."""

    @property
    def eos_token_ids(self) -> list[int]:
        return []


def model(name: str) -> NVLM:
    cfg = preset("tiny-d")
    if name == "250m":
        llm = replace(cfg.llm, hidden_size=1024, intermediate_size=2816, num_layers=12, num_heads=16, num_kv_heads=4)
        cfg = replace(cfg, llm=llm, projector=replace(cfg.projector, hidden_size=2816, output_size=1024))
    torch.manual_seed(0)
    return NVLM(cfg).eval()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="250m", choices=["tiny", "250m"])
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    args = ap.parse_args()
    m = model(args.preset)
    processor = NoStopProcessor(build_tiny_tokenizer(), ImageProcessor(tile_size=56), m.config)
    engine = EngineThread(m, processor, max_batch=args.clients)
    app = create_app(engine, "bench")
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="EMPTY", max_retries=0, timeout=3600)
    buf = io.BytesIO()
    Image.new("RGB", (150, 100), (120, 30, 60)).save(buf, "PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()

    def request(i: int) -> int:
        content = (
            f"Tell me about item {i}."
            if i % 3
            else [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": f"Describe {i}."}]
        )
        r = client.chat.completions.create(
            model="bench", messages=[{"role": "user", "content": content}], max_tokens=args.max_tokens, temperature=0
        )
        return r.usage.completion_tokens

    request(0)  # warm up
    t0 = time.perf_counter()
    sequential = sum(request(i) for i in range(args.clients))
    t_seq = time.perf_counter() - t0
    t0 = time.perf_counter()
    with ThreadPoolExecutor(args.clients) as pool:
        batched = sum(pool.map(request, range(args.clients)))
    t_bat = time.perf_counter() - t0
    print(f"{args.preset}, {args.clients} requests x {args.max_tokens} tokens")
    print(f"one at a time: {sequential / t_seq:.1f} tokens/s ({t_seq:.1f} s)")
    print(f"{args.clients} concurrent: {batched / t_bat:.1f} tokens/s ({t_bat:.1f} s)")
    print(f"ratio: {t_seq / t_bat * batched / sequential:.2f}x")
    server.should_exit = True
    engine.shutdown()


if __name__ == "__main__":
    main()
