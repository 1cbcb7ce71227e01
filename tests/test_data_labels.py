"""Training records -> tokens and supervised positions, for every record kind and both prompt formats."""

import json

import pytest
from PIL import Image

from nvlm import Processor
from nvlm.data.blend import Blend, DataError, Source
from nvlm.data.labels import IGNORE, encode_example
from nvlm.data.packing import collate, padding_fraction
from nvlm.data.records import JsonlFile, RecordError, to_messages


@pytest.fixture(scope="module")
def processor(tiny_model_dir):
    return Processor.from_pretrained(tiny_model_dir)


def _supervised_text(processor, ex) -> str:
    ids = [int(t) for t in ex.targets if t != IGNORE]
    return processor.tokenizer.decode(ids)


RECORDS = {
    "messages": {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "image", "image": "a.png"}, {"type": "text", "text": "Color?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
            {"role": "user", "content": "Sure?"},
            {"role": "assistant", "content": "yes, red"},
        ]
    },
    "text-only": {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]},
    "llava": {
        "image": "a.png",
        "conversations": [{"from": "human", "value": "<image>\nColor?"}, {"from": "gpt", "value": "red"}],
    },
    "caption": {"image": "a.png", "caption": "a red square"},
    "vqa": {"image": "a.png", "question": "What color?", "answer": "red"},
}
ANSWERS = {
    "messages": ["red", "yes, red"],
    "text-only": ["4"],
    "llava": ["red"],
    "caption": ["a red square"],
    "vqa": ["red"],
}


@pytest.mark.parametrize("template", ["nvlm", "checkpoint"])
@pytest.mark.parametrize("kind", list(RECORDS))
def test_only_assistant_answers_are_supervised(kind, template, processor, tmp_path):
    Image.new("RGB", (100, 56), (200, 0, 0)).save(tmp_path / "a.png")
    processor = Processor(processor.tokenizer, processor.image_processor, processor.config, chat_template=template)
    messages = to_messages(RECORDS[kind], tmp_path)
    ex = encode_example(processor, messages, max_len=4096)
    # exactly each answer and the <|im_end|> closing it: no system/user text, no image tokens, no tags
    assert _supervised_text(processor, ex) == "".join(a + "<|im_end|>" for a in ANSWERS[kind])
    assert not ((ex.targets == processor.image_token_id).any())
    # the tokens are those of inference's prompt for the same conversation
    full = processor.apply_chat_template(messages, add_generation_prompt=False)
    assert full["input_ids"][0].tolist() == ex.input_ids.tolist()


def test_llava_image_marks_must_match_images(tmp_path):
    with pytest.raises(RecordError, match="marks"):
        to_messages({"image": ["a.png"], "conversations": [{"from": "human", "value": "<image><image>"}]}, tmp_path)


def test_packed_rows_number_their_documents_and_report_padding(processor, tmp_path):
    msgs = [to_messages(RECORDS["text-only"], tmp_path)] * 3
    examples = [encode_example(processor, m, 4096) for m in msgs]
    batch = collate(processor, [examples[:2], examples[2:]], seq_len=64)
    n = len(examples[0])
    assert batch["attention_mask"][0, :n].eq(1).all() and batch["attention_mask"][0, n : 2 * n].eq(2).all()
    assert padding_fraction(batch) == pytest.approx(1 - 3 * n / 128)


def _write(path, lines):
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))


def test_bad_records_are_skipped_and_counted(processor, tmp_path):
    Image.new("RGB", (56, 56)).save(tmp_path / "ok.png")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    good = {"image": "ok.png", "caption": "fine"}
    _write(
        tmp_path / "d.jsonl",
        [
            good,
            "{not json",
            {"image": "missing.png", "caption": "x"},
            {"image": "corrupt.png", "caption": "x"},
            {"messages": []},
            {"messages": [{"role": "user", "content": "a " * 3000}, {"role": "assistant", "content": "long"}]},
            {"messages": [{"role": "user", "content": "no answer"}]},
        ],
    )
    blend = Blend(processor, [Source(str(tmp_path / "d.jsonl"))], max_len=512)
    examples = [blend.next_example() for _ in range(5)]  # only the good record can come out
    assert all(_supervised_text(processor, e) == "fine<|im_end|>" for e in examples)
    reasons = set(blend.skipped)
    assert {"malformed JSON", "image", "empty conversation", "too long", "no assistant answer to learn from"} <= reasons
    assert sum(blend.skipped.values()) >= 6


