"""The OpenAI-compatible server, driven by the official ``openai`` client and raw httpx."""

import base64
import io
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import uvicorn
from PIL import Image

from nvlm import NVLM, Processor
from nvlm.serve.app import Limits, create_app
from nvlm.serve.engine import EngineThread


def _data_url(size=(120, 60), color=(200, 0, 0), fmt="PNG") -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


class Server:
    def __init__(self, model_dir, arch=None, **limits):
        model = NVLM.from_pretrained(model_dir, arch=arch)
        processor = Processor.from_pretrained(model_dir)
        if arch:
            processor = Processor(processor.tokenizer, processor.image_processor, model.config)
        self.engine = EngineThread(model, processor, max_batch=32, max_waiting=limits.pop("max_waiting", 256))
        app = create_app(self.engine, "tiny", Limits(**limits))
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        self.port = s.getsockname()[1]
        s.close()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        threading.Thread(target=self.server.run, daemon=True).start()
        while not self.server.started:
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="EMPTY", max_retries=0)

    def stop(self):
        self.server.should_exit = True
        self.engine.shutdown()

    def ask(self, messages, **kw):
        kw = {"max_tokens": 10, "temperature": 0, **kw}
        return self.client.chat.completions.create(model="tiny", messages=messages, **kw)


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    image_dir = tmp_path_factory.mktemp("images")
    Image.new("RGB", (60, 60), (0, 0, 200)).save(image_dir / "blue.png")
    s = Server(tiny_model_dir, local_image_dir=str(image_dir), max_images=3)
    s.image_dir = image_dir
    yield s
    s.stop()


def _image_msg(url, text="what is it?"):
    return [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}]}
    ]


def test_completion_with_an_image_and_usage(server):
    r = server.ask(_image_msg(_data_url()))
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens <= 10
    assert r.usage.prompt_tokens > 4 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    # the engine answers what the library's own generation answers
    proc = server.engine.processor
    conv = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": base64.b64decode(_data_url().split(",")[1])},
                {"type": "text", "text": "what is it?"},
            ],
        }
    ]
    ids = server.engine.model.generate(
        **proc.apply_chat_template(conv), max_new_tokens=10, eos_token_id=proc.eos_token_ids
    )
    assert r.choices[0].message.content == proc.decode(ids[0])


def test_streamed_chunks_reassemble_the_greedy_answer(server):
    msgs = _image_msg(_data_url(color=(0, 120, 0)), "describe")
    whole = server.ask(msgs, max_tokens=12).choices[0].message.content
    chunks = list(server.ask(msgs, max_tokens=12, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and chunks[-1].usage is not None and not chunks[-1].choices


def test_n_choices_and_models(server):
    r = server.ask([{"role": "user", "content": "hello"}], n=3, temperature=1.0, seed=3, max_tokens=6)
    assert [c.index for c in r.choices] == [0, 1, 2]
    again = server.ask([{"role": "user", "content": "hello"}], n=3, temperature=1.0, seed=3, max_tokens=6)
    assert [c.message.content for c in r.choices] == [c.message.content for c in again.choices]  # seeded
    assert [m.id for m in server.client.models.list().data] == ["tiny"]


def test_stop_strings_and_local_files(server):
    msgs = [{"role": "user", "content": "count"}]
    full = server.ask(msgs, max_tokens=12).choices[0].message.content
    stop = full[3:5] if len(full) > 5 else None
    if stop and stop.strip():
        r = server.ask(msgs, max_tokens=12, stop=[stop])
        assert r.choices[0].message.content == full[: full.index(stop)] and r.choices[0].finish_reason == "stop"
    ok = server.ask(_image_msg("file://" + str(server.image_dir / "blue.png")))
    assert ok.choices[0].message.content is not None


def test_32_concurrent_clients_get_their_alone_answers_and_health_answers(server):
    prompts = [
        _image_msg(_data_url(size=(40 + 10 * i, 60), color=(10 * i, 50, 200 - 5 * i)))
        if i % 3 == 0
        else [{"role": "user", "content": f"question {i} " * (1 + i % 4)}]
        for i in range(32)
    ]
    alone = [server.ask(p).choices[0].message.content for p in prompts]
    with ThreadPoolExecutor(32) as pool:
        futures = [pool.submit(server.ask, p, max_tokens=10) for p in prompts]
        health = httpx.get(server.url + "/health", timeout=5)  # answered while generation runs
        together = [f.result().choices[0].message.content for f in futures]
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert together == alone


BAD = [
    ("malformed JSON", "{not json", 400),
    ("non-image data URL", {"messages": _image_msg("data:text/plain;base64,aGVsbG8=")}, 400),
    ("truncated base64 image", {"messages": _image_msg(_data_url()[:-40])}, 400),
    (
        "too many images",
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _data_url()}}] * 4}]},
        400,
    ),
    ("unknown model", {"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]}, 404),
    ("negative max_tokens", {"messages": [{"role": "user", "content": "x"}], "max_tokens": -1}, 400),
    ("http URL while disallowed", {"messages": _image_msg("http://127.0.0.1:9/cat.png")}, 400),
    ("file outside the image dir", {"messages": _image_msg("file:///etc/passwd")}, 400),
    ("over the context", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 100_000}, 400),
    ("placeholder without image", {"messages": [{"role": "user", "content": "look <image> here"}]}, 400),
    ("no messages", {"messages": []}, 400),
]


