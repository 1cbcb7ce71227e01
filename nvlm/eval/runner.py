"""``nvlm eval``: load a model once, generate every task's answers in batches, cache them, score, report.

- Sharding: under ``torchrun`` each process takes ``samples[rank::world]`` (``RANK``/``WORLD_SIZE`` from the
  environment; no process group, so no collective can time out on a long run). Rank 0 waits until every
  sample of a task has a prediction in the shards' files, then merges them by sample id.
- Cache: every finished batch is appended to ``OUT/predictions/<task>.rank<r>.jsonl`` and flushed. Its
  header line holds a fingerprint of the model files, task, prompt version, profile, token budget, tiling
  and dtype; a run only reuses predictions under the same fingerprint, and each record carries a hash of
  its prompt, so edited data is regenerated. Reading takes every rank's file, so a rerun with another
  world size (or one process) reuses them all. A line that does not read as a UTF-8 JSON record is dropped
  (counted, logged once) and its sample generated again.
- Output: ``OUT/results.json`` and ``OUT/results.md`` (our numbers beside the paper's), rewritten as each
  task finishes; ``OUT/submissions/`` for test splits with hidden answers.
A task whose data is missing or malformed is reported and skipped; the other tasks go on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nvlm.engine import Engine, first_error
from nvlm.eval.paper import COLUMNS, PAPER
from nvlm.eval.tasks import PROFILES, ParquetImage, Prompt, Sample, Task, get_task
from nvlm.eval.tasks.base import DataError, resolve_image
from nvlm.hf_config import model_dir
from nvlm.image import ImageError, ImageProcessor, load_image
from nvlm.options import option
from nvlm.pretrained import NVLM
from nvlm.processor import Processor
from nvlm.sampling import SamplingParams
from nvlm.template import MEGATRON_TEMPLATE

log = logging.getLogger(__name__)


@dataclass
class EvalConfig:
    """An evaluation run. The fields with help are ``nvlm eval``'s options (``nvlm.options``); ``--tasks`` is
    the comma-separated form of ``tasks``, ``--quantize`` is ``nvlm.quant``'s option."""

    # field, not option(): mypy's dataclass check knows a field without a default, not a call returning one
    model: str = field(metadata={"help": "checkpoint directory (NVLM-D, -X or -H)"})
    tasks: list[str]  # task names, or jsonl:PATH
    data: str | None = option(None, "directory holding one folder per benchmark (not needed for jsonl:PATH)")
    out: str | None = option(None, "output directory (default runs/eval/<model name>)")
    limit: int | None = option(None, "only the first N samples of each task")
    profile: str = option(
        "official",
        "official: NVLM prompts + official scoring; nvlm: Megatron NVLM-1.0 prompts and scoring",
        choices=PROFILES,
    )
    batch_size: int = option(8, "prompts generated together")
    max_new_tokens: int | None = option(None, "override every task's token budget")
    max_tiles: int | None = option(None, "tiles per image (default: the checkpoint's, 6)")
    dtype: str | None = option(None, "e.g. bfloat16 (default: the checkpoint's)")
    device: str | None = option(None, "cpu, cuda, cuda:1 or auto (default: cuda:LOCAL_RANK if any)")
    quantize: str | None = None  # "int8", "int4" or "fp8": nvlm.quant, while loading
    merge_timeout: float = option(24 * 3600.0, "seconds rank 0 waits for the other ranks' predictions")
    poll_s: float = 5.0  # how often rank 0 rereads the shard files while it waits

    def __post_init__(self) -> None:
        if self.profile not in PROFILES:
            raise ValueError(f"unknown profile {self.profile!r}; expected one of {', '.join(PROFILES)}")
        if self.batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {self.batch_size}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1, got {self.limit}")


def rank_world() -> tuple[int, int]:
    """(rank, world size) as torchrun sets them; (0, 1) for a plain process."""
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} is outside WORLD_SIZE={world}")
    return rank, world


def shard(samples: Sequence[Sample], rank: int, world: int) -> list[Sample]:
    """This rank's samples: every world-th, from its rank on (no padding, so no duplicates to drop)."""
    return list(samples[rank::world])


# ------------------------------------------------------------------------------------------ cache


def model_fingerprint(path: str | Path) -> str:
    """The model directory and its files' names, sizes and modification times."""
    path = model_dir(path).resolve()
    h = hashlib.sha256(str(path).encode())
    for f in sorted(path.iterdir()):
        if f.is_file() and f.suffix in (".json", ".safetensors", ".bin", ".model", ".txt", ".jinja"):
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:16]


