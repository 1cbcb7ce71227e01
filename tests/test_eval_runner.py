"""``nvlm eval`` end to end on tiny models: every task, D/X/H, resuming from the cache, sharding, known scores."""

import importlib.util
import json
import threading

import pytest
from conftest import open_gates
from eval_data import build, custom

import nvlm.eval.runner as runner
from nvlm import NVLM, Processor
from nvlm.cli import main
from nvlm.eval.runner import EvalConfig, Runner, generate_batch, rank_world, shard
from nvlm.eval.tasks import TASKS, Prompt, get_task

HAVE_SANDBOX = importlib.util.find_spec("nvlm.eval.sandbox") is not None


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = build(tmp_path_factory.mktemp("eval-data"))
    return root


@pytest.fixture(scope="module")
def xh_dirs(tiny_model_dir, tmp_path_factory):
    """Tiny NVLM-X and NVLM-H checkpoints (open gates, so the cross-attention counts) that stand alone."""
    out = {}
    for arch in "XH":
        model = NVLM.from_pretrained(tiny_model_dir, arch=arch)
        open_gates(model)
        path = tmp_path_factory.mktemp(f"eval-{arch}") / "model"
        model.save_pretrained(path)
        out[arch] = path
    return out


def _eval(model, data, out, *extra):
    return main(
        [
            "eval",
            "--model",
            str(model),
            "--data",
            str(data),
            "--out",
            str(out),
            "--max-new-tokens",
            "4",
            "--batch-size",
            "4",
            *extra,
        ]
    )


class Counter:
    """Counts generate_batch calls and samples; optionally fails on a given call, like a killed run."""

    def __init__(self, fail_on=None, answers=None, fake=False):
        self.calls, self.samples, self.fail_on, self.answers, self.budgets = 0, 0, fail_on, answers, []
        self.fake, self.templates = fake, []

    def __call__(self, model, processor, prompts, max_new_tokens, stop=(), template=None):
        self.calls += 1
        if self.calls == self.fail_on:
            raise RuntimeError("simulated crash")
        self.samples += len(prompts)
        self.budgets.append((prompts[0].text, max_new_tokens, tuple(stop)))
        self.templates.append(template)
        if self.answers is not None:
            return [self.answers[p.text] for p in prompts]
        if self.fake:
            return ["x"] * len(prompts)
        return generate_batch(model, processor, prompts, max_new_tokens, stop, template)


def test_every_task_end_to_end(tiny_model_dir, data, tmp_path):
    heldout = custom(tmp_path)
    rc = _eval(tiny_model_dir, data, tmp_path / "out", "--tasks", f"all,jsonl:{heldout}")
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    names = [*TASKS, "jsonl:heldout"]
    assert list(results["tasks"]) == names
    errors = {n: r["error"] for n, r in results["tasks"].items() if "error" in r}
    assert errors == ({} if HAVE_SANDBOX else {"humaneval": errors.get("humaneval")}), errors
    assert rc == (0 if HAVE_SANDBOX else 1)
    assert results["arch"] == "D" and results["profile"] == "official"
    table = (tmp_path / "out" / "results.md").read_text()
    for name in names:
        assert f"\n| {name} |" in table
    assert "| Task | Metric | n | Ours | NVLM-D 72B | NVLM-X 72B | NVLM-H 72B | NVLM-D 72B (HF) | Notes |" in table
    assert "| chartqa | relaxed_overall | 3 | " in table and "| **86.0** | 82.9 | 83.3 | 86.0 |" in table
    for name in ("mmmu_test", "vqav2_testdev", "docvqa_test"):
        assert (tmp_path / "out" / "submissions" / f"{name}_submission.json").is_file()
        assert results["tasks"][name]["metrics"] == {}
    chart = results["tasks"]["chartqa"]
    assert chart["n"] == chart["n_total"] == chart["generated"] == 3 and chart["max_new_tokens"] == 4
    assert set(chart["metrics"]) == {"relaxed_overall", "relaxed_human", "relaxed_augmented"}
    lines = (tmp_path / "out" / "predictions" / "chartqa.rank0.jsonl").read_text().splitlines()
    assert "fingerprint" in json.loads(lines[0]) and len(lines) == 4
    assert set(json.loads(lines[1])) == {"sample_id", "prompt_hash", "prediction", "raw"}


