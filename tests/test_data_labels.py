"""Training records -> tokens and supervised positions, for every record kind and both prompt formats."""

import json

import pytest
from PIL import Image

from nvlm import Processor
from nvlm.data.blend import Blend, Source
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
    "messages": {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image", "image": "a.png"}, {"type": "text", "text": "Color?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
        {"role": "user", "content": "Sure?"}, {"role": "assistant", "content": "yes, red"}]},
    "text-only": {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]},
    "llava": {"image": "a.png", "conversations": [{"from": "human", "value": "<image>\nColor?"},
                                                  {"from": "gpt", "value": "red"}]},
    "caption": {"image": "a.png", "caption": "a red square"},
    "vqa": {"image": "a.png", "question": "What color?", "answer": "red"},
}  # fmt: skip
ANSWERS = {"messages": ["red", "yes, red"], "text-only": ["4"], "llava": ["red"], "caption": ["a red square"], "vqa": ["red"]}


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
    _write(tmp_path / "d.jsonl", [
        good,
        "{not json",
        {"image": "missing.png", "caption": "x"},
        {"image": "corrupt.png", "caption": "x"},
        {"messages": []},
        {"messages": [{"role": "user", "content": "a " * 3000}, {"role": "assistant", "content": "long"}]},
        {"messages": [{"role": "user", "content": "no answer"}]},
    ])  # fmt: skip
    blend = Blend(processor, [Source(str(tmp_path / "d.jsonl"))], max_len=512)
    examples = [blend.next_example() for _ in range(5)]  # only the good record can come out
    assert all(_supervised_text(processor, e) == "fine<|im_end|>" for e in examples)
    reasons = set(blend.skipped)
    assert {"malformed JSON (Expecting property name enclosed in double quotes)", "image", "empty conversation",
            "too long", "no assistant answer to learn from"} <= reasons  # fmt: skip
    assert sum(blend.skipped.values()) >= 6


def test_blend_weights_resume_and_ranks_share_nothing(processor, tmp_path):
    _write(tmp_path / "a.jsonl", [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": f"a{i}"}]} for i in range(20)])
    _write(tmp_path / "b.jsonl", [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": f"b{i}"}]} for i in range(20)])
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
