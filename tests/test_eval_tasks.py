"""Benchmark tasks: every loader on a tiny copy of its public format, prompts for both profiles, data errors."""

import json

import pytest
from eval_data import EXPECTED, build, custom, write_jsonl, write_parquet

from nvlm.eval.tasks import TASKS, DataError, MissingData, ParquetImage, get_task
from nvlm.eval.tasks.base import FOLLOW_SYSTEM, NVLM_SYSTEM, resolve_image
from nvlm.image import load_image


@pytest.fixture(scope="module")
def hf_root(tmp_path_factory):
    return build(tmp_path_factory.mktemp("eval-hf"), original=False)


@pytest.fixture(scope="module")
def orig_root(tmp_path_factory):
    return build(tmp_path_factory.mktemp("eval-orig"), original=True)


def _load(root, name):
    return TASKS[name].load(root)


@pytest.mark.parametrize("original", [False, True], ids=["hf", "original"])
@pytest.mark.parametrize("name", list(TASKS))
def test_every_task_loads_and_prompts(name, original, hf_root, orig_root):
    task = TASKS[name]
    samples = task.load(orig_root if original else hf_root)
    assert len(samples) == EXPECTED[name]
    assert len({s.id for s in samples}) == len(samples)
    for s in samples:
        for profile in ("official", "nvlm"):
            p = task.prompt(s, profile)
            assert p.text.count("<image>") == len(p.images)
            assert task.max_new_tokens(profile) >= 1
            for image in p.images:
                assert load_image(resolve_image(image)).size == (40, 30)
        assert task.max_new_tokens("nvlm") == (16 if task.first_line else task.max_new_tokens("official"))


def test_both_formats_read_the_same_questions(hf_root, orig_root):
    for name in (
        "ocrbench",
        "chartqa",
        "docvqa_val",
        "textvqa_val",
        "vqav2_val",
        "mmbench_en_dev",
        "mmlu",
        "gsm8k",
        "math",
        "humaneval",
        "flickr30k",
    ):
        a, b = _load(hf_root, name), _load(orig_root, name)
        assert [s.fields for s in a] == [s.fields for s in b], name


def test_megatron_vqa_prompt_and_official_suffixes(hf_root):
    """EVAL_SPEC 1.3 (NVLM-1.0 tag) and NVLM_SPEC 8 (Megatron HEAD)."""
    s = _load(hf_root, "vqav2_val")[0]
    nvlm = TASKS["vqav2_val"].prompt(s, "nvlm")
    assert (nvlm.system, nvlm.text) == (
        "Answer the questions.",
        "<image>\nHow many dogs?\nAnswer the question using a single word or phrase.",
    )
    official = TASKS["vqav2_val"].prompt(s, "official")
    assert official.system == "Follow the user's instruction and answer questions." == FOLLOW_SYSTEM
    assert official.text == nvlm.text
    t = _load(hf_root, "textvqa_val")[0]
    assert TASKS["textvqa_val"].prompt(t, "official").text == (
        "<image>\nwhat number is shown?\nAnswer the question using a single word, phrase, or number."
    )
    assert TASKS["textvqa_val"].prompt(t, "nvlm").text.endswith("\nAnswer the question using a single word or phrase.")
    d = _load(hf_root, "docvqa_val")[0]
    assert TASKS["docvqa_val"].prompt(d, "official").text.endswith("single word, phrase, or number.")
    c = _load(hf_root, "chartqa")[0]
    assert TASKS["chartqa"].prompt(c, "official").text == (
        "<image>\nWhat is the highest value?\nAnswer the question using a single word or phrase."
    )
    o = _load(hf_root, "ocrbench")[0]
    assert TASKS["ocrbench"].prompt(o, "nvlm").text == "<image>\nwhat is written in the image?"
    assert TASKS["ocrbench"].prompt(o, "official").system == FOLLOW_SYSTEM