@pytest.mark.parametrize("arch", "XH")
def test_x_and_h_models_run_image_tasks(arch, xh_dirs, data, tmp_path):
    assert _eval(xh_dirs[arch], data, tmp_path, "--tasks", "chartqa,mmmu_val", "--limit", "2") == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["arch"] == arch and all("metrics" in r for r in results["tasks"].values())
    assert results["tasks"]["mmmu_val"]["n"] == 2 and results["tasks"]["mmmu_val"]["n_total"] == 3
    table = (tmp_path / "results.md").read_text()
    assert f"(NVLM-{arch})" in table and "subset: not comparable" in table
    assert "| **82.9** |" in table if arch == "X" else "| **83.3** |" in table  # ChartQA, ours beside our arch


def test_interrupted_run_resumes_from_the_cache(tiny_model_dir, data, tmp_path, monkeypatch):
    crash = Counter(fail_on=2)
    monkeypatch.setattr(runner, "generate_batch", crash)
    assert _eval(tiny_model_dir, data, tmp_path, "--tasks", "vqav2_val,chartqa", "--batch-size", "1") == 1
    results = json.loads((tmp_path / "results.json").read_text())
    assert "simulated crash" in results["tasks"]["vqav2_val"]["error"]  # the crashed task is reported ...
    assert results["tasks"]["chartqa"]["generated"] == 3  # ... and the next one still runs
    cache = tmp_path / "predictions" / "vqav2_val.rank0.jsonl"
    with open(cache, "a") as f:
        f.write('{"sample_id": "20", "prompt_ha')  # a record cut short by the kill
    resumed = Counter()
    monkeypatch.setattr(runner, "generate_batch", resumed)
    assert _eval(tiny_model_dir, data, tmp_path, "--tasks", "vqav2_val,chartqa", "--batch-size", "1") == 0
    assert (resumed.calls, resumed.samples) == (2, 2)  # only vqav2's two missing samples
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["tasks"]["vqav2_val"]["cached"] == 1 and results["tasks"]["chartqa"]["cached"] == 3
    assert len(cache.read_text().splitlines()) == 1 + 3  # header + three whole records
    again = Counter()
    monkeypatch.setattr(runner, "generate_batch", again)
    assert _eval(tiny_model_dir, data, tmp_path, "--tasks", "vqav2_val") == 0
    assert again.calls == 0


def test_an_unreadable_cache_line_is_dropped_and_its_sample_generated_again(
    tiny_model_dir, data, tmp_path, monkeypatch, caplog
):
    monkeypatch.setattr(runner, "generate_batch", Counter(fake=True))
    assert _eval(tiny_model_dir, data, tmp_path, "--tasks", "chartqa") == 0
    cache = tmp_path / "predictions" / "chartqa.rank0.jsonl"
    header, first, *rest = cache.read_bytes().split(b"\n")
    broken = first.replace(b'"prediction"', b'"predic\xfftion"')  # one byte that is not UTF-8
    cache.write_bytes(b"\n".join([header, broken, *rest]) + b'{"sample_id": "9", "prompt_ha')  # and a cut line
    again = Counter(fake=True)
    monkeypatch.setattr(runner, "generate_batch", again)
    with caplog.at_level("WARNING", logger="nvlm.eval"):
        assert _eval(tiny_model_dir, data, tmp_path, "--tasks", "chartqa") == 0
    assert again.samples == 1  # only the sample whose line was lost
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["tasks"]["chartqa"]["cached"] == 2 and "error" not in results["tasks"]["chartqa"]
    said = [r.getMessage() for r in caplog.records if "unreadable" in r.getMessage()]
    assert len(said) == 1 and "dropped 2 unreadable line(s)" in said[0], said


def test_limit_then_full_run_and_what_invalidates_the_cache(tiny_model_dir, data, tmp_path, monkeypatch):
    count = Counter()
    monkeypatch.setattr(runner, "generate_batch", count)
    _eval(tiny_model_dir, data, tmp_path, "--tasks", "textvqa_val", "--limit", "2")
    _eval(tiny_model_dir, data, tmp_path, "--tasks", "textvqa_val")
    assert count.samples == 2 + 1
    _eval(tiny_model_dir, data, tmp_path, "--tasks", "textvqa_val", "--profile", "nvlm")  # other prompts
    assert count.samples == 3 + 3
    _eval(tiny_model_dir, data, tmp_path, "--tasks", "textvqa_val", "--max-tiles", "1")  # other tiling
    assert count.samples == 6 + 3
    _eval(tiny_model_dir, data, tmp_path, "--tasks", "textvqa_val", "--max-tiles", "1")
    assert count.samples == 9
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["profile"] == "official" and list(results["tasks"]) == ["textvqa_val"]


