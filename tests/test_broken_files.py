"""Every broken checkpoint, config or tokenizer file is a one-line CheckpointError / ConfigError naming the file,
raised before anything is built: never a traceback from inside safetensors, json or the model."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from nvlm import NVLM, Processor
from nvlm.checkpoint import CheckpointError
from nvlm.config import ConfigError

INDEX = "model.safetensors.index.json"
PRE = "preprocessor_config.json"
S1, S2, S3 = (f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3))


def _json(name, fn):
    def edit(d, outside):
        data = json.loads((d / name).read_text())
        data = fn(data) or data
        (d / name).write_text(json.dumps(data))

    return edit


def _cfg(fn):
    return _json("config.json", fn)


def _llm(**kw):
    return _cfg(lambda c: c["llm_config"].update(kw))


def _vit(**kw):
    return _cfg(lambda c: c["vision_config"].update(kw))


def _raw(name, data):
    def edit(d, outside):
        (d / name).write_bytes(data)

    return edit


def _header(name, fn):
    """Rewrite a shard's safetensors header (8-byte length, then JSON)."""

    def edit(d, outside):
        b = (d / name).read_bytes()
        n = int.from_bytes(b[:8], "little")
        header = json.loads(b[8 : 8 + n])
        fn(header)
        new = json.dumps(header).encode()
        (d / name).write_bytes(len(new).to_bytes(8, "little") + new + b[8 + n :])

    return edit


def _first_tensor(header):
    return header[next(k for k in header if k != "__metadata__")]


def _tensors(name, fn):
    def edit(d, outside):
        sd = load_file(str(d / name))
        fn(sd, d)
        save_file(sd, str(d / name), metadata={"format": "pt"})

    return edit


def _retype(dtype):
    def fn(sd, d):
        k = next(iter(sd))
        sd[k] = torch.ones(sd[k].shape, dtype=dtype)

    return fn


def _duplicate(sd, d):
    first = load_file(str(d / S1))
    k = next(iter(first))
    sd[k] = first[k]


def _index_shard(path_of):
    """Point the index's first shard at a copy of it outside the directory (the copy exists and is valid)."""

    def edit(d, outside):
        index = json.loads((d / INDEX).read_text())
        target = path_of(outside)
        shutil.copy(d / S1, target if os.path.isabs(target) else d / target)
        index["weight_map"] = {n: target if f == S1 else f for n, f in index["weight_map"].items()}
        (d / INDEX).write_text(json.dumps(index))

    return edit


def _symlink_out(d, outside):
    shutil.move(d / S2, outside / S2)
    (d / S2).symlink_to(outside / S2)


def _index_twice(d, outside):
    text = (d / INDEX).read_text()
    wm = json.loads(text)["weight_map"]
    k = next(n for n, f in wm.items() if f == S1)
    (d / INDEX).write_text(text.replace('"weight_map": {', f'"weight_map": {{"{k}": "{S2}", ', 1))


def _dir(name):
    def edit(d, outside):
        (d / name).unlink()
        (d / name).mkdir()

    return edit


def _tok(fn):
    return _json("tokenizer.json", fn)


