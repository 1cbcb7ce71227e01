"""The training loop: stages, blends, packing, accumulation, clipping, cosine LR, metrics and resume.

    nvlm train --config recipes/tiny-d-sft.yaml [--key value ...]
    torchrun --nproc_per_node 8 -m nvlm.cli train --config recipes/nvlm-d-72b-sft.yaml

Each optimiser step reads ``grad_accum`` micro-batches per rank; the loss is the mean over every supervised
token of the global batch (the sum of token losses over all micro-batches and ranks divided by their count),
as Megatron's ``calculate_per_token_loss``. Frozen parameters never reach the optimiser.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from nvlm.config import NVLMConfig
from nvlm.data.blend import Source
from nvlm.data.labels import IGNORE
from nvlm.data.loader import Loader, reshard
from nvlm.data.packing import padding_fraction
from nvlm.devices import return_freed_memory
from nvlm.image import ImageProcessor
from nvlm.pretrained import NVLM
from nvlm.processor import Processor
from nvlm.tokenizer import Tokenizer
from nvlm.train import distributed, state
from nvlm.train.config import Schedule, TrainConfig
from nvlm.train.stages import set_trainable
from nvlm.train.weights import fill, set_dtypes, starting_point

log = logging.getLogger(__name__)

# On CPU, models of at least this many fp32 bytes have glibc return freed blocks (``return_freed_memory``): for
# them the blocks a step frees would pile up by the GiB; for smaller ones the page faults of mapping every
# block afresh cost more than the memory saved (the demo model: 0.38 s a step instead of 0.23).
RETURN_FREED_FROM = 256 * 2**20
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0}  # dense bf16


def build(cfg: TrainConfig, device: torch.device, world: int) -> tuple[NVLM, Tokenizer, torch.dtype]:
    """The model, built on the meta device, its trained parameters chosen, dtypes set, the sharding plan
    applied, then only this rank's shards allocated and filled from the starting point. Returns the model,
    the tokenizer and the dtype of frozen parameters (that of the exported model)."""
    point = starting_point(cfg)
    cfg.resolve(point.config.arch)
    on_gpu = device.type == "cuda"
    frozen = (
        getattr(torch, str(point.config.torch_dtype).removeprefix("torch."), torch.float32) if on_gpu else torch.float32
    )
    with torch.device("meta"):
        model = NVLM(point.config)
    if device.type == "cpu" and sum(p.numel() for p in model.parameters()) * 4 >= RETURN_FREED_FROM:
        return_freed_memory()
    set_trainable(model, cfg.stage, cfg.trainable)
    set_dtypes(model, frozen)
    mesh = distributed.device_mesh(device, cfg.shard_size) if world > 1 and cfg.fsdp else None
    compute = getattr(torch, cfg.dtype) if on_gpu and mesh is not None else None  # one GPU: autocast instead
    distributed.parallelize(model, mesh, compute, cfg.activation_checkpointing, cfg.compile)
    model.to_empty(device=device)
    fill(model, point, cfg.seed)
    model.run_every_module = mesh is not None
    return model.train(), point.tokenizer, frozen


def cpu_threads(num_workers: int, ranks_here: int = 1) -> int:
    """Intra-op threads for training on CPU: torch's default, but at most this process's share of the CPUs
    it may run on once every local rank's data workers have theirs (at least 1). Threads beyond the free
    cores wait at each op for a descheduled sibling: on 2 cores shared with other jobs, a demo step with 2
    threads took 7x longer than with 1 (and burnt 8x the CPU time)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    free = cpus // max(1, ranks_here) - num_workers
    return max(1, min(torch.get_num_threads(), free))