@pytest.mark.parametrize("name,body,status", BAD, ids=[b[0] for b in BAD])
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server, name, body, status):
    if isinstance(body, dict):
        body = {"model": "tiny", **body}
    content = body if isinstance(body, str) else __import__("json").dumps(body)
    r = httpx.post(
        server.url + "/v1/chat/completions", content=content, headers={"content-type": "application/json"}, timeout=30
    )
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and "type" in err and "code" in err
    assert server.ask([{"role": "user", "content": "still there?"}], max_tokens=2).choices


def test_50_megapixel_image_and_huge_body_are_refused(server):
    buf = io.BytesIO()
    Image.new("1", (10_000, 5_000)).save(buf, "PNG")  # 50 MP, a small file
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": "tiny", "messages": _image_msg(url)}, timeout=30)
    assert r.status_code == 400 and "pixel" in r.json()["error"]["message"]
    big = "x" * (21 * 2**20)
    r = httpx.post(
        server.url + "/v1/chat/completions",
        json={"model": "tiny", "messages": [{"role": "user", "content": big}]},
        timeout=30,
    )
    assert r.status_code == 413


def test_a_client_that_disconnects_stops_its_generation(server):
    """Left alone the request runs 4,000 decode steps (the tiny model never says EOS at temperature 0); a client
    that goes after 3 lines must take it out of the batch within a few steps, not at the end."""
    start = server.engine.steps
    with httpx.stream(
        "POST",
        server.url + "/v1/chat/completions",
        timeout=30,
        json={
            "model": "tiny",
            "messages": [{"role": "user", "content": "go on"}],
            "max_tokens": 4000,
            "stream": True,
            "temperature": 0,
        },
    ) as r:
        for _ in zip(range(3), r.iter_lines(), strict=False):  # the first three lines
            pass
    deadline = time.time() + 10
    while server.engine.running and time.time() < deadline:
        time.sleep(0.02)
    assert not server.engine.running
    assert server.engine.steps - start < 1000  # left the batch long before its 4,000 tokens


def test_queue_full_is_429(tiny_model_dir):
    s = Server(tiny_model_dir, max_waiting=0)
    try:
        r = httpx.post(
            s.url + "/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": "x"}]}
        )
        assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full"
    finally:
        s.stop()


@pytest.mark.parametrize("arch", "XH")
def test_nvlm_x_and_h_are_served_with_continuous_batching(arch, tiny_model_dir):
    s = Server(tiny_model_dir, arch=arch)
    try:
        import torch

        with torch.no_grad():
            for block in s.engine.model.xattn_layers:
                block.attn_gate.fill_(0.8)
                block.ffn_gate.fill_(0.5)
        prompts = [
            _image_msg(_data_url(size=(130, 60), color=(30 * i, 90, 20)))
            if i % 2 == 0
            else [{"role": "user", "content": f"plain {i}"}]
            for i in range(8)
        ]
        alone = [s.ask(p).choices[0].message.content for p in prompts]
        with ThreadPoolExecutor(8) as pool:
            together = list(pool.map(lambda p: s.ask(p).choices[0].message.content, prompts))
        assert together == alone
    finally:
        s.stop()