# name -> (edit(dir, outside_dir), the file the error must name)
BROKEN = {
    "truncated shard": (lambda d, o: (d / S1).write_bytes((d / S1).read_bytes()[:1000]), S1),
    "empty shard": (_raw(S1, b""), S1),
    "header length past the end": (_raw(S1, (2**40).to_bytes(8, "little") + b"{}"), S1),
    "header not JSON": (lambda d, o: (d / S1).write_bytes((d / S1).read_bytes()[:8] + b"\xff" * 50), S1),
    "unknown dtype in the header": (_header(S1, lambda h: _first_tensor(h).update(dtype="Q7")), S1),
    "offsets past the end": (_header(S1, lambda h: _first_tensor(h).update(data_offsets=[0, 10**9])), S1),
    "integer tensor for a float weight": (_tensors(S1, _retype(torch.int32)), S1),
    "bool tensor for a float weight": (_tensors(S2, _retype(torch.bool)), S2),
    "one tensor in two shards": (_tensors(S2, _duplicate), S2),
    "shard is a directory": (_dir(S3), S3),
    "index not JSON": (_raw(INDEX, b'{"weight_map": '), INDEX),
    "index not UTF-8": (_raw(INDEX, b'{"weight_map": {"\xff": 1}}'), INDEX),
    "index weight_map a list": (_json(INDEX, lambda i: i.update(weight_map=[S1])), INDEX),
    "index shard name a number": (
        _json(INDEX, lambda i: i["weight_map"].update(dict.fromkeys(i["weight_map"], 7))),
        INDEX,
    ),
    "index lists a tensor twice": (_index_twice, INDEX),
    "index shard path absolute": (_index_shard(lambda o: str(o / S1)), INDEX),
    "index shard path with ..": (_index_shard(lambda o: f"../{o.name}/{S1}"), INDEX),
    "shard symlink leaving the directory": (_symlink_out, S2),
    "config.json not JSON": (_raw("config.json", b"{"), "config.json"),
    "config.json not UTF-8": (_raw("config.json", b'{"a": "\xff"}'), "config.json"),
    "config.json a list": (_raw("config.json", b"[]"), "config.json"),
    "config.json a directory": (_dir("config.json"), "config.json"),
    "vision_config a list": (_cfg(lambda c: c.update(vision_config=[1])), "config.json"),
    "hidden_size a string": (_llm(hidden_size="64"), "config.json"),
    "num_hidden_layers a bool": (_llm(num_hidden_layers=True), "config.json"),
    "num_hidden_layers a float": (_llm(num_hidden_layers=2.5), "config.json"),
    "zero LLM heads": (_llm(num_attention_heads=0), "config.json"),
    "zero KV heads": (_llm(num_key_value_heads=0), "config.json"),
    "zero ViT heads": (_vit(num_attention_heads=0), "config.json"),
    "negative layers": (_llm(num_hidden_layers=-2), "config.json"),
    "10^7 layers": (_llm(num_hidden_layers=10**7), "config.json"),
    "width 10^9": (_vit(hidden_size=10**9), "config.json"),
    "vocabulary of 0": (_llm(vocab_size=0), "config.json"),
    "negative FFN size": (_llm(intermediate_size=-128), "config.json"),
    "patch size 0": (_vit(patch_size=0), "config.json"),
    "downsample ratio 0": (_cfg(lambda c: c.update(downsample_ratio=0)), "config.json"),
    "10^9 tiles": (_cfg(lambda c: c.update(max_dynamic_patch=10**9)), "config.json"),
    "rope_theta 0": (_llm(rope_theta=0), "config.json"),
    "negative norm eps": (_vit(layer_norm_eps=-1.0), "config.json"),
    "torch_dtype int64": (_cfg(lambda c: c.update(torch_dtype="int64")), "config.json"),
    "torch_dtype unknown": (_cfg(lambda c: c.update(torch_dtype="float99")), "config.json"),
    "tokenizer.json not JSON": (_raw("tokenizer.json", b'{"added_tokens": ['), "tokenizer.json"),
    "tokenizer.json a list": (_raw("tokenizer.json", b"[]"), "tokenizer.json"),
    "tokenizer.json added_tokens a number": (_tok(lambda t: t.update(added_tokens=5)), "tokenizer.json"),
    "tokenizer.json token id a string": (_tok(lambda t: t["added_tokens"][11].update(id="x")), "tokenizer.json"),
    "tokenizer_config.json not JSON": (_raw("tokenizer_config.json", b"{"), "tokenizer_config.json"),
    "tokenizer_config.json not UTF-8": (_raw("tokenizer_config.json", b'{"a": "\xff"}'), "tokenizer_config.json"),
    "tokenizer_config.json a list": (_raw("tokenizer_config.json", b"[1]"), "tokenizer_config.json"),
    "eos_token not in the vocabulary": (
        _json("tokenizer_config.json", lambda t: t.update(eos_token="<nope>")),
        "tokenizer_config.json",
    ),
    "special_tokens_map.json a string": (_raw("special_tokens_map.json", b'"x"'), "special_tokens_map.json"),
    "preprocessor_config.json not UTF-8": (_raw(PRE, b'{"a": "\xff"}'), PRE),
    "preprocessor_config.json a list": (_raw(PRE, b"[]"), PRE),
    "max_dynamic_patch a string": (_raw(PRE, b'{"max_dynamic_patch": "6"}'), PRE),
    "max_dynamic_patch 10^9": (_raw(PRE, b'{"max_dynamic_patch": 1000000000}'), PRE),
}


def _load(path):
    NVLM.from_pretrained(path)
    processor = Processor.from_pretrained(path)
    processor.tokenizer.eos_token_id  # noqa: B018  (read from tokenizer_config.json)


def test_the_unbroken_checkpoint_loads(tiny_model_dir):
    _load(tiny_model_dir)


@pytest.mark.parametrize("kind", list(BROKEN))
def test_a_broken_file_is_a_one_line_error_naming_it(kind, tiny_model_dir, tmp_path):
    edit, name = BROKEN[kind]
    d, outside = shutil.copytree(tiny_model_dir, tmp_path / "ckpt"), tmp_path / "elsewhere"
    outside.mkdir()
    edit(d, outside)
    with pytest.raises((CheckpointError, ConfigError)) as e:
        _load(d)
    msg = str(e.value)
    assert "\n" not in msg and str(d / name) in msg, msg


def test_a_hugging_face_cache_snapshot_with_links_into_its_blobs_loads(tiny_model_dir, tmp_path):
    blobs, snap = tmp_path / "models--x" / "blobs", tmp_path / "models--x" / "snapshots" / "abc123"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    for i, f in enumerate(sorted(tiny_model_dir.iterdir())):
        shutil.copy(f, blobs / f"blob{i}")
        (snap / f.name).symlink_to(f"../../blobs/blob{i}")
    _load(snap)


def test_absurd_sizes_are_refused_by_validate_before_anything_is_built():
    from dataclasses import replace

    from nvlm.config import LIMITS
    from nvlm.presets import preset

    tiny = preset("tiny-d")
    for bad in (
        replace(tiny, llm=replace(tiny.llm, num_layers=10**7)),
        replace(tiny, vision=replace(tiny.vision, hidden_size=10**9)),
        replace(tiny, llm=replace(tiny.llm, num_heads=0)),
    ):
        with pytest.raises(ConfigError, match="must be an integer in"):
            NVLM(bad)
    assert LIMITS["num_layers"] >= 80 and LIMITS["hidden_size"] >= 8192  # the released 72B fits
