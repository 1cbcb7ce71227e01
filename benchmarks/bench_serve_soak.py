"""Server soak: 64 clients on 127.0.0.1, good and hostile requests mixed, for a bounded time.

    .venv/bin/python benchmarks/bench_serve_soak.py [--clients 64] [--seconds 50] [--warmup 10] [--bad 0.25]

Starts ``nvlm serve``'s app in a child process (the random ``tiny-d`` preset with the tiny tokenizer,
``--allow-remote-images`` on, a 4 MB body limit), learns each good request's answer served alone
(greedy), then runs ``--clients`` threads for ``--seconds``: each sends a good request (text, or with an
image) or, with probability ``--bad``, a hostile one (over-limit chunked body, image-token text, a prompt
over the context, malformed JSON, a seed over 2**64, a NUL in an image path, a 25,000,000 x 1 PNG, a
loopback image URL, too many images). It counts wrong answers (not the solo answer), 5xx, hostile
requests not answered 4xx, client errors; samples ``/health`` every 50 ms for its p50/p99 latency; and
reads the server's RSS from ``/proc/PID/status`` before (after ``--warmup`` seconds of the same load,
so that caches, thread pools and allocator arenas have grown) and after. It stops by itself; exit status 1 if
any wrong answer, 5xx or unrefused hostile request was seen.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import multiprocessing
import random
import socket
import statistics
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import httpx
from PIL import Image

BODY_LIMIT = 4 * 2**20
Goods = list[dict[str, Any]]
Bads = list[tuple[str, Callable[[httpx.Client, str], httpx.Response]]]


def serve(port: int, ready: Any) -> None:
    """The child: build the model and run the app until killed."""
    import torch
    import uvicorn

    from nvlm import NVLM, Processor, preset
    from nvlm.image import ImageProcessor
    from nvlm.serve.app import Limits, create_app
    from nvlm.serve.engine import EngineThread
    from nvlm.tokenizer import build_tiny_tokenizer

    torch.manual_seed(0)
    model = NVLM(preset("tiny-d")).eval()
    processor = Processor(build_tiny_tokenizer(), ImageProcessor(tile_size=56), model.config)
    engine = EngineThread(model, processor, max_batch=32)
    limits = Limits(max_body_bytes=BODY_LIMIT, allow_remote_images=True, fetch_timeout_s=2.0)
    server = uvicorn.Server(
        uvicorn.Config(create_app(engine, "soak", limits), host="127.0.0.1", port=port, log_level="error")
    )
    threading.Thread(target=lambda: (_wait_started(server), ready.set()), daemon=True).start()
    server.run()


def _wait_started(server: Any) -> None:
    while not server.started:
        time.sleep(0.05)


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def png(size: tuple[int, int], color: tuple[int, int, int] = (200, 0, 0), mode: str = "RGB") -> str:
    buf = io.BytesIO()
    Image.new(mode, size, color if mode == "RGB" else 0).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def good_requests() -> Goods:
    out = []
    for i in range(16):
        if i % 4 == 0:
            content: Any = [
                {"type": "image_url", "image_url": {"url": png((40 + 15 * i, 60), (10 * i, 90, 200))}},
                {"type": "text", "text": f"what is image {i}?"},
            ]
        else:
            content = f"question {i}: " + "tell me more " * (i % 5)
        out.append(
            {"model": "soak", "messages": [{"role": "user", "content": content}], "max_tokens": 8, "temperature": 0}
        )
    return out


def hostile_requests(loopback_port: int) -> Bads:
    def post(body: Any) -> Callable[[httpx.Client, str], httpx.Response]:
        content = body if isinstance(body, (bytes, str)) else json.dumps(body)
        return lambda c, url: c.post(url, content=content, headers={"content-type": "application/json"})

    def chunked(c: httpx.Client, url: str) -> httpx.Response:
        def body():
            yield b'{"model": "soak", "messages": [{"role": "user", "content": "'
            for _ in range(2 * BODY_LIMIT // 65536):
                yield b"x" * 65536
            yield b'"}]}'

        return c.post(url, content=body(), headers={"content-type": "application/json"})

    def msg(content: Any, **kw: Any) -> dict[str, Any]:
        return {"model": "soak", "messages": [{"role": "user", "content": content}], "max_tokens": 4, **kw}

    def image(url: str) -> list[dict[str, Any]]:
        return [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "?"}]

    return [
        ("chunked body over the limit", chunked),
        ("image-token text", post(msg("look <|vision_pad|><|vision_pad|> here"))),
        ("prompt over the context", post(msg("a" * (3 * 2**20)))),
        ("malformed JSON", post(b'{"model": "soak", "messages": [')),
        ("seed over 2**64", post(msg("x", seed=2**64))),
        ("NUL in an image path", post(msg(image("file:///tmp/a\x00b.png")))),
        ("25,000,000 x 1 PNG", post(msg(image(png((25_000_000, 1), mode="1"))))),
        ("loopback image URL", post(msg(image(f"http://127.0.0.1:{loopback_port}/a.png")))),
        ("too many images", post(msg([image(png((8, 8)))[0]] * 9))),
    ]


def soak(
    url: str, base: str, goods: Goods, solo: list[str], bads: Bads, clients: int, seconds: float, bad: float
) -> tuple[Counter[str], list[float], float]:
    """``clients`` threads for ``seconds``: (outcome counts, /health latencies, seconds taken)."""
    counts: Counter[str] = Counter()
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds
    health: list[float] = []

    def client(k: int) -> None:
        rng = random.Random(k)
        with httpx.Client(timeout=120) as c:
            while time.monotonic() < stop_at:
                try:
                    if rng.random() < bad:
                        name, send = rng.choice(bads)
                        r = send(c, url)
                        key = (
                            "hostile refused (4xx)"
                            if 400 <= r.status_code < 500
                            else f"hostile NOT refused: {name} -> {r.status_code}"
                        )
                    else:
                        i = rng.randrange(len(goods))
                        r = c.post(url, json=goods[i])
                        if r.status_code >= 500:
                            key = "5xx"
                        elif r.status_code != 200:
                            key = f"good request answered {r.status_code}"
                        else:
                            key = (
                                "good, right"
                                if r.json()["choices"][0]["message"]["content"] == solo[i]
                                else "good, WRONG"
                            )
                except httpx.HTTPError as e:
                    key = f"client error {type(e).__name__}"
                with lock:
                    counts[key] += 1

    def poll_health() -> None:
        with httpx.Client(timeout=30) as c:
            while time.monotonic() < stop_at:
                t = time.perf_counter()
                if c.get(base + "/health").status_code == 200:
                    health.append(time.perf_counter() - t)
                time.sleep(0.05)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    threads.append(threading.Thread(target=poll_health))
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return counts, health, time.monotonic() - start


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=50.0)
    ap.add_argument("--bad", type=float, default=0.25, help="share of hostile requests")
    ap.add_argument("--warmup", type=float, default=10.0, help="seconds of the same load before RSS 'before'")
    args = ap.parse_args()

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    child = ctx.Process(target=serve, args=(port, ready), daemon=True)
    child.start()
    if not ready.wait(120):
        raise SystemExit("the server did not start")
    base = f"http://127.0.0.1:{port}"
    url = base + "/v1/chat/completions"
    trap = socket.create_server(("127.0.0.1", 0))  # the loopback URL's target: must see no connection
    trap.settimeout(0.01)
    goods, bads = good_requests(), hostile_requests(trap.getsockname()[1])
    with httpx.Client(timeout=120) as c:
        solo = [c.post(url, json=g).json()["choices"][0]["message"]["content"] for g in goods]
        for _, send in bads:  # warm every path once before measuring
            send(c, url)

    rss_cold = rss_mb(child.pid)
    soak(url, base, goods, solo, bads, args.clients, args.warmup, args.bad)  # reach the steady state
    time.sleep(2.0)
    rss_before = rss_mb(child.pid)
    counts, health, took = soak(url, base, goods, solo, bads, args.clients, args.seconds, args.bad)
    time.sleep(2.0)
    rss_after = rss_mb(child.pid)
    try:
        trap.accept()
        trapped = 1
    except OSError:
        trapped = 0
    child.kill()

    q = statistics.quantiles(health, n=100)
    wrong, five = counts["good, WRONG"], counts["5xx"]
    unrefused = sum(v for k, v in counts.items() if k.startswith("hostile NOT"))
    print(f"{args.clients} clients, {took:.0f} s, {sum(counts.values())} requests ({args.bad:.0%} hostile)")
    for k, v in sorted(counts.items()):
        print(f"  {k}: {v}")
    print(f"wrong answers: {wrong}   5xx: {five}   hostile not refused: {unrefused}   loopback connections: {trapped}")
    print(
        f"server RSS: {rss_cold:.0f} MB after the solo answers, {rss_before:.0f} MB after a {args.warmup:.0f} s "
        f"warm-up soak (before), {rss_after:.0f} MB after ({(rss_after / rss_before - 1):+.1%})"
    )
    print(
        f"/health: {len(health)} polls, p50 {q[49] * 1e3:.1f} ms, p99 {q[98] * 1e3:.1f} ms, "
        f"max {max(health) * 1e3:.1f} ms"
    )
    return int(bool(wrong or five or unrefused or trapped))


if __name__ == "__main__":
    sys.exit(main())
