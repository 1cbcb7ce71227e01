"""The server against hostile or broken requests: each test is one defect of issue 17 (server half)."""

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from test_serve import Server, _data_url, _image_msg

from nvlm.sampling import SamplingParams
from nvlm.serve.engine import Job


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _post(server, body, **kw):
    content = json.dumps(body) if isinstance(body, dict) else body
    headers = {"content-type": "application/json", **kw.pop("headers", {})}
    return httpx.post(server.url + "/v1/chat/completions", content=content, headers=headers, timeout=60, **kw)


def _openai_error(r, status, code=None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if code is not None:
        assert err["code"] == code, err
    return err


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    s = Server(tiny_model_dir, max_body_bytes=2**20)
    yield s
    s.stop()


def test_a_chunked_body_is_counted_as_it_arrives(server):
    def body():
        yield b'{"model": "tiny", "messages": [{"role": "user", "content": "'
        for _ in range(30 * 16):  # 30 MB in 64 KB chunks, no Content-Length
            yield b"x" * 65536
        yield b'"}]}'

    base = _status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak RSS (VmHWM) to now
    r = _post(server, body())
    _openai_error(r, 413, "body_too_large")
    assert (_status_kb("VmHWM") - base) / 1024 < 12  # the limit is 1 MB: nothing like 30 MB was held
    r = _post(server, "x" * (2**20 + 1))  # with a Content-Length: refused before reading
    _openai_error(r, 413, "body_too_large")
    assert (
        _post(
            server, {"model": "tiny", "messages": [{"role": "user", "content": "x" * 1000}], "max_tokens": 2}
        ).status_code
        == 200
    )


def test_a_12_mb_prompt_is_refused_before_tokenizing(tiny_model_dir):
    s = Server(tiny_model_dir)  # the default 20 MB body limit
    try:
        body = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "a" * (12 * 2**20)}]})
        base = _status_kb("VmRSS")
        start = time.perf_counter()
        r = _post(s, body)
        took = time.perf_counter() - start
        err = _openai_error(r, 400, "context_length_exceeded")
        assert took < 1.0 and "at least" in err["message"]
        assert (_status_kb("VmRSS") - base) / 1024 < 100  # nothing big kept
    finally:
        s.stop()


def test_image_token_text_is_400_and_batched_neighbours_get_their_solo_answers(server):
    good = [
        [{"role": "user", "content": f"question {i} " * (1 + i % 3)}]
        if i % 8
        else _image_msg(_data_url(size=(40 + 9 * i, 50)), f"image {i}")
        for i in range(31)
    ]
    alone = [server.ask(p, max_tokens=4).choices[0].message.content for p in good]
    bad = {
        "model": "tiny",
        "max_tokens": 4,
        "temperature": 0,
        "messages": [{"role": "user", "content": "look: <|vision_pad|><|vision_pad|>"}],
    }
    with ThreadPoolExecutor(32) as pool:
        futures = [pool.submit(server.ask, p, max_tokens=4) for p in good[:15]]
        refused = pool.submit(_post, server, bad)
        futures += [pool.submit(server.ask, p, max_tokens=4) for p in good[15:]]
        together = [f.result().choices[0].message.content for f in futures]
    assert "<|vision_pad|>" in _openai_error(refused.result(), 400)["message"]
    assert together == alone


