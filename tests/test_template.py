from pathlib import Path

import pytest

from nvlm.template import TEMPLATE, PromptError, parse_messages, render
from nvlm.tokenizer import QWEN25_CHAT_TEMPLATE, build_tiny_tokenizer

Q = "What is shown in this image?"


def msg(role: str, content: object) -> dict:
    return {"role": role, "content": content}


def user_with_image(question: str = Q, image: object = "cat.png") -> dict:
    return {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}


def test_spec_section_8_example_exactly() -> None:
    r = render([user_with_image()])
    assert r.text == (
        "<|im_start|>system\nAnswer the questions.<|im_end|>"
        f"<|im_start|>user\n<image>\n{Q}<|im_end|><|im_start|>assistant\n"
    )
    assert r.images == ["cat.png"]


def test_multi_turn_has_no_newline_between_turns() -> None:
    msgs = [user_with_image("Hi?"), {"role": "assistant", "content": "A cat."}, {"role": "user", "content": "Sure?"}]
    assert render(msgs).text == (
        "<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n<image>\nHi?<|im_end|>"
        "<|im_start|>assistant\nA cat.<|im_end|><|im_start|>user\nSure?<|im_end|><|im_start|>assistant\n"
    )
    assert render(msgs, add_generation_prompt=False).text.endswith("<|im_start|>user\nSure?<|im_end|>")


def test_system_message_overrides_the_default() -> None:
    msgs = [{"role": "system", "content": [{"type": "text", "text": "Be terse."}]}, {"role": "user", "content": "Hi"}]
    text = render(msgs).text
    assert text.startswith("<|im_start|>system\nBe terse.<|im_end|><|im_start|>user\nHi")
    assert "Answer the questions." not in text
    assert render([{"role": "user", "content": "Hi"}], system="S").text.startswith("<|im_start|>system\nS<|im_end|>")


def test_segments_tag_roles_for_training_labels() -> None:
    msgs = [msg("user", "Q1"), msg("assistant", "A1"), msg("user", "Q2"), msg("assistant", "A2")]
    r = render(msgs, add_generation_prompt=False)
    assert "".join(t for t, _ in r.segments) == r.text
    assert [t for t, role in r.segments if role == "assistant"] == ["A1<|im_end|>", "A2<|im_end|>"]
    assert [t for t, role in r.segments if role == "user"] == ["Q1", "Q2"]
    assert ("<|im_start|>assistant\n", TEMPLATE) not in r.segments  # headers merge into scaffolding
    assert all(role == TEMPLATE for t, role in r.segments if "<|im_start|>" in t)


def test_image_part_forms_and_order(tmp_path: Path) -> None:
    content = [
        {"type": "image", "image": b"raw"},
        {"type": "text", "text": "and"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
        {"type": "image_url", "image_url": "file:///x.png"},
        {"type": "image", "url": "u.png"},
        {"type": "image", "path": tmp_path},
        {"type": "text", "text": "?"},
    ]
    msgs = [{"role": "user", "content": content}, {"role": "assistant", "content": "ok"}, user_with_image(image="last")]
    r = render(msgs)
    assert r.images == [b"raw", "data:image/png;base64,AAAA", "file:///x.png", "u.png", tmp_path, "last"]
    assert "<|im_start|>user\n<image>\nand<image>\n<image>\n<image>\n<image>\n?<|im_end|>" in r.text
    assert r.text.count("<image>") == 6


@pytest.mark.parametrize(
    "messages, match",
    [
        ([], "non-empty"),
        (["hi"], "not a dict"),
        ([{"role": "robot", "content": "x"}], "role 'robot'"),
        ([{"role": "user"}], "no content"),
        ([{"role": "user", "content": None}], "no content"),
        ([{"role": "user", "content": [{"type": "audio", "audio": "a.wav"}]}], "unknown content part"),
        ([{"role": "user", "content": [{"type": "text"}]}], "unknown content part"),
        ([{"role": "user", "content": [{"type": "image"}]}], "no image, url or path"),
        ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], "first message"),
    ],
)
def test_malformed_messages(messages: list, match: str) -> None:
    with pytest.raises(PromptError, match=match):
        render(messages)
    assert issubclass(PromptError, ValueError)


def test_checkpoint_format_is_qwen25() -> None:
    r = render([user_with_image()], "checkpoint", jinja_template=QWEN25_CHAT_TEMPLATE)
    assert r.text == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        f"<|im_start|>user\n<image>\n{Q}<|im_end|>\n<|im_start|>assistant\n"
    )
    msgs = [msg("system", "Sys."), msg("user", "Hi"), msg("assistant", "Yo")]
    r = render(msgs, "checkpoint", jinja_template=QWEN25_CHAT_TEMPLATE, add_generation_prompt=False)
    assert r.text == (
        "<|im_start|>system\nSys.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nYo<|im_end|>\n"
    )
    assert [(t, role) for t, role in r.segments if role != TEMPLATE] == [
        ("Sys.", "system"),
        ("Hi", "user"),
        ("Yo<|im_end|>", "assistant"),
    ]


def test_checkpoint_format_matches_transformers() -> None:
    transformers = pytest.importorskip("transformers")
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        build_tiny_tokenizer().save(d)
        hf = transformers.AutoTokenizer.from_pretrained(d)
    msgs = [msg("user", "<image>\nA?"), msg("assistant", "B"), msg("user", "C")]
    want = hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert render(msgs, "checkpoint", jinja_template=QWEN25_CHAT_TEMPLATE).text == want


def test_checkpoint_template_errors() -> None:
    msgs = [{"role": "user", "content": "x"}]
    with pytest.raises(PromptError, match="no chat_template"):
        render(msgs, "checkpoint", jinja_template=None)
    with pytest.raises(PromptError, match="only users"):
        render(msgs, "checkpoint", jinja_template="{{ raise_exception('only users') }}")
    with pytest.raises(PromptError, match="not valid Jinja"):
        render(msgs, "checkpoint", jinja_template="{% if %}")
    with pytest.raises(PromptError, match="unknown prompt format"):
        render(msgs, "vicuna")  # type: ignore[arg-type]


def test_parse_messages_flattens() -> None:
    (m,) = parse_messages([user_with_image("Q")])
    assert (m.role, m.content, m.images) == ("user", "<image>\nQ", ("cat.png",))