def test_blend_weights_resume_and_ranks_share_nothing(processor, tmp_path):
    _write(
        tmp_path / "a.jsonl",
        [
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(20)
        ],
    )
    _write(
        tmp_path / "b.jsonl",
        [
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": f"b{i}"}]}
            for i in range(20)
        ],
    )
    sources = [Source(str(tmp_path / "a.jsonl"), 3.0), Source(str(tmp_path / "b.jsonl"), 1.0)]

    def answers(blend, n):
        return [_supervised_text(processor, blend.next_example()).removesuffix("<|im_end|>") for _ in range(n)]

    one = answers(Blend(processor, sources, 512, seed=1), 40)
    assert 22 <= sum(a.startswith("a") for a in one) <= 38  # about 3:1
    ranks = [answers(Blend(processor, sources, 512, seed=1, rank=r, world_size=2), 10) for r in range(2)]
    assert not set(ranks[0]) & set(ranks[1]) and sorted(ranks[0] + ranks[1]) == sorted(one[:20])
    blend = Blend(processor, sources, 512, seed=1)
    answers(blend, 13)
    saved = blend.state_dict()
    resumed = Blend(processor, sources, 512, seed=1)
    resumed.load_state_dict(json.loads(json.dumps(saved)))
    assert answers(resumed, 10) == one[13:23]


def test_jsonl_file_with_no_records_is_an_error(tmp_path):
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(RecordError):
        JsonlFile.read(tmp_path / "e.jsonl")


def _ok_user(text):
    return {"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": "ok"}]}


# one bad line each (a dict is written as JSON, bytes as they are) -> the reason it is counted under
BAD_LINES = {
    "<image> in a caption": ({"image": "ok.png", "caption": "a <image> here"}, "literal <image> text"),
    "<image> in a VQA answer": ({"image": "ok.png", "question": "What?", "answer": "<image>"}, "literal <image> text"),
    "two <image> in a VQA question, one image": (
        {"image": "ok.png", "question": "<image> or <image>?", "answer": "x"},
        "literal <image> text",
    ),
    "<image> in a messages record": (_ok_user("look: <image>"), "literal <image> text"),
    "<image> in a messages text part": (
        {
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "<image>"}]},
                {"role": "assistant", "content": "ok"},
            ]
        },
        "literal <image> text",
    ),
    "<image> in a LLaVA answer": (
        {"image": "ok.png", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "<image>"}]},
        "literal <image> text",
    ),
    "image token text in a question": (_ok_user("what is <|vision_pad|>?"), "image token text"),
    "image token text in a caption": ({"image": "ok.png", "caption": "x<|vision_pad|>"}, "image token text"),
    "image token text in a system prompt": (
        {"messages": [{"role": "system", "content": "<|vision_pad|>"}, *_ok_user("hi")["messages"]]},
        "image token text",
    ),
    "image as a number": ({"image": 5, "caption": "x"}, "bad image field"),
    "image as a dict": ({"image": {"path": "ok.png"}, "caption": "x"}, "bad image field"),
    "image list of numbers": ({"images": [1, 2], "question": "q", "answer": "a"}, "bad image field"),
    "LLaVA image as a number": (
        {"image": 3, "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "ok"}]},
        "bad image field",
    ),
    "image part with a number": (
        {
            "messages": [
                {"role": "user", "content": [{"type": "image", "image": 7}]},
                {"role": "assistant", "content": "ok"},
            ]
        },
        "bad image field",
    ),
    "image in an answer": (
        {
            "messages": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": [{"type": "image", "image": "ok.png"}]},
            ]
        },
        "image in an answer",
    ),
    "LLaVA role as a list": (
        {"conversations": [{"from": ["human"], "value": "hi"}, {"from": "gpt", "value": "ok"}]},
        "a LLaVA turn needs 'from' (human/gpt/system) and a string 'value'",
    ),
    "question as a number": ({"question": 3, "answer": "a"}, "bad question"),
    "a non-UTF-8 byte": (b'{"caption": "caf\xe9", "image": "ok.png"}', "not UTF-8"),
    "a list, not an object": (b"[1, 2]", "not a JSON object"),
    "a string, not an object": (b'"text"', "not a JSON object"),
    "deeply nested": (b"[" * 100_000 + b"]" * 100_000, "malformed JSON"),
    "an over-long integer": (b'{"caption": ' + b"9" * 5000 + b"}", "malformed JSON"),
}


