"""Tiny copies of every benchmark in its public distribution's format, written at test time.

``build(root, original=False)`` writes the HF parquet layouts (image columns as ``{"bytes", "path"}``
structs, two rows per row group so that the lazy reader crosses row groups); ``original=True`` writes the
original JSON/CSV/JSONL releases where the task reads one (the others stay parquet). ``EXPECTED`` gives each
task's sample count and the gold answer per sample id, for the tests to check what the loaders read.
"""

import gzip
import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
COLORS = [(220, 20, 20), (20, 200, 20), (20, 20, 220), (240, 240, 240), (10, 10, 10)]


def png(i: int = 0, size: tuple[int, int] = (40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, COLORS[i % len(COLORS)]).save(buf, "PNG")
    return buf.getvalue()


def cell(i: int = 0) -> dict:
    return {"bytes": png(i), "path": f"{i}.png"}


def write_parquet(path: Path, rows: list[dict], images: tuple[str, ...] = ("image",)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    names = list(rows[0])
    types = {n: IMAGE for n in names if n in images}
    table = pa.Table.from_pylist(rows, schema=_schema(rows, types))
    pq.write_table(table, path, row_group_size=2)


def _schema(rows: list[dict], forced: dict) -> pa.Schema:
    inferred = pa.Table.from_pylist([{k: v for k, v in r.items() if k not in forced} for r in rows]).schema
    return pa.schema([pa.field(n, forced[n]) if n in forced else inferred.field(n) for n in rows[0]])


def write_png(path: Path, i: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png(i))


def write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


# ------------------------------------------------------------------------------------- per benchmark

VQA_ANSWERS = [["2"] * 10, ["red"] * 7 + ["dark red"] * 3, ["yes"] * 10]


def mmmu(root: Path, original: bool) -> None:
    d = root / "MMMU"  # matched case-insensitively
    val = [
        {
            "id": "validation_Accounting_1",
            "question": "What is shown in <image 1>?",
            "options": "['a cat', 'a dog', '120 volts']",
            "answer": "C",
            "question_type": "multiple-choice",
            "subfield": "x",
        },
        {
            "id": "validation_Accounting_2",
            "question": "Compare <image 1> and <image 2>.",
            "options": "['left', 'right']",
            "answer": "B",
            "question_type": "multiple-choice",
            "subfield": "x",
        },
    ]
    art = [
        {
            "id": "validation_Art_Theory_1",
            "question": "How many squares are there?",
            "options": "[]",
            "answer": "30",
            "question_type": "open",
            "subfield": "y",
        }
    ]
    test = [
        {
            "id": "test_Accounting_1",
            "question": "<image 1> shows?",
            "options": "['x', 'y']",
            "answer": "?",
            "question_type": "multiple-choice",
            "subfield": "x",
        }
    ]
    for path, rows in (
        ("Accounting/validation-00000-of-00001.parquet", val),
        ("Art_Theory/validation-00000-of-00001.parquet", art),
        ("Accounting/test-00000-of-00001.parquet", test),
    ):
        for i, r in enumerate(rows):
            r.update({f"image_{k}": (cell(i + k) if k <= 2 else None) for k in range(1, 8)})
        write_parquet(d / path, rows, tuple(f"image_{k}" for k in range(1, 8)))


def mathvista(root: Path, original: bool) -> None:
    rows = [
        {
            "pid": "1",
            "question": "Which is larger?",
            "query": "Hint: Please answer the question and provide the correct option letter, e.g., A, B, C, D, at the "
            "end.\nQuestion: Which is larger?\nChoices:\n(A) 3\n(B) 5",
            "choices": ["3", "5"],
            "answer": "5",
            "question_type": "multi_choice",
            "answer_type": "text",
            "precision": None,
            "unit": None,
        },
        {
            "pid": "2",
            "query": "Hint: Please answer the question requiring an integer answer and provide the final value, e.g., "
            "1, 2, 3, at the end.\nQuestion: How many?",
            "question": "How many?",
            "choices": None,
            "answer": "14",
            "question_type": "free_form",
            "answer_type": "integer",
            "precision": None,
            "unit": None,
        },
        {
            "pid": "3",
            "query": "Hint: Please answer the question requiring a floating-point number with two decimal places and "
            "provide the final value, e.g., 1.23, 1.34, 1.45, at the end.\nQuestion: What is x?",
            "question": "What is x?",
            "choices": None,
            "answer": "3.14",
            "question_type": "free_form",
            "answer_type": "float",
            "precision": 2.0,
            "unit": None,
        },
    ]
    for i, r in enumerate(rows):
        r.update({"image": f"images/{r['pid']}.jpg", "decoded_image": cell(i)})
    write_parquet(root / "mathvista" / "data" / "testmini-00000-of-00001.parquet", rows, ("decoded_image",))


def ocrbench(root: Path, original: bool) -> None:
    items = [
        ("IIIT5K", "Regular Text Recognition", "what is written in the image?", ["CENTRE"]),
        (
            "HME100k",
            "Handwritten Mathematical Expression Recognition",
            "Please write out the expression.",
            ["x ^ { 2 }"],
        ),
        ("docVQA", "Doc-oriented VQA", "What is the date?", ["May 5", "5 May"]),
    ]
    d = root / "ocrbench"
    if original:
        recs = []
        for i, (name, kind, q, a) in enumerate(items):
            write_png(d / "OCRBench_Images" / name / f"{i}.png", i)
            recs.append(
                {
                    "dataset_name": name,
                    "id": i,
                    "image_path": f"{name}/{i}.png",
                    "question": q,
                    "answers": a if len(a) > 1 else a[0],
                    "type": kind,
                }
            )
        write_json(d / "OCRBench.json", recs)
    else:
        rows = [
            {"dataset": n, "question": q, "question_type": k, "answer": a, "image": cell(i)}
            for i, (n, k, q, a) in enumerate(items)
        ]
        write_parquet(d / "data" / "test-00000-of-00001.parquet", rows)


def ai2d(root: Path, original: bool) -> None:
    for dirname in ("ai2d", "ai2d-no-mask"):
        rows = [
            {"question": "Which label is the sun?", "options": ["A", "B", "C", "D"], "answer": "1", "image": cell(0)},
            {"question": "What eats grass?", "options": ["cow", "lion", "hawk"], "answer": "0", "image": cell(1)},
            {
                "question": "Which stage comes last?",
                "options": ["egg", "larva", "pupa", "adult"],
                "answer": "3",
                "image": cell(2),
            },
        ]
        write_parquet(root / dirname / "data" / "test-00000-of-00001.parquet", rows)


CHARTQA = [
    ("human", "What is the highest value?", "45"),
    ("human", "Which year is lowest?", "2018"),
    ("augmented", "What is the value of blue?", "10.5"),
]


def chartqa(root: Path, original: bool) -> None:
    d = root / "chartqa"
    if original:
        for kind in ("human", "augmented"):
            recs = []
            for i, (k, q, a) in enumerate(CHARTQA):
                if k == kind:
                    write_png(d / "test" / "png" / f"{i}.png", i)
                    recs.append({"imgname": f"{i}.png", "query": q, "label": a})
            write_json(d / "test" / f"test_{kind}.json", recs)
    else:
        rows = [
            {"type": f"{k}_test", "question": q, "answer": a, "image": cell(i)} for i, (k, q, a) in enumerate(CHARTQA)
        ]
        write_parquet(d / "data" / "test-00000-of-00001.parquet", rows)


def docvqa(root: Path, original: bool) -> None:
    d = root / "docvqa"
    qs = [
        (101, "What is the title?", ["Coca Cola", "Coca Cola Company"]),
        (102, "What is the total?", ["$5"]),
        (103, "Who signed?", ["J. Smith"]),
    ]
    if original:
        data = []
        for i, (qid, q, a) in enumerate(qs):
            write_png(d / "documents" / f"doc{i}.png", i)
            data.append(
                {
                    "questionId": qid,
                    "question": q,
                    "image": f"documents/doc{i}.png",
                    "answers": a,
                    "docId": i,
                    "question_types": ["form"],
                }
            )
        write_json(d / "val_v1.0_withQT.json", {"dataset_name": "docvqa", "dataset_split": "val", "data": data})
        test = [dict(x, answers=None) for x in data]
        write_json(d / "test_v1.0.json", {"dataset_name": "docvqa", "dataset_split": "test", "data": test})
        return
    rows = [
        {"questionId": str(qid), "question": q, "answers": a, "image": cell(i), "data_split": "val"}
        for i, (qid, q, a) in enumerate(qs)
    ]
    write_parquet(d / "DocVQA" / "validation-00000-of-00001.parquet", rows)
    write_parquet(d / "DocVQA" / "test-00000-of-00001.parquet", [dict(r, answers=None) for r in rows])
    decoy = [
        {"questionId": "999", "question": "infographic?", "answers": ["no"], "image": cell(0), "data_split": "val"}
    ]
    write_parquet(d / "InfographicVQA" / "validation-00000-of-00001.parquet", decoy)


def textvqa(root: Path, original: bool) -> None:
    d = root / "textvqa"
    qs = [
        (1, "what number is shown?", VQA_ANSWERS[0]),
        (2, "what color is the sign?", VQA_ANSWERS[1]),
        (3, "is it open?", VQA_ANSWERS[2]),
    ]
    if original:
        data = []
        for i, (qid, q, a) in enumerate(qs):
            write_png(d / "train_images" / f"img{i}.jpg", i)  # PNG bytes under .jpg, as PIL reads either
            data.append({"question_id": qid, "question": q, "answers": a, "image_id": f"img{i}", "set_name": "val"})
        write_json(d / "TextVQA_0.5.1_val.json", {"dataset_type": "val", "dataset_name": "textvqa", "data": data})
    else:
        rows = [
            {"image_id": f"img{i}", "question_id": qid, "question": q, "answers": a, "image": cell(i)}
            for i, (qid, q, a) in enumerate(qs)
        ]
        write_parquet(d / "data" / "validation-00000-of-00001.parquet", rows)


def realworldqa(root: Path, original: bool) -> None:
    rows = [
        {
            "question": "Which object is closer?\nA. the car\nB. the tree\n"
            "Please answer directly with only the letter of the correct option and nothing else.",
            "answer": "A",
            "image": cell(0),
        },
        {
            "question": "How many lanes are there? Please answer directly with a single word or number.",
            "answer": "2",
            "image": cell(1),
        },
        {
            "question": "Is the light green? Please answer directly with a single word or number.",
            "answer": "Yes",
            "image": cell(2),
        },
    ]
    write_parquet(root / "realworldqa" / "data" / "test-00000-of-00001.parquet", rows)


def vqav2(root: Path, original: bool) -> None:
    d = root / "vqav2"
    qs = [
        (10, 1, "How many dogs?", VQA_ANSWERS[0], "number"),
        (20, 2, "What color is the bus?", VQA_ANSWERS[1], "other"),
        (30, 3, "Is it sunny?", VQA_ANSWERS[2], "yes/no"),
    ]
    if original:
        write_json(
            d / "v2_OpenEnded_mscoco_val2014_questions.json",
            {"questions": [{"image_id": im, "question": q, "question_id": qid} for qid, im, q, _, _ in qs]},
        )
        write_json(
            d / "v2_mscoco_val2014_annotations.json",
            {
                "annotations": [
                    {
                        "question_id": qid,
                        "image_id": im,
                        "answer_type": t,
                        "multiple_choice_answer": a[0],
                        "answers": [
                            {"answer": x, "answer_confidence": "yes", "answer_id": j + 1} for j, x in enumerate(a)
                        ],
                    }
                    for qid, im, _, a, t in qs
                ]
            },
        )
        write_json(
            d / "v2_OpenEnded_mscoco_test-dev2015_questions.json",
            {"questions": [{"image_id": im, "question": q, "question_id": qid} for qid, im, q, _, _ in qs]},
        )
        for _, im, _, _, _ in qs:
            write_png(d / "val2014" / f"COCO_val2014_{im:012d}.jpg", im)
            write_png(d / "test2015" / f"COCO_test2015_{im:012d}.jpg", im)
        return
    rows = [
        {
            "question_type": "how many",
            "multiple_choice_answer": a[0],
            "answers": [{"answer": x, "answer_confidence": "yes", "answer_id": j + 1} for j, x in enumerate(a)],
            "image_id": im,
            "answer_type": t,
            "question_id": qid,
            "question": q,
            "image": cell(im),
        }
        for qid, im, q, a, t in qs
    ]
    write_parquet(d / "data" / "validation-00000-of-00001.parquet", rows)
    write_parquet(
        d / "data" / "testdev-00000-of-00001.parquet",
        [dict(r, answers=None, multiple_choice_answer=None, answer_type=None) for r in rows],
    )


def mmbench(root: Path, original: bool) -> None:
    import base64
    import csv

    d = root / "mmbench"
    rows = [
        {
            "index": 0,
            "question": "What color is the square?",
            "hint": None,
            "A": "red",
            "B": "green",
            "C": "blue",
            "D": None,
            "answer": "A",
            "category": "color",
            "image": cell(0),
        },
        {
            "index": 1,
            "question": "Which is bigger?",
            "hint": "Look at both.",
            "A": "left",
            "B": "right",
            "C": None,
            "D": None,
            "answer": "B",
            "category": "size",
            "image": cell(1),
        },
        {
            "index": 2,
            "question": "What shape?",
            "hint": None,
            "A": "circle",
            "B": "square",
            "C": "star",
            "D": "line",
            "answer": "B",
            "category": "shape",
            "image": cell(2),
        },
    ]
    if original:
        d.mkdir(parents=True, exist_ok=True)
        with open(d / "MMBench_DEV_EN.tsv", "w", newline="") as f:
            w = csv.writer(f, delimiter="\t")
            w.writerow(["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image"])
            for r in rows:
                image = (
                    base64.b64encode(r["image"]["bytes"]).decode() if r["index"] != 2 else "0"
                )  # row 2 shares row 0's
                w.writerow(
                    [
                        r["index"],
                        r["question"],
                        r["hint"] or "nan",
                        r["A"],
                        r["B"],
                        r["C"] or "",
                        r["D"] or "",
                        r["answer"],
                        r["category"],
                        image,
                    ]
                )
        return
    write_parquet(d / "en" / "dev-00000-of-00001.parquet", rows)
    write_parquet(d / "cn" / "dev-00000-of-00001.parquet", [dict(r, index=r["index"] + 100) for r in rows])


CAPTIONS = [
    ["a red square", "a red block", "red"],
    ["a green square", "green box", "a green tile"],
    ["a blue square", "blue", "a blue shape"],
]


def captions(root: Path, original: bool) -> None:
    coco, flickr = root / "coco", root / "flickr30k"
    if original:
        recs = []
        for i, caps in enumerate(CAPTIONS):
            name = f"val2014/COCO_val2014_{i + 1:012d}.jpg"
            write_png(coco / name, i)
            recs.append({"image": name, "caption": caps})
        write_json(coco / "coco_karpathy_test.json", recs)
        images = []
        for i, caps in enumerate([*CAPTIONS, ["not in the test split"]]):
            write_png(flickr / "flickr30k-images" / f"{1000 + i}.jpg", i)
            images.append(
                {
                    "filename": f"{1000 + i}.jpg",
                    "imgid": i,
                    "split": "test" if i < 3 else "train",
                    "sentences": [{"raw": c, "tokens": c.split()} for c in caps],
                }
            )
        write_json(flickr / "dataset_flickr30k.json", {"images": images, "dataset": "flickr30k"})
        return
    write_parquet(
        coco / "data" / "val-00000-of-00001.parquet",
        [
            {
                "question_id": f"{i + 1:012d}.jpg",
                "image": cell(i),
                "question": "Describe.",
                "answer": caps,
                "file_name": f"{i + 1:012d}.jpg",
            }
            for i, caps in enumerate(CAPTIONS)
        ],
    )
    write_parquet(
        flickr / "data" / "test-00000-of-00001.parquet",
        [
            {"image": cell(i), "caption": caps, "img_id": str(i), "filename": f"{1000 + i}.jpg"}
            for i, caps in enumerate(CAPTIONS)
        ],
    )


MMLU = [
    ("abstract_algebra", "Find the order of Z_4.", ["1", "2", "4", "8"], "C"),
    ("abstract_algebra", "Is Z_2 a field?", ["Yes", "No", "Maybe", "Never"], "A"),
    ("anatomy", "How many bones are in the adult human body?", ["206", "201", "300", "150"], "A"),
]


def mmlu(root: Path, original: bool) -> None:
    import csv

    d = root / "mmlu"
    if original:
        for subject in ("abstract_algebra", "anatomy"):
            (d / "data" / "test").mkdir(parents=True, exist_ok=True)
            with open(d / "data" / "test" / f"{subject}_test.csv", "w", newline="") as f:
                w = csv.writer(f)
                for s, q, c, a in MMLU:
                    if s == subject:
                        w.writerow([q, *c, a])
        return
    write_parquet(
        d / "all" / "test-00000-of-00001.parquet",
        [{"question": q, "subject": s, "choices": c, "answer": "ABCD".index(a)} for s, q, c, a in MMLU],
        (),
    )


GSM8K = [
    (
        "Janet's ducks lay 16 eggs per day. She eats three and bakes with four. She sells the rest at $2. "
        "How much does she make?",
        "16 - 3 - 4 = <<16-3-4=9>>9\n9 * 2 = <<9*2=18>>18\n#### 18",
    ),
    ("What is 1,000 + 234?", "#### 1,234"),
    ("What is -7 / 2?", "#### -3.5"),
]


def gsm8k(root: Path, original: bool) -> None:
    rows = [{"question": q, "answer": a} for q, a in GSM8K]
    if original:
        write_jsonl(root / "gsm8k" / "test.jsonl", rows)
    else:
        write_parquet(root / "gsm8k" / "main" / "test-00000-of-00001.parquet", rows, ())
        write_parquet(root / "gsm8k" / "socratic" / "test-00000-of-00001.parquet", rows, ())  # not read


MATH = [
    ("algebra", "1", "What is $1+1$?", "We get $\\boxed{2}$."),
    ("algebra", "2", "Simplify $\\frac{2}{4}$.", "It is $\\boxed{\\frac{1}{2}}$."),
    ("geometry", "7", "A square has side 3. Area?", "Area is $\\boxed{9}$."),
]


def math(root: Path, original: bool) -> None:
    for kind, n, problem, solution in MATH:
        rec = {"problem": problem, "level": "Level 1", "type": kind.title(), "solution": solution}
        if original:
            write_json(root / "math" / "test" / kind / f"{n}.json", rec)
    if not original:
        for kind in ("algebra", "geometry"):
            rows = [
                {"problem": p, "level": "Level 1", "type": k.title(), "solution": s} for k, _, p, s in MATH if k == kind
            ]
            write_parquet(root / "math" / kind / "test-00000-of-00001.parquet", rows, ())


HUMANEVAL = [
    {
        "task_id": "HumanEval/0",
        "prompt": 'def add(a, b):\n    """Return a + b."""\n',
        "canonical_solution": "    return a + b\n",
        "test": "def check(candidate):\n    assert candidate(1, 2) == 3\n",
        "entry_point": "add",
    },
    {
        "task_id": "HumanEval/1",
        "prompt": 'def one():\n    """Return 1."""\n',
        "canonical_solution": "    return 1\n",
        "test": "def check(candidate):\n    assert candidate() == 1\n",
        "entry_point": "one",
    },
]


def humaneval(root: Path, original: bool) -> None:
    d = root / "humaneval"
    if original:
        d.mkdir(parents=True, exist_ok=True)
        with gzip.open(d / "HumanEval.jsonl.gz", "wt") as f:
            f.write("".join(json.dumps(r) + "\n" for r in HUMANEVAL))
    else:
        write_parquet(d / "openai_humaneval" / "test-00000-of-00001.parquet", HUMANEVAL, ())


def custom(root: Path) -> Path:
    d = root / "custom"
    for i in range(3):
        write_png(d / "images" / f"{i}.png", i)
    rows = [
        {"id": "c0", "image": "images/0.png", "question": "What color is the square?", "answer": "red"},
        {"id": "c1", "image": "images/1.png", "question": "Which color is this square?", "answers": ["green", "lime"]},
        {"id": "c2", "question": "What is 2+2?", "answer": "4"},
    ]
    write_jsonl(d / "heldout.jsonl", rows)
    return d / "heldout.jsonl"


BUILDERS = [
    mmmu,
    mathvista,
    ocrbench,
    ai2d,
    chartqa,
    docvqa,
    textvqa,
    realworldqa,
    vqav2,
    mmbench,
    captions,
    mmlu,
    gsm8k,
    math,
    humaneval,
]

# task -> number of samples the loader must find (decoys excluded)
EXPECTED = {
    "mmmu_val": 3,
    "mmmu_test": 1,
    "mathvista_testmini": 3,
    "ocrbench": 3,
    "ai2d": 3,
    "ai2d_no_mask": 3,
    "chartqa": 3,
    "docvqa_val": 3,
    "docvqa_test": 3,
    "textvqa_val": 3,
    "realworldqa": 3,
    "vqav2_val": 3,
    "vqav2_testdev": 3,
    "mmbench_en_dev": 3,
    "coco_caption": 3,
    "flickr30k": 3,
    "mmlu": 3,
    "gsm8k": 3,
    "math": 3,
    "humaneval": 2,
}


def build(root: Path, original: bool = False) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for b in BUILDERS:
        b(root, original)
    custom(root)
    return root