def test_mmmu_prompts(hf_root):
    """MMMU ``construct_prompt`` with llava1.5.yaml as loaded by yaml.safe_load (its blank lines fold)."""
    mc, two, open_ = _load(hf_root, "mmmu_val")
    nvlm = TASKS["mmmu_val"].prompt(mc, "nvlm")
    assert nvlm.system == NVLM_SYSTEM
    assert nvlm.text == (
        "<image>\nWhat is shown in ?\n(A) a cat\n(B) a dog\n(C) 120 volts\n\n"
        "Answer with the option's letter from the given choices directly."
    )
    assert nvlm.images == mc.images[:1]
    assert TASKS["mmmu_val"].prompt(open_, "nvlm").text == (
        "<image>\nHow many squares are there?\nAnswer the question using a single word or phrase."
    )
    official = TASKS["mmmu_val"].prompt(two, "official")  # Megatron's multi-image path: tags become placeholders
    assert official.text.startswith("Compare <image> and <image>.\n(A) left\n(B) right\n\n")
    assert official.images == two.images[:2]
    assert [s.fields["subject"] for s in (mc, two, open_)] == ["Accounting", "Accounting", "Art_Theory"]
    assert [s.id for s in _load(hf_root, "mmmu_test")] == ["test_Accounting_1"]


def test_mathvista_ai2d_mmbench_caption_text_prompts(hf_root):
    mc, free, _ = _load(hf_root, "mathvista_testmini")
    p = TASKS["mathvista_testmini"].prompt(mc, "nvlm")
    assert (
        p.text
        == "<image>\nWhich is larger?\nA. 3\nB. 5\nAnswer with the option's letter from the given choices directly."
    )
    official = TASKS["mathvista_testmini"].prompt(free, "official")
    assert official.system == "You are math expert. Use your math knowledge to calculate the answer."
    assert official.text.startswith("<image>\nPlease answer the question requiring an integer answer")
    a = _load(hf_root, "ai2d")[1]
    assert TASKS["ai2d"].prompt(a, "official").text == (
        "<image>\nWhat eats grass?\nA. cow\nB. lion\nC. hawk\n"
        "Answer with the option's letter from the given choices directly."
    )
    assert a.fields["answer"] == "A" and _load(hf_root, "ai2d")[0].fields["answer"] == "B"
    m = _load(hf_root, "mmbench_en_dev")
    assert [s.id for s in m] == ["0", "1", "2"]  # the cn config beside it is not read
    assert (
        TASKS["mmbench_en_dev"]
        .prompt(m[1], "official")
        .text.startswith("<image>\nLook at both.\nWhich is bigger?\nA. left\nB. right\n")
    )
    assert m[0].fields["options"] == ["red", "green", "blue"]
    cap = _load(hf_root, "coco_caption")[0]
    assert (
        TASKS["coco_caption"].prompt(cap, "nvlm").text == "<image>\nProvide a one-sentence caption for provided image."
    )
    assert (
        TASKS["coco_caption"].prompt(cap, "official").text
        == "<image>\nGive a brief description of this image in one sentence."
    )
    assert TASKS["coco_caption"].postprocess(" A Red Square.\nmore", "nvlm") == "a red square"
    q = _load(hf_root, "mmlu")[0]
    assert TASKS["mmlu"].prompt(q, "official").text == (
        "The following is a multiple choice question about abstract algebra.\n\nFind the order of Z_4.\n"
        "A. 1\nB. 2\nC. 4\nD. 8\nAnswer with the option's letter from the given choices directly."
    )
    g = _load(hf_root, "gsm8k")[0]
    assert (
        TASKS["gsm8k"]
        .prompt(g, "nvlm")
        .text.endswith("\nPlease reason step by step, and put your final answer within \\boxed{}.")
    )
    assert TASKS["gsm8k"].postprocess("line one\nline two", "nvlm") == "line one\nline two"  # no first-line cut
    h = _load(hf_root, "humaneval")[0]
    hp = TASKS["humaneval"].prompt(h, "official")
    assert not hp.chat and hp.text == h.fields["prompt"] and hp.images == []
    assert (
        "\ndef" in TASKS["humaneval"].stop
        and TASKS["humaneval"].postprocess("    return 1\n", "nvlm") == "    return 1\n"
    )


def test_decoys_and_splits_are_not_read(hf_root, orig_root):
    assert [s.id for s in _load(hf_root, "docvqa_val")] == ["101", "102", "103"]  # not InfographicVQA's 999
    assert all(s.fields["answers"] == [] for s in _load(hf_root, "docvqa_test"))
    assert [s.id for s in _load(orig_root, "flickr30k")] == ["0", "1", "2"]  # the train image is left out
    assert _load(orig_root, "mmbench_en_dev")[2].images[0] == _load(orig_root, "mmbench_en_dev")[0].images[0]
    assert _load(orig_root, "ocrbench")[2].fields["answers"] == ["May 5", "5 May"]
    assert _load(orig_root, "ocrbench")[0].fields["answers"] == ["CENTRE"]
    assert _load(orig_root, "chartqa")[2].fields["type"] == "augmented" == _load(hf_root, "chartqa")[2].fields["type"]


