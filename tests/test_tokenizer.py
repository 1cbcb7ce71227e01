import json
import subprocess
import sys
from pathlib import Path

import pytest

from nvlm.tokenizer import (
    QWEN25_ADDED_TOKENS,
    QWEN25_DEFAULT_SYSTEM,
    StreamDecoder,
    Tokenizer,
    TokenizerError,
    build_tiny_tokenizer,
)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def saved(tok: Tokenizer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("tok")
    tok.save(d)
    return d


def test_tiny_vocab_and_special_tokens(tok: Tokenizer) -> None:
    assert tok.vocab_size <= 512
    ids = [tok.token_to_id(t) for t, _ in QWEN25_ADDED_TOKENS]
    assert ids == list(range(ids[0], ids[0] + len(ids)))  # Qwen2.5's order, consecutive, at the end
    assert ids[-1] == tok.vocab_size - 1
    assert tok.token_to_id("<|vision_pad|>") == 500  # tests/conftest.py's IMAGE_TOKEN_ID
    assert tok.eos_token_id == tok.token_to_id("<|im_end|>")
    assert tok.pad_token_id == tok.token_to_id("<|endoftext|>")
    assert tok.bos_token_id is None and not tok.add_bos_token
    assert QWEN25_DEFAULT_SYSTEM in tok.chat_template


def test_tiny_is_deterministic_across_processes(tok: Tokenizer) -> None:
    code = "from nvlm.tokenizer import build_tiny_tokenizer as b; print(b().backend.to_str())"
    root = Path(__file__).resolve().parents[1]
    outs = {
        subprocess.run(
            [sys.executable, "-c", code],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
            env={"PYTHONHASHSEED": seed, "PATH": ""},
        ).stdout.strip()
        for seed in ("1", "2")
    }
    assert outs == {tok.backend.to_str()}


def test_encode_adds_nothing_and_recognises_special_tokens(tok: Tokenizer) -> None:
    ids = tok.encode("<|im_start|>user\nHi<|im_end|>")
    assert ids[0] == tok.token_to_id("<|im_start|>") and ids[-1] == tok.token_to_id("<|im_end|>")
    assert tok.encode("") == []
    assert tok.decode(ids) == "<|im_start|>user\nHi<|im_end|>"
    assert tok.decode(ids, skip_special_tokens=True) == "user\nHi"


def test_image_tags_are_plain_text(tok: Tokenizer) -> None:
    # vLLM's comment on the real Qwen tokenizer: "<Image><tile" -> ["<Image", "><", "tile"]
    assert [tok.id_to_token(i) for i in tok.encode("<Image><tile")] == ["<Image", "><", "tile"]
    for tag in ("<Image>", "</Image>", "<tile_1>", "<tile_global_thumbnail>"):
        assert len(tok.encode(tag)) > 1
    with pytest.raises(TokenizerError):
        tok.token_to_id("<Image>")


def test_save_and_reload(tok: Tokenizer, saved: Path) -> None:
    assert {p.name for p in saved.iterdir()} == {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}
    back = Tokenizer.from_pretrained(saved)
    text = "<|im_start|>system\nHello, wörld! 你好 😀<|im_end|>"
    assert back.encode(text) == tok.encode(text)
    assert (back.eos_token_id, back.pad_token_id, back.bos_token_id) == (tok.eos_token_id, tok.pad_token_id, None)
    assert back.chat_template == tok.chat_template and back.vocab_size == tok.vocab_size
    smap = json.loads((saved / "special_tokens_map.json").read_text())
    assert smap["eos_token"]["content"] == "<|im_end|>" and "<|vision_pad|>" in smap["additional_special_tokens"]


def test_transformers_reads_the_same_tokenizer(tok: Tokenizer, saved: Path) -> None:
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(saved)
    text = "<|im_start|>user\n<Image><tile_1><|vision_pad|></Image>\nWhat's this? 猫<|im_end|>"
    assert hf(text)["input_ids"] == tok.encode(text)
    assert (hf.eos_token_id, hf.pad_token_id, hf.bos_token_id) == (tok.eos_token_id, tok.pad_token_id, None)


def test_config_variants(tok: Tokenizer, saved: Path, tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text((saved / "tokenizer.json").read_text())
    cfg = {"eos_token": {"content": "<|endoftext|>"}, "chat_template": [{"name": "default", "template": "X"}]}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    t = Tokenizer.from_pretrained(tmp_path)
    assert t.eos_token_id == tok.token_to_id("<|endoftext|>") and t.chat_template == "X"
    (tmp_path / "tokenizer_config.json").write_text("{}")
    (tmp_path / "chat_template.jinja").write_text("{{ 'Y' }}")
    assert Tokenizer.from_pretrained(tmp_path).chat_template == "{{ 'Y' }}"


def test_bad_directories(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match=r"no tokenizer\.json"):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError):
        Tokenizer.from_pretrained(tmp_path)


@pytest.mark.parametrize("text", ["Hello 😀 world 🎉!", "你好，世界。猫在椅子上。", "naïve café — ok ✓ 🇫🇷"])
def test_stream_decoder_matches_full_decode(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text + "<|im_end|>")
    dec = StreamDecoder(tok)
    deltas = [dec.feed(i) for i in ids]
    assert "".join(deltas) + dec.flush() == tok.decode(ids) == text + "<|im_end|>"
    assert not any("\ufffd" in d for d in deltas)
    assert "" in deltas[:-1]  # some multi-byte characters were held back until complete
    skip = StreamDecoder(tok, skip_special_tokens=True)
    assert "".join(skip.feed(i) for i in ids) == text and skip.text == text


def test_stream_decoder_flushes_an_incomplete_tail(tok: Tokenizer) -> None:
    ids = tok.encode("ok 😀")
    dec = StreamDecoder(tok)
    out = "".join(dec.feed(i) for i in ids[:-1])  # the emoji's last byte never comes
    assert out == "ok " and dec.flush() == tok.decode(ids[:-1])[len("ok ") :]