def test_default_token_budgets_and_stop_strings(tiny_model_dir, data, tmp_path, monkeypatch):
    seen = Counter(fake=True)
    monkeypatch.setattr(runner, "generate_batch", seen)
    tasks = "vqav2_val,docvqa_val,ocrbench,mmmu_val,coco_caption,gsm8k,humaneval"
    for profile in ("official", "nvlm"):
        main(
            [
                "eval",
                "--model",
                str(tiny_model_dir),
                "--data",
                str(data),
                "--out",
                str(tmp_path / profile),
                "--tasks",
                tasks,
                "--limit",
                "1",
                "--profile",
                profile,
            ]
        )
    assert seen.templates[:7] == [None] * 7 and seen.templates[7:] == [runner.MEGATRON_TEMPLATE] * 7
    budgets = [(n, s) for _, n, s in seen.budgets]
    stops = TASKS["humaneval"].stop
    assert budgets == [
        (16, ()),
        (32, ()),
        (128, ()),
        (128, ()),
        (64, ()),
        (512, ()),
        (512, stops),
        (16, ()),
        (16, ()),
        (16, ()),
        (16, ()),
        (16, ()),
        (512, ()),
        (512, stops),
    ]


def test_rendered_prompts_per_profile(tiny_model_dir, data):
    """official: the released chat() format; nvlm: Megatron's qwen2p0 format (a newline after <|im_end|>)."""
    processor = Processor.from_pretrained(tiny_model_dir)
    task = TASKS["vqav2_val"]
    s = task.load(data)[0]
    official = processor.render(runner._messages(task.prompt(s, "official"))).text
    assert official == (
        "<|im_start|>system\nFollow the user's instruction and answer questions.<|im_end|>"
        "<|im_start|>user\n<image>\nHow many dogs?\nAnswer the question using a single word or phrase."
        "<|im_end|><|im_start|>assistant\n"
    )
    nvlm = processor.render(runner._messages(task.prompt(s, "nvlm")), chat_template=runner.MEGATRON_TEMPLATE).text
    assert nvlm == (
        "<|im_start|>system\nAnswer the questions.<|im_end|>\n<|im_start|>user\n<image>\nHow many dogs?"
        "\nAnswer the question using a single word or phrase.<|im_end|>\n<|im_start|>assistant\n"
    )


def test_generate_batch_left_pads_and_stops(tiny_model_dir, data):
    model, processor = NVLM.from_pretrained(tiny_model_dir), Processor.from_pretrained(tiny_model_dir)
    task = TASKS["mmmu_val"]
    prompts = [task.prompt(s, "official") for s in task.load(data)]  # 1, 2 and 1 images, different lengths
    batched = generate_batch(model, processor, prompts, 5)
    assert batched == [generate_batch(model, processor, [p], 5)[0] for p in prompts]
    raw = generate_batch(model, processor, [Prompt(None, "def f():\n", chat=False)], 6)[0]
    stop = raw[1:3]  # a stop string the tiny model is known to produce
    cut = generate_batch(model, processor, [Prompt(None, "def f():\n", chat=False)], 6, stop=(stop,))[0]
    assert cut == raw[: raw.find(stop)]