def prompt_hash(p: Prompt) -> str:
    images = [
        f"{i.column}@{i.row_group}:{i.row}"
        if isinstance(i, ParquetImage)
        else Path(i).name
        if isinstance(i, (str, Path))
        else type(i).__name__
        for i in p.images
    ]
    return hashlib.sha1(json.dumps([p.system, p.text, p.chat, images]).encode()).hexdigest()[:12]


class PredictionCache:
    """``<dir>/<task>.rank<r>.jsonl``: a header ``{"fingerprint": ...}``, then ``{"sample_id", "prompt_hash",
    "prediction", "raw"}`` per sample."""

    def __init__(self, directory: Path, key: str, fingerprint: str) -> None:
        self.dir, self.key, self.fingerprint = directory, key, fingerprint
        self.dropped: dict[str, int] = {}  # file name -> lines that read() could not use

    def path(self, rank: int) -> Path:
        return self.dir / f"{self.key}.rank{rank}.jsonl"

    def files(self) -> list[Path]:
        return sorted(self.dir.glob(f"{self.key}.rank*.jsonl"))

    def read(self) -> dict[tuple[str, str], dict[str, Any]]:
        """(sample id, prompt hash) -> record, over every rank's file with this fingerprint.

        A line that is not a whole UTF-8 JSON record (a cut line, a stray byte) is dropped, so its sample is
        generated again; ``dropped`` holds each such file's last count, and a warning names the file once."""
        out: dict[tuple[str, str], dict[str, Any]] = {}
        for f in self.files():
            header, *lines = f.read_bytes().split(b"\n")
            if _header(header) != self.fingerprint:
                continue
            bad = 0
            for line in lines:
                try:
                    r = json.loads(line.decode("utf-8"))
                    out.setdefault((str(r["sample_id"]), r["prompt_hash"]), r)
                except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
                    bad += line.strip() != b""
            if bad and f.name not in self.dropped:  # said once per file, however often it is read
                log.warning("%s: dropped %d unreadable line(s); their samples are generated again", f, bad)
            if bad:
                self.dropped[f.name] = bad
        return out

    def writer(self, rank: int) -> _Writer:
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.path(rank)
        if path.is_file():
            with open(path, "rb") as old:
                same = _header(old.readline()) == self.fingerprint
            if same:
                _trim_partial_line(path)
                return _Writer(open(path, "a", encoding="utf-8"))
        # another model or settings: its predictions are of no use here
        fh = open(path, "w", encoding="utf-8")  # noqa: SIM115 (the _Writer closes it)
        fh.write(json.dumps({"fingerprint": self.fingerprint, "task": self.key, "rank": rank}) + "\n")
        fh.flush()
        return _Writer(fh)

    def error_path(self, rank: int) -> Path:
        return self.dir / f"{self.key}.rank{rank}.error"

    def errors(self) -> list[str]:
        out = []
        for f in sorted(self.dir.glob(f"{self.key}.rank*.error")):
            try:
                r = json.loads(f.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            if r.get("fingerprint") == self.fingerprint:
                out.append(f"{f.name}: {r.get('error')}")
        return out


class _Writer:
    def __init__(self, fh: Any) -> None:
        self.fh = fh

    def write(self, records: Sequence[dict[str, Any]]) -> None:
        self.fh.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        self.fh.flush()
        os.fsync(self.fh.fileno())

    def __enter__(self) -> _Writer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.fh.close()


def _header(line: bytes) -> str | None:
    try:
        return json.loads(line.decode("utf-8")).get("fingerprint")
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return None


def _trim_partial_line(path: Path) -> None:
    """Drop a last line without its newline (the run was killed while writing it)."""
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as fh:
            fh.truncate(data.rfind(b"\n") + 1)


# ------------------------------------------------------------------------------------- generation


def generate_batch(
    model: NVLM,
    processor: Processor,
    prompts: Sequence[Prompt],
    max_new_tokens: int,
    stop: Sequence[str] = (),
    template: str | None = None,
) -> list[str]:
    """Greedy answers to a batch of prompts (left-padded together), cut at EOS or at a stop string.

    ``template``: the chat format (Jinja source; None: the processor's, the released ``chat()`` format).

    A prompt with several images gives each ``max(1, max_tiles // n)`` tiles, as Megatron's multi-image
    MMMU path does, so that seven images do not make a 12k-token prompt.
    """
    rows, pixels = [], []
    for p in prompts:
        text = processor.render(_messages(p), chat_template=template).text if p.chat else p.text
        tiler = _tiler(processor, len(p.images))
        pix = [tiler(load_image(resolve_image(src))) for src in p.images]
        rows.append(processor.encode(text, [x.shape[0] for x in pix]))
        pixels.append(pix)
    params = SamplingParams(max_new_tokens=max_new_tokens, stop=tuple(stop), eos_token_id=processor.eos_token_ids)
    engine = Engine(model, processor, max_batch=len(prompts))
    seqs = engine.add(rows, pixels, [params] * len(rows))
    engine.run()
    first_error(seqs)
    return [s.text for s in seqs]


def _messages(p: Prompt) -> list[dict[str, str]]:
    system = [{"role": "system", "content": p.system}] if p.system is not None else []
    return [*system, {"role": "user", "content": p.text}]


def _tiler(processor: Processor, n_images: int) -> Any:
    base = processor.image_processor
    if n_images <= 1:
        return base

    tiles = max(1, base.max_tiles // n_images)
    return ImageProcessor(base.tile_size, tiles, base.use_thumbnail, min(base.min_tiles, tiles))


def _chunks(xs: Sequence[Any], n: int) -> Iterator[Sequence[Any]]:
    for i in range(0, len(xs), n):
        yield xs[i : i + n]


def _progress(total: int, initial: int, desc: str, enabled: bool) -> Any:
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm comes with the eval extra; without it, no bar
        tqdm = None
    if tqdm is None or not enabled:
        return _NoBar()
    return tqdm(total=total, initial=initial, desc=desc, unit="sample", dynamic_ncols=True, file=sys.stderr)


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


# ------------------------------------------------------------------------------------------ tasks


@dataclass
class _Prepared:
    task: Task
    samples: list[Sample]
    n_total: int
    hashes: dict[str, str]
    cache: PredictionCache
    max_new_tokens: int
    generated: int = 0
    cached: int = 0
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


class Runner:
    """One model, many tasks; see the module docstring."""

    def __init__(self, model: NVLM, processor: Processor, cfg: EvalConfig, rank: int = 0, world: int = 1) -> None:
        self.model, self.processor, self.cfg = model, processor, cfg
        self.rank, self.world = rank, world
        self.out = Path(cfg.out or Path("runs/eval") / Path(cfg.model).resolve().name)
        self.pred_dir = self.out / "predictions"
        self.model_fp = model_fingerprint(cfg.model)
        self.template = MEGATRON_TEMPLATE if cfg.profile == "nvlm" else None
        self.results = self._load_results() if rank == 0 else {}

    # ---- the whole run

    def run(self, tasks: Sequence[Task]) -> dict[str, Any]:
        self.pred_dir.mkdir(parents=True, exist_ok=True)
        for f in self.pred_dir.glob(f"*.rank{self.rank}.error"):
            f.unlink()  # errors of an earlier run of this rank
        waiting = []
        for task in tasks:
            try:
                prepared = self.prepare(task)
                self.generate(prepared)
            except Exception as e:  # a task's data or generation failed: say so, go on with the others
                self._fail(task, e)
                continue
            if self.world == 1:
                self.finish(prepared)
            elif self.rank == 0:
                waiting.append(prepared)
        for prepared in waiting:
            self.finish(prepared)
        return self.results

    def prepare(self, task: Task) -> _Prepared:
        root = self.cfg.data
        if root is None and task.dirname:
            raise DataError(f"{task.name}: no --data directory given")
        samples = task.load(root or "")  # a task without a folder (jsonl:PATH) reads none
        n_total = len(samples)
        if self.cfg.limit is not None:
            samples = samples[: self.cfg.limit]
        profile = self.cfg.profile
        hashes = {s.id: prompt_hash(task.prompt(s, profile)) for s in samples}
        max_new = self.cfg.max_new_tokens or task.max_new_tokens(profile)
        ip = self.processor.image_processor
        settings = {
            "model": self.model_fp,
            "task": task.name,
            "version": task.version,
            "profile": profile,
            "max_new_tokens": max_new,
            "tiles": [ip.max_tiles, ip.min_tiles, ip.use_thumbnail],
            "dtype": _dtype_name(self.model),
            "template": self.template or self.processor.chat_template,
        }
        fingerprint = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
        cache = PredictionCache(self.pred_dir, task.key, fingerprint)
        return _Prepared(task, samples, n_total, hashes, cache, max_new)

    def generate(self, p: _Prepared) -> None:
        """This rank's shard of a task, skipping what the cache already holds."""
        task, profile = p.task, self.cfg.profile
        mine = shard(p.samples, self.rank, self.world)
        have = p.cache.read()
        todo = [s for s in mine if (s.id, p.hashes[s.id]) not in have]
        p.cached = len(mine) - len(todo)
        if p.cached:
            log.info("%s: %d of %d samples already in %s", task.name, p.cached, len(mine), p.cache.dir)
        start = time.perf_counter()
        bar = _progress(len(mine), p.cached, task.name, self.rank == 0)
        try:
            with p.cache.writer(self.rank) as out:
                for chunk in _chunks(todo, self.cfg.batch_size * 8):  # read in order, sort a window by length
                    prompts = {s.id: task.prompt(s, profile) for s in chunk}
                    ordered = sorted(chunk, key=lambda s: (-len(prompts[s.id].images), -len(prompts[s.id].text)))
                    for batch in _chunks(ordered, self.cfg.batch_size):
                        try:
                            raws = generate_batch(
                                self.model,
                                self.processor,
                                [prompts[s.id] for s in batch],
                                p.max_new_tokens,
                                task.stop,
                                self.template,
                            )
                        except ImageError as e:  # say which samples: the image error names only the file
                            raise DataError(f"{task.name}: samples {[s.id for s in batch]}: {e}") from None
                        out.write(
                            [
                                {
                                    "sample_id": s.id,
                                    "prompt_hash": p.hashes[s.id],
                                    "prediction": task.postprocess(r, profile),
                                    "raw": r,
                                }
                                for s, r in zip(batch, raws, strict=True)
                            ]
                        )
                        p.generated += len(batch)
                        bar.update(len(batch))
        except Exception as e:
            if self.world > 1:
                p.cache.error_path(self.rank).write_text(
                    json.dumps({"fingerprint": p.cache.fingerprint, "error": f"{type(e).__name__}: {e}"})
                )
            raise
        finally:
            bar.close()
            p.seconds = time.perf_counter() - start

    def merged(self, p: _Prepared) -> list[str]:
        """Every sample's prediction, in dataset order, waiting for the other ranks' shards if need be."""
        deadline = time.monotonic() + self.cfg.merge_timeout
        last_note = 0.0
        while True:
            have = p.cache.read()
            missing = [s.id for s in p.samples if (s.id, p.hashes[s.id]) not in have]
            if not missing:
                return [have[(s.id, p.hashes[s.id])]["prediction"] for s in p.samples]
            errors = p.cache.errors()
            if errors:
                raise RuntimeError(f"another rank failed: {'; '.join(errors)}")
            if self.world == 1 or time.monotonic() > deadline:
                raise RuntimeError(f"{len(missing)} samples have no prediction (first: {missing[0]})")
            if time.monotonic() - last_note > 60:
                log.info("%s: waiting for %d predictions from the other ranks", p.task.name, len(missing))
                last_note = time.monotonic()
            time.sleep(self.cfg.poll_s)

    def finish(self, p: _Prepared) -> None:
        """Merge, score, write the submission file, and rewrite results.json / results.md."""
        task = p.task
        try:
            predictions = self.merged(p)
            metrics = task.score(predictions, p.samples, self.cfg.profile) if task.has_answers else {}
            entry: dict[str, Any] = {
                "split": task.split,
                "n": len(p.samples),
                "n_total": p.n_total,
                "limit": self.cfg.limit,
                "max_new_tokens": p.max_new_tokens,
                "main_metric": task.main_metric if task.has_answers else None,
                "metrics": metrics,
                "generated": p.generated,
                "cached": p.cached,
                "seconds": round(p.seconds, 2),
            }
            sub = task.submission(predictions, p.samples)
            if sub is not None:
                name, content = sub
                (self.out / "submissions").mkdir(parents=True, exist_ok=True)
                (self.out / "submissions" / name).write_text(content, encoding="utf-8")
                entry["submission"] = f"submissions/{name}"
        except Exception as e:
            self._fail(task, e)
            return
        self.results["tasks"][task.name] = entry
        self._write()

    def _fail(self, task: Task, e: Exception) -> None:
        message = f"{type(e).__name__}: {e}" if not isinstance(e, DataError) else str(e)
        if isinstance(e, (DataError, OSError)):
            log.error("%s: %s", task.name, message)
        else:
            log.exception("%s failed", task.name)
        if self.rank == 0:
            self.results["tasks"][task.name] = {"split": task.split, "error": message}
            self._write()

    # ---- results files

    def _load_results(self) -> dict[str, Any]:
        head = {
            "model": str(Path(self.cfg.model).resolve()),
            "model_name": Path(self.cfg.model).resolve().name,
            "model_fingerprint": self.model_fp,
            "arch": self.model.config.arch,
            "profile": self.cfg.profile,
            "max_tiles": self.processor.image_processor.max_tiles,
            "dtype": _dtype_name(self.model).removeprefix("torch."),
            "world_size": self.world,
        }
        old_path = self.out / "results.json"
        tasks: dict[str, Any] = {}
        if old_path.is_file():  # keep the other tasks of earlier runs of this same model, profile and dtype
            try:
                old = json.loads(old_path.read_text())
                same = (old.get("model_fingerprint"), old.get("profile"), old.get("dtype"))
                if same == (self.model_fp, self.cfg.profile, head["dtype"]):
                    tasks = old.get("tasks", {})
            except (json.JSONDecodeError, OSError):
                pass
        return {**head, "tasks": tasks}

    def _write(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        self.results["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        _atomic_write(self.out / "results.json", json.dumps(self.results, indent=2) + "\n")
        _atomic_write(self.out / "results.md", markdown(self.results))


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def _fmt(v: float | None, count: bool = False) -> str:
    """Percent with one decimal; OCRBench's counts (out of 1000) as integers."""
    if v is None:
        return "–"
    return f"{v:.0f}" if count else f"{v:.1f}"


def markdown(results: dict[str, Any]) -> str:
    """Our main metric per task beside the paper's NVLM-D/X/H 72B numbers (ours in its architecture's column)."""
    arch = results.get("arch", "D")
    cols = list(COLUMNS)
    lines = [
        f"# {results['model_name']} (NVLM-{arch}), profile `{results['profile']}`",
        "",
        "| Task | Metric | n | Ours | " + " | ".join(COLUMNS[c] for c in cols) + " | Notes |",
        "|---|---|---|---|" + "---|" * len(cols) + "---|",
    ]
    details = []
    for name, r in results["tasks"].items():
        paper = PAPER.get(name)
        count = name == "ocrbench"
        refs = [_fmt(paper.get(c), count) if paper else "–" for c in cols]
        refs = [f"**{v}**" if c == arch and v != "–" else v for c, v in zip(cols, refs, strict=True)]
        notes = [paper.note] if paper and paper.note else []
        if "error" in r:
            first = r["error"].splitlines()[0]
            lines.append(f"| {name} | – | – | error | " + " | ".join(refs) + f" | {_md(first)} |")
            continue
        main = r.get("main_metric")
        ours = _fmt(r["metrics"].get(main), count) if main else "–"
        n = f"{r['n']}" if r["n"] == r["n_total"] else f"{r['n']} / {r['n_total']}"
        if r["n"] != r["n_total"]:
            notes.append("subset: not comparable")
        if r.get("submission"):
            notes.append(f"submission: `{r['submission']}`")
        lines.append(f"| {name} | {main or '–'} | {n} | {ours} | " + " | ".join(refs) + f" | {'; '.join(notes)} |")
        if len(r["metrics"]) > 1:
            details.append(f"- **{name}**: " + ", ".join(f"{k} {_fmt(v, count)}" for k, v in r["metrics"].items()))
    lines += [
        "",
        "Paper: NVLM 1.0 (arXiv 2409.11402) Tables 7/8, 72B models; HF: the nvidia/NVLM-D-72B card. "
        "The paper's VQAv2 is test-dev and its DocVQA test; MMMU test, VQAv2 test-dev and DocVQA test are "
        "scored by their servers from the files in `submissions/`.",
    ]
    if details:
        lines += ["", "## All metrics", "", *details]
    return "\n".join(lines) + "\n"


def _md(text: str) -> str:
    return text.replace("|", "\\|")[:200]


# -------------------------------------------------------------------------------------------- API


def _dtype_name(model: NVLM) -> str:
    """The model's dtype, with its quantization ("torch.bfloat16+int8"): predictions are kept apart by it."""
    q = getattr(model, "quantization", None)
    return str(model.dtype) + (f"+{q.format}" if q is not None else "")


def load(cfg: EvalConfig) -> tuple[NVLM, Processor]:
    device = cfg.device
    if device is None and torch.cuda.is_available():
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    model = NVLM.from_pretrained(cfg.model, dtype=cfg.dtype, device=device, quantize=cfg.quantize)
    model.eval()
    return model, Processor.from_pretrained(cfg.model, max_tiles=cfg.max_tiles)


def evaluate(cfg: EvalConfig) -> dict[str, Any]:
    """Run ``cfg``'s tasks; returns the results (rank 0; ``{}`` on the other ranks)."""
    tasks = [get_task(name) for name in cfg.tasks]  # unknown names fail before the model loads
    rank, world = rank_world()
    model, processor = load(cfg)
    results = Runner(model, processor, cfg, rank, world).run(tasks)
    return results if rank == 0 else {}