@pytest.mark.parametrize("kind", list(BAD_LINES))
def test_each_bad_record_is_skipped_counted_and_reported_once_with_file_and_line(kind, processor, tmp_path, caplog):
    Image.new("RGB", (56, 56)).save(tmp_path / "ok.png")
    line, reason = BAD_LINES[kind]
    good = json.dumps({"image": "ok.png", "caption": "fine"}).encode()
    bad = line if isinstance(line, bytes) else json.dumps(line).encode()
    (tmp_path / "d.jsonl").write_bytes(good + b"\n\n" + bad + b"\n")  # the bad record is on line 3
    blend = Blend(processor, [Source(str(tmp_path / "d.jsonl"))], max_len=512)
    assert all(_supervised_text(processor, blend.next_example()) == "fine<|im_end|>" for _ in range(6))
    assert dict(blend.skipped) == {reason: blend.skipped[reason]} and blend.skipped[reason] >= 2
    reports = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and r.name == "nvlm.data.blend"]
    assert len(reports) == 1 and reports[0].startswith(f"skipping {tmp_path / 'd.jsonl'} line 3: {reason}")


def test_a_question_with_one_image_mark_per_image_is_the_plain_question(tmp_path):
    marked = to_messages({"image": "a.png", "question": "<image>\nWhat color?", "answer": "red"}, tmp_path)
    assert marked == to_messages({"image": "a.png", "question": "What color?", "answer": "red"}, tmp_path)


def test_encode_example_turns_prompt_errors_into_record_errors(processor):
    # the renderer's placeholder count does not match the images: a PromptError inside, a skip outside
    with pytest.raises(RecordError, match="bad conversation"):
        encode_example(processor, _ok_user("<image>")["messages"], 512)
    with pytest.raises(RecordError, match="bad conversation"):
        encode_example(
            processor, [{"role": "user", "content": [{"type": "video"}]}, {"role": "assistant", "content": "x"}], 512
        )


def test_a_line_separator_inside_a_string_does_not_split_the_record(tmp_path):
    rec = {"messages": [{"role": "user", "content": "a\u2028b\u0085c"}, {"role": "assistant", "content": "d"}]}
    (tmp_path / "d.jsonl").write_text(json.dumps(rec, ensure_ascii=False) + "\n", encoding="utf-8")
    f = JsonlFile.read(tmp_path / "d.jsonl")
    assert len(f) == 1 and f.messages(0)[0]["content"] == "a\u2028b\u0085c"


@pytest.mark.parametrize("max_len", [512, 8])
def test_a_blend_with_no_usable_record_fails_fast_naming_files_and_reasons(max_len, processor, tmp_path):
    _write(tmp_path / "a.jsonl", [_ok_user("<|vision_pad|>"), "{not json", {"image": 5, "caption": "x"}] * 20)
    _write(tmp_path / "b.jsonl", [_ok_user("q")] * 5)  # usable, but weight 0: never drawn
    _write(tmp_path / "c.jsonl", [{"caption": "x"}] if max_len == 8 else [_ok_user("a <image>")])
    sources = [
        Source(str(tmp_path / "a.jsonl")),
        Source(str(tmp_path / "b.jsonl"), 0.0),
        Source(str(tmp_path / "c.jsonl")),
    ]
    blend = Blend(processor, sources, max_len=max_len)
    with pytest.raises(DataError) as e:
        blend.next_example()
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path / "a.jsonl") in msg and str(tmp_path / "c.jsonl") in msg
    assert str(tmp_path / "b.jsonl") not in msg
    assert "image token text 20" in msg and "malformed JSON 20" in msg and "bad image field 20" in msg
    assert ("too long 1" if max_len == 8 else "literal <image> text 1") in msg
    assert blend.position < 20 * 61  # one pass's worth of misses, then the check: not a million retries


def test_one_usable_record_among_many_bad_ones_is_found(processor, tmp_path):
    _write(
        tmp_path / "a.jsonl",
        ["{bad"] * 200 + [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "yes"}]}],
    )
    blend = Blend(processor, [Source(str(tmp_path / "a.jsonl"))], max_len=512, seed=3)
    assert _supervised_text(processor, blend.next_example()) == "yes<|im_end|>"
    assert blend.skipped["malformed JSON"] > 0