def make_optimizer(model: NVLM, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trained parameters only (no weight decay on vectors: norms, biases, gates)."""
    trained = [p for p in model.parameters() if p.requires_grad]
    s = cfg.schedule
    groups: list[dict[str, Any]] = [
        {"params": [p for p in trained if p.ndim >= 2], "weight_decay": s.weight_decay},
        {"params": [p for p in trained if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=s.lr, betas=s.betas)


def prompt_format(c: NVLMConfig, tile_tags: bool) -> NVLMConfig:
    """The config the training data is formatted with: the model's, or (``tile_tags=False``) without tags."""
    return c if tile_tags else replace(c, tile_tag="", thumbnail_tag="")


def lr_at(step: int, s: Schedule) -> float:
    """Linear warmup to ``lr``, then cosine decay to ``min_lr`` at ``steps``."""
    if step < s.warmup_steps:
        return s.lr * (step + 1) / s.warmup_steps
    progress = min(1.0, (step - s.warmup_steps) / max(1, s.steps - s.warmup_steps))
    return s.min_lr + 0.5 * (s.lr - s.min_lr) * (1 + math.cos(math.pi * progress))


def train(cfg: TrainConfig) -> Path:
    """Run (or resume) a training run; returns the directory of the final model."""
    rank, world, device = distributed.setup(cfg.device)
    if device.type == "cpu":
        torch.set_num_threads(cpu_threads(cfg.num_workers, int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    model, tokenizer, export_dtype = build(cfg, device, world)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    c, s = model.config, cfg.schedule
    images = ImageProcessor(
        tile_size=c.tile_size,
        max_tiles=s.max_tiles,
        min_tiles=min(c.min_tiles, s.max_tiles),
        use_thumbnail=c.use_thumbnail,
    )
    processor = Processor(tokenizer, images, prompt_format(c, cfg.tile_tags), chat_template=cfg.chat_template)
    sharded = world > 1 and cfg.fsdp
    params = dict(model.named_parameters())
    optimizer = make_optimizer(model, cfg)
    sources = [Source(d["path"], float(d.get("weight", 1.0))) for d in cfg.data]
    loader = Loader(
        processor, sources, s.seq_len, cfg.micro_batch_size, cfg.pack, cfg.seed, rank, world, cfg.num_workers
    )
    with loader:  # the data workers end on every path out
        out = Path(cfg.out_dir)
        ckpt_root = out / "checkpoints"
        step = 0
        last = state.latest(ckpt_root)
        if last is not None:
            saved, ranks = state.load(last, model, optimizer)
            step = saved["step"]
            loader.load_state_dict(reshard([r["data"] for r in ranks], world)[rank])
            if rank == 0:
                log.info("resuming from %s (step %d)", last, step)
        metrics = Metrics(out, step, rank == 0)
        use_amp = device.type == "cuda" and not sharded  # FSDP2 casts to bf16 itself (MixedPrecisionPolicy)
        n_params = sum(p.numel() for p in params.values())
        peak = cfg.peak_tflops or (
            next((v for k, v in PEAK_TFLOPS.items() if k in torch.cuda.get_device_name(device)), None)
            if device.type == "cuda"
            else None
        )
        progress = _progress(s.steps, step, rank == 0)
        background = state.background_group() if cfg.async_save else None
        pending: state.Pending | None = None
        while step < s.steps:
            t0 = time.perf_counter()
            lr = lr_at(step, s)
            for group in optimizer.param_groups:
                group["lr"] = lr
            micro = [loader() for _ in range(cfg.grad_accum)]
            supervised = distributed.all_sum(sum(float((b["targets"] != IGNORE).sum()) for b in micro), device)
            tokens = distributed.all_sum(sum(float(b["attention_mask"].gt(0).sum()) for b in micro), device)
            samples = distributed.all_sum(sum(float(b["attention_mask"].amax(1).sum()) for b in micro), device)
            loss_sum = 0.0
            for batch in micro:
                batch = batch.to(device)
                targets = batch.pop("targets")
                supervised_at = targets != IGNORE  # logits only there: the lm_head and softmax of the rest is waste
                with torch.autocast(device.type, dtype=getattr(torch, cfg.dtype), enabled=use_amp):
                    logits = model(**batch, logits_at=supervised_at).logits  # (N, vocab)
                loss = F.cross_entropy(logits.float(), targets[supervised_at], reduction="sum")
                (loss * world / supervised).backward()
                loss_sum += float(loss.detach())
            if world > 1 and not sharded:
                distributed.average_gradients([params[n] for n in trainable])
            grad_norm = float(torch.nn.utils.clip_grad_norm_([params[n] for n in trainable], s.grad_clip))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            seconds = time.perf_counter() - t0
            record: dict[str, Any] = {
                "step": step,
                "loss": distributed.all_sum(loss_sum, device) / supervised,
                "lr": lr,
                "grad_norm": grad_norm,
                "tokens": int(tokens),
                "supervised_tokens": int(supervised),
                "tokens_per_s": tokens / seconds,
                "samples": int(samples),  # examples (a packed row numbers its examples 1, 2, ...)
                "samples_per_s": samples / seconds,
                "padding": sum(map(padding_fraction, micro)) / len(micro),
                "skipped": int(distributed.all_sum(sum(loader.skipped.values()), device)),
            }
            peaks = distributed.peak_memory_gib(device)
            record.update(peak_memory_gib=max(peaks), peak_memory_gib_per_rank=peaks)
            if peak:
                record["mfu"] = 6 * n_params * tokens / seconds / (world * peak * 1e12)
            metrics(record, verbose=step % cfg.log_every == 0 or step == s.steps)
            progress(record)
            if step % cfg.save_every == 0 or step == s.steps:
                if pending is not None:
                    pending.commit()  # the previous background save, before this one starts
                pending = state.save(
                    ckpt_root,
                    step,
                    model,
                    optimizer,
                    {"data": loader.state_dict()},
                    {"config": _jsonable(asdict(cfg))},
                    cfg.keep_last,
                    background,
                )
        if pending is not None:
            pending.commit()
    return _save_final(model, processor, out / "model", rank, export_dtype)


def _save_final(model: NVLM, processor: Processor, path: Path, rank: int, dtype: torch.dtype | None = None) -> Path:
    """``save_pretrained`` (the NVLM-D-72B layout for D), streamed tensor by tensor (collective under FSDP2:
    every rank gathers each tensor in turn, rank 0 writes).

    The model is written to ``<path>.tmp`` and renamed to ``path`` only once complete: a failed save (a full
    disk) removes its ``.tmp`` and leaves an existing ``path`` as it was, and a save killed part-way leaves
    only a ``.tmp``, discarded by the next save. The old ``path`` is moved aside (``.old``) just before the
    rename, so at no moment does ``path`` hold a partial model.
    """
    tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp, processor=processor, dtype=dtype)
    except BaseException:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if rank == 0:
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
            path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old, ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()
    return path


class Metrics:
    """One JSON line per step in ``metrics.jsonl`` (lines past a resumed step are dropped), the console,
    and TensorBoard when it is installed.

    Each line is appended with a single ``os.write``; one that fails part-way (a full disk) is cut back off
    before the error is raised, so the file only ever ends with a whole line. On resume, lines that do not
    parse (one cut short by a crash) are dropped with a note, and the kept lines replace the file atomically.
    """

    def __init__(self, out: Path, step: int, active: bool) -> None:
        self.active = active
        if not active:
            return
        out.mkdir(parents=True, exist_ok=True)
        self.path = out / "metrics.jsonl"
        if self.path.exists():  # a resumed run continues the curve from its checkpoint
            kept, dropped = [], 0
            for line in self.path.read_bytes().decode("utf-8", "replace").splitlines():
                try:
                    if int(json.loads(line)["step"]) <= step:
                        kept.append(line)
                except (ValueError, KeyError, TypeError):
                    dropped += bool(line.strip())
            if dropped:
                log.warning("%s: dropped %d unreadable line(s), e.g. one cut short by a full disk", self.path, dropped)
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, self.path)
        self.tb: Any = None  # a SummaryWriter when tensorboard is installed
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tensorboard"))
        except ImportError:
            pass

    def __call__(self, record: dict[str, Any], verbose: bool) -> None:
        if not self.active:
            return
        data = (json.dumps(record) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            try:
                if os.write(fd, data) != len(data):
                    raise OSError(errno.ENOSPC, "short write")
            except OSError as e:
                os.ftruncate(fd, size)
                raise OSError(
                    e.errno, f"{self.path}: metrics line of step {record.get('step')} not written ({e.strerror})"
                ) from None
        finally:
            os.close(fd)
        if self.tb is not None:
            for k, v in record.items():
                if k != "step":
                    self.tb.add_scalar(k, v, record["step"])
        if verbose:
            log.info(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()))


def _progress(total: int, start: int, active: bool):
    try:
        from tqdm import tqdm
    except ImportError:
        return lambda record: None
    if not active:
        return lambda record: None
    bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, file=sys.stderr)

    def update(record: dict[str, Any]) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
        if bar.n >= total:
            bar.close()

    return update


def _jsonable(x: Any) -> Any:
    return json.loads(json.dumps(x, default=str))