def test_parquet_images_are_read_lazily_across_row_groups(hf_root):
    samples = _load(hf_root, "vqav2_val")  # 3 rows, 2 per row group
    last = samples[2].images[0]
    assert isinstance(last, ParquetImage) and last.row_group == 1 and last.row == 0
    assert load_image(resolve_image(last)).getpixel((0, 0)) == (240, 240, 240)  # COLORS[3]: image_id 3


def test_missing_data_names_the_expected_layout(tmp_path):
    with pytest.raises(MissingData, match=r"(?s)chartqa: no directory 'chartqa'.*expected:.*data/test-\*\.parquet"):
        TASKS["chartqa"].load(tmp_path)
    (tmp_path / "ChartQA").mkdir()  # found case-insensitively, but empty
    with pytest.raises(MissingData, match=r"test-\*\.parquet or test/test_human\.json not found"):
        TASKS["chartqa"].load(tmp_path)


def test_malformed_records_name_file_and_record(tmp_path):
    write_jsonl(tmp_path / "bad.jsonl", [{"id": "a", "question": "q?", "answer": "x"}, {"id": "b", "answer": "y"}])
    with pytest.raises(DataError, match=r"bad\.jsonl:2: missing field 'question'"):
        get_task(f"jsonl:{tmp_path / 'bad.jsonl'}").load()
    write_parquet(
        tmp_path / "chartqa" / "data" / "test-0.parquet", [{"question": "q", "image": {"bytes": b"x", "path": "p"}}]
    )
    with pytest.raises(DataError, match=r"test-0\.parquet \(row group 0, row 0\): missing field 'answer'"):
        TASKS["chartqa"].load(tmp_path)
    write_jsonl(tmp_path / "dup.jsonl", [{"id": "a", "question": "q", "answer": "x"}] * 2)
    with pytest.raises(DataError, match="duplicate sample id 'a'"):
        get_task(f"jsonl:{tmp_path / 'dup.jsonl'}").load()
    write_jsonl(tmp_path / "img.jsonl", [{"id": "a", "image": "nope.png", "question": "q", "answer": "x"}])
    with pytest.raises(DataError, match=r"img\.jsonl:1: image .*nope\.png not found"):
        get_task(f"jsonl:{tmp_path / 'img.jsonl'}").load()
    (tmp_path / "textvqa").mkdir()
    (tmp_path / "textvqa" / "TextVQA_0.5.1_val.json").write_text("{not json")
    with pytest.raises(DataError, match=r"TextVQA_0\.5\.1_val\.json: not valid JSON"):
        TASKS["textvqa_val"].load(tmp_path)


def test_custom_jsonl_task(tmp_path):
    path = custom(tmp_path)
    task = get_task(f"jsonl:{path}")
    assert task.name == "jsonl:heldout" and task.key == "jsonl_heldout"
    samples = task.load()
    assert [s.id for s in samples] == ["c0", "c1", "c2"]
    assert samples[1].fields["answers"] == ["green", "lime"] and samples[2].images == []
    assert task.prompt(samples[0], "official").text == "<image>\nWhat color is the square?"
    assert task.prompt(samples[2], "nvlm").text == "What is 2+2?"
    assert get_task(f"custom:{path}").name == "jsonl:heldout"
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        get_task("nope")


def test_submissions_for_hidden_answer_splits(hf_root):
    v = _load(hf_root, "vqav2_testdev")
    name, content = TASKS["vqav2_testdev"].submission(["2", "red", "yes"], v)
    assert name == "vqav2_testdev_submission.json"
    assert json.loads(content) == [
        {"question_id": 10, "answer": "2"},
        {"question_id": 20, "answer": "red"},
        {"question_id": 30, "answer": "yes"},
    ]
    d = _load(hf_root, "docvqa_test")
    assert json.loads(TASKS["docvqa_test"].submission(["a", "b", "c"], d)[1])[0] == {"questionId": 101, "answer": "a"}
    assert TASKS["vqav2_val"].submission(["x"] * 3, _load(hf_root, "vqav2_val")) is None
    assert not TASKS["mmmu_test"].has_answers and TASKS["mmmu_val"].has_answers