def test_sharding_gives_the_single_process_predictions(tiny_model_dir, data, tmp_path, monkeypatch):
    model, processor = NVLM.from_pretrained(tiny_model_dir), Processor.from_pretrained(tiny_model_dir)
    tasks = [TASKS["ai2d"], TASKS["vqav2_val"], TASKS["mmlu"]]

    def cfg(out):
        return EvalConfig(
            model=str(tiny_model_dir),
            tasks=[],
            data=str(data),
            out=str(out),
            batch_size=1,
            max_new_tokens=3,
            poll_s=0.05,
            merge_timeout=60,
        )

    single = Runner(model, processor, cfg(tmp_path / "one")).run(tasks)
    rank0 = {}
    thread = threading.Thread(
        target=lambda: rank0.update(Runner(model, processor, cfg(tmp_path / "two"), 0, 2).run(tasks)), daemon=True
    )
    thread.start()  # rank 0 generates its shard, then waits for rank 1's
    assert Runner(model, processor, cfg(tmp_path / "two"), 1, 2).run(tasks) == {}
    thread.join(timeout=120)
    assert not thread.is_alive()
    for t in tasks:
        assert rank0["tasks"][t.name]["metrics"] == single["tasks"][t.name]["metrics"]
        one = _predictions(tmp_path / "one", t.key)
        two = _predictions(tmp_path / "two", t.key)
        assert one == two and len(one) == 3
        assert len(list((tmp_path / "two" / "predictions").glob(f"{t.key}.rank*.jsonl"))) == 2
    again = Counter()  # one process reuses both ranks' files
    monkeypatch.setattr(runner, "generate_batch", again)
    Runner(model, processor, cfg(tmp_path / "two")).run(tasks)
    assert again.calls == 0