def test_a_failing_prefill_fails_only_its_own_sequence(server):
    """A sequence the model refuses (image tokens without pixels) is batched with good ones: it alone fails."""
    engine, proc = server.engine, server.engine.processor

    def run(prompts):
        done = [threading.Event() for _ in prompts]
        out: list[list] = [[] for _ in prompts]
        seqs = []
        for i, p in enumerate(prompts):

            def emit(kind, value, i=i):
                out[i].append((kind, value))
                if kind in ("done", "error"):
                    done[i].set()

            seqs.append(Job(p, [], SamplingParams(max_new_tokens=6, eos_token_id=proc.eos_token_ids), emit))
        engine.submit(seqs)  # one call: admitted, and prefilled, together
        assert all(d.wait(60) for d in done)
        return out

    prompts = [proc.encode(proc.render([{"role": "user", "content": f"row {i}"}]).text, []) for i in range(8)]
    alone = [run([p])[0] for p in prompts]
    bad = proc.encode("bad", [])
    bad.input_ids = bad.input_ids + [proc.image_token_id] * 3  # reaches the model: its prefill raises
    results = run([*prompts[:4], bad, *prompts[4:]])
    assert results[4][-1][0] == "error"
    assert results[:4] + results[5:] == alone


def test_a_non_streamed_request_stops_decoding_when_its_client_leaves(server):
    body = json.dumps(
        {"model": "tiny", "messages": [{"role": "user", "content": "go on"}], "max_tokens": 3000, "temperature": 0}
    ).encode()
    steps = server.engine.steps
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n%s" % (len(body), body)
        )
        deadline = time.time() + 10
        while not server.engine.running and time.time() < deadline:
            time.sleep(0.01)
    deadline = time.time() + 10
    while server.engine.running and time.time() < deadline:
        time.sleep(0.02)
    assert not server.engine.running and server.engine.steps - steps < 1000  # it would run 3000 steps


BAD = [
    ("seed over 2**64", {"seed": 2**64}, "seed"),
    ("seed under -2**63", {"seed": -(2**63) - 1}, "seed"),
    ("NUL in an image path", {"messages": _image_msg("file:///tmp/a\x00b.png")}, None),
    ("NUL in a file URL's directory", {"messages": _image_msg("/etc\x00/passwd")}, None),
]


@pytest.mark.parametrize("name,fields,param", BAD, ids=[b[0] for b in BAD])
def test_bad_fields_are_400_in_the_openai_shape(server, name, fields, param):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2, **fields}
    err = _openai_error(_post(server, body), 400)
    assert param is None or err["param"] == param


def test_the_largest_seed_still_works_for_every_choice(server):
    r = _post(
        server,
        {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2, "seed": 2**64 - 1, "n": 3},
    )
    assert r.status_code == 200 and len(r.json()["choices"]) == 3


def test_parse_and_routing_errors_use_the_openai_shape(server):
    _openai_error(_post(server, b'{"model": "tiny", "messages": "\xff\xfe"}'), 400)  # not UTF-8
    _openai_error(_post(server, "{not json"), 400, "invalid_json")
    _openai_error(httpx.get(server.url + "/v1/chat/completions"), 405)
    _openai_error(httpx.get(server.url + "/v1/nothing"), 404)
    err = _openai_error(_post(server, {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "n": 99}), 400)
    assert err["param"] == "n"


def test_a_request_whose_sampling_fails_fails_alone(server):
    """temperature 1e-40 overflows the logits to inf: that row's sampling raises, in prefill and in decode."""
    good = [[{"role": "user", "content": f"sample {i}"}] for i in range(8)]
    alone = [server.ask(p, max_tokens=4).choices[0].message.content for p in good]
    bad = {"model": "tiny", "max_tokens": 4, "temperature": 1e-40, "messages": [{"role": "user", "content": "x"}]}
    with ThreadPoolExecutor(9) as pool:
        futures = [pool.submit(server.ask, p, max_tokens=4) for p in good[:4]]
        failed = pool.submit(_post, server, bad)
        futures += [pool.submit(server.ask, p, max_tokens=4) for p in good[4:]]
        together = [f.result().choices[0].message.content for f in futures]
    assert _openai_error(failed.result(), 500, "generation_failed")
    assert together == alone


def test_an_unexpected_error_is_a_500_in_the_openai_shape(server, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(server.engine.processor, "render", boom)
    err = _openai_error(_post(server, {"model": "tiny", "messages": [{"role": "user", "content": "x"}]}), 500)
    assert err["type"] == "server_error"