def test_two_processes_under_torchrun_env(tiny_model_dir, data, tmp_path):
    """Two `nvlm eval` processes with RANK/WORLD_SIZE set, as torchrun starts them: rank 0 merges and reports."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    args = [
        sys.executable,
        "-m",
        "nvlm.cli",
        "eval",
        "--model",
        str(tiny_model_dir),
        "--data",
        str(data),
        "--out",
        str(tmp_path),
        "--tasks",
        "ai2d,mmlu",
        "--max-new-tokens",
        "3",
        "--batch-size",
        "1",
    ]
    env = {**os.environ, "WORLD_SIZE": "2", "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(args, env={**env, "RANK": str(r)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for r in (0, 1)
    ]
    outs = [p.communicate(timeout=240) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert "| ai2d | accuracy | 3 |" in outs[0][0] and outs[1][0] == ""
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["world_size"] == 2 and set(results["tasks"]) == {"ai2d", "mmlu"}
    assert len(_predictions(tmp_path, "ai2d")) == 3
    assert sorted(p.name for p in (tmp_path / "predictions").glob("ai2d.rank*.jsonl")) == [
        "ai2d.rank0.jsonl",
        "ai2d.rank1.jsonl",
    ]


def _predictions(out, key):
    recs = {}
    for f in sorted((out / "predictions").glob(f"{key}.rank*.jsonl")):
        for line in f.read_text().splitlines()[1:]:
            r = json.loads(line)
            recs[r["sample_id"]] = r["prediction"]
    return recs


def test_rank_and_world_from_torchrun_env(monkeypatch):
    assert rank_world() == (0, 1)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert rank_world() == (1, 2)
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match="outside WORLD_SIZE"):
        rank_world()
    xs = list(range(7))
    parts = [shard(xs, r, 3) for r in range(3)]
    assert sorted(x for p in parts for x in p) == xs and parts[0] == [0, 3, 6]


def test_missing_data_is_reported_and_other_tasks_go_on(tiny_model_dir, tmp_path, capsys):
    heldout = custom(tmp_path)
    rc = _eval(tiny_model_dir, tmp_path / "nothing", tmp_path / "out", "--tasks", f"docvqa_val,jsonl:{heldout}")
    assert rc == 1
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert "no directory 'docvqa'" in results["tasks"]["docvqa_val"]["error"]
    assert "DocVQA/validation-*.parquet" in results["tasks"]["docvqa_val"]["error"]  # the expected layout
    assert "exact_match" in results["tasks"]["jsonl:heldout"]["metrics"]
    assert "| docvqa_val | – | – | error |" in capsys.readouterr().out
    assert main(["eval", "--model", str(tiny_model_dir), "--tasks", "nope"]) == 2  # before loading the model


def test_a_broken_image_names_its_sample(tiny_model_dir, tmp_path):
    (tmp_path / "bad.png").write_text("not an image")
    (tmp_path / "bad.jsonl").write_text(
        json.dumps({"id": "b1", "image": "bad.png", "question": "q", "answer": "a"}) + "\n"
    )
    assert _eval(tiny_model_dir, tmp_path, tmp_path / "out", "--tasks", f"jsonl:{tmp_path / 'bad.jsonl'}") == 1
    error = json.loads((tmp_path / "out" / "results.json").read_text())["tasks"]["jsonl:bad"]["error"]
    assert "samples ['b1']" in error and "bad.png: not an image file" in error


def test_known_predictions_give_known_scores(tiny_model_dir, data, tmp_path, monkeypatch):
    heldout = custom(tmp_path)
    gold = {
        "chartqa": ["45", "2019", "12"],
        "vqav2_val": ["2", "red", "no"],
        "docvqa_val": ["Coca cola", "$5", "Cat"],
        "textvqa_val": ["two", "Red.", "yes"],
        "ai2d": ["B", "(A)", "D. adult"],
        "mmbench_en_dev": ["A", "b", "C"],
        "realworldqa": ["A", "2", "yes."],
        "mmmu_val": ["C", "(B)", "The answer is 30."],
        "mathvista_testmini": ["B", "14", "3.14"],
        "ocrbench": ["the word is centre.", "x^{2}", "May 5"],
        "mmlu": ["C", "B", "A"],
        "gsm8k": ["So she makes \\boxed{18}.", "1234", "-3.5"],
        "math": ["\\boxed{2}", "$\\boxed{0.5}$", "\\boxed{10}"],
        "jsonl:heldout": ["Red", "lime", "5"],
    }
    answers = {}
    for name, preds in gold.items():
        task = get_task(f"jsonl:{heldout}") if name.startswith("jsonl") else TASKS[name]
        for s, p in zip(task.load(data), preds, strict=True):
            answers[task.prompt(s, "official").text] = p
    monkeypatch.setattr(runner, "generate_batch", Counter(answers=answers))
    tasks = ",".join(n if not n.startswith("jsonl") else f"jsonl:{heldout}" for n in gold)
    assert _eval(tiny_model_dir, data, tmp_path / "out", "--tasks", tasks) == 0
    got = {n: r["metrics"] for n, r in json.loads((tmp_path / "out" / "results.json").read_text())["tasks"].items()}
    two_thirds = pytest.approx(200 / 3)
    assert got["chartqa"] == {"relaxed_overall": two_thirds, "relaxed_human": 100.0, "relaxed_augmented": 0.0}
    assert got["vqav2_val"] == {
        "accuracy": two_thirds,
        "accuracy_number": 100.0,
        "accuracy_other": 100.0,
        "accuracy_yes/no": 0.0,
    }
    assert got["docvqa_val"] == {"anls": two_thirds}
    assert got["textvqa_val"] == {"accuracy": 100.0}  # EvalAI normalisation: "two" = "2", "Red." = "red"
    assert got["ai2d"] == {"accuracy": 100.0}
    assert got["mmbench_en_dev"] == {"accuracy": two_thirds}  # a lone lower-case "b" is read as B
    assert got["realworldqa"] == {"accuracy": 100.0}  # "yes." = "Yes": lower-cased, the final "." dropped
    assert got["mmmu_val"]["accuracy"] == 100.0 and got["mmmu_val"]["accuracy_Business"] == 100.0
    assert got["mathvista_testmini"] == {"accuracy": 100.0}
    assert got["ocrbench"]["Final Score"] == 3 and got["ocrbench"]["Regular Text Recognition"] == 1
    assert got["mmlu"] == {"accuracy": two_thirds}
    assert got["gsm8k"] == {"accuracy": 100.0}
    assert got["math"] == {"accuracy": two_thirds}
    assert got["jsonl:heldout"] == {"exact_match": two_thirds}


@pytest.mark.skipif(not HAVE_SANDBOX, reason="nvlm.eval.sandbox (the scorers' branch) is not merged yet")
def test_humaneval_pass_at_1(tiny_model_dir, data, tmp_path, monkeypatch):
    task = TASKS["humaneval"]
    answers = dict(
        zip(
            [task.prompt(s, "official").text for s in task.load(data)],
            ["    return a + b\n", "    return 2\n"],
            strict=True,
        )
    )
    monkeypatch.setattr(runner, "generate_batch", Counter(answers=answers))
    assert _eval(tiny_model_dir, data, tmp_path, "--tasks", "humaneval") == 0
    assert json.loads((tmp_path / "results.json").read_text())["tasks"]["humaneval"]["metrics"] == {"pass@1": 50.0}
