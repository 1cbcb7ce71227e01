"""The training loop: stages, blends, packing, accumulation, clipping, cosine LR, metrics and resume.

    nvlm train --config recipes/tiny-d-sft.yaml [--key value ...]
    torchrun --nproc_per_node 8 -m nvlm.cli train --config recipes/nvlm-d-72b-sft.yaml

Each optimiser step reads ``grad_accum`` micro-batches per rank; the loss is the mean over every supervised
token of the global batch (the sum of token losses over all micro-batches and ranks divided by their count),
as Megatron's ``calculate_per_token_loss``. Frozen parameters never reach the optimiser.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from nvlm.checkpoint import load_parts
from nvlm.config import preset
from nvlm.data.blend import Blend, Source
from nvlm.data.labels import IGNORE, Example
from nvlm.data.packing import collate, padding_fraction
from nvlm.image import ImageProcessor
from nvlm.models.nvlm import NVLM
from nvlm.processor import BatchInputs, Processor
from nvlm.tokenizer import Tokenizer
from nvlm.train import distributed, state
from nvlm.train.config import TrainConfig
from nvlm.train.stages import set_trainable

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0}  # dense bf16


def build(cfg: TrainConfig) -> tuple[NVLM, Tokenizer]:
    """The starting point: an NVLM checkpoint (``init``, optionally converted to ``arch``), a preset with a
    ViT and an LLM checkpoint, or a preset from random weights (seeded)."""
    if cfg.init:
        model = NVLM.from_pretrained(cfg.init, dtype=torch.float32, arch=cfg.arch)
        return model, Tokenizer.from_pretrained(cfg.tokenizer or cfg.init)
    if not cfg.preset:
        raise ValueError("say where training starts: init (an NVLM checkpoint) or preset (+ vit and llm)")
    config = preset(cfg.preset)
    if cfg.arch:
        config = config.with_arch(cfg.arch)
    tok_dir = cfg.tokenizer or cfg.llm
    if tok_dir is None:
        raise ValueError("a preset needs a tokenizer directory (tokenizer: DIR)")
    tokenizer = Tokenizer.from_pretrained(tok_dir)
    if tokenizer.vocab_size > config.llm.vocab_size:
        raise ValueError(f"{tok_dir}: {tokenizer.vocab_size} tokens do not fit the preset's {config.llm.vocab_size}")
    llm = replace(config.llm, eos_token_id=tokenizer.eos_token_id or config.llm.eos_token_id)
    config = replace(config, llm=llm, image_token_id=tokenizer.token_to_id(config.image_token), torch_dtype="float32")
    if bool(cfg.vit) != bool(cfg.llm):
        raise ValueError("give both vit and llm checkpoints, or neither")
    if cfg.vit:
        return load_parts(config, cfg.vit, cfg.llm, dtype=torch.float32), tokenizer
    torch.manual_seed(cfg.seed)
    model = NVLM(config)
    model.language_model.init_weights()
    return model, tokenizer


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to ``lr``, then cosine decay to ``min_lr`` at ``steps``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


class Batcher:
    """Micro-batches from the blend: rows of ``seq_len`` packed first-fit (or one example per row).

    An example that does not fit waits for the next micro-batch; the data state saved with a checkpoint is
    the stream position before it, so resume reads it again.
    """

    def __init__(self, blend: Blend, processor: Processor, rows: int, seq_len: int, pack: bool) -> None:
        self.blend, self.processor, self.rows, self.seq_len, self.pack = blend, processor, rows, seq_len, pack
        self.waiting: tuple[Example, dict[str, Any]] | None = None

    def state_dict(self) -> dict[str, Any]:
        return self.waiting[1] if self.waiting else self.blend.state_dict()

    def _next(self) -> tuple[Example, dict[str, Any]]:
        if self.waiting:
            item, self.waiting = self.waiting, None
            return item
        before = self.blend.state_dict()
        return self.blend.next_example(), before

    def __call__(self) -> BatchInputs:
        if not self.pack:
            return collate(self.processor, [[self._next()[0]] for _ in range(self.rows)])
        rows: list[list[Example]] = [[] for _ in range(self.rows)]
        room = [self.seq_len] * self.rows
        while True:
            ex, before = self._next()
            r = next((i for i, free in enumerate(room) if free >= len(ex)), None)
            if r is None:
                self.waiting = (ex, before)
                return collate(self.processor, [row for row in rows if row], self.seq_len)
            rows[r].append(ex)
            room[r] -= len(ex)


def train(cfg: TrainConfig) -> Path:
    """Run (or resume) a training run; returns the directory of the final model."""
    rank, world, device = distributed.setup(cfg.device)
    model, tokenizer = build(cfg)
    cfg.resolve(model.config.arch)
    trainable = set_trainable(model, cfg.stage, cfg.trainable)
    c = model.config
    images = ImageProcessor(tile_size=c.tile_size, max_tiles=cfg.max_tiles, min_tiles=min(c.min_tiles, cfg.max_tiles),
                            use_thumbnail=c.use_thumbnail)  # fmt: skip
    processor = Processor(tokenizer, images, c, chat_template=cfg.chat_template)
    model.to(device).train()
    if cfg.activation_checkpointing:
        distributed.checkpoint_activations(model)
    if world > 1 and cfg.fsdp:
        distributed.shard(model)
    params = dict(model.named_parameters())
    decay = [params[n] for n in trainable if params[n].ndim >= 2]
    no_decay = [params[n] for n in trainable if params[n].ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=cfg.betas)  # fmt: skip
    sources = [Source(d["path"], float(d.get("weight", 1.0))) for d in cfg.data]
    blend = Blend(processor, sources, cfg.seq_len, cfg.seed, rank, world)
    batcher = Batcher(blend, processor, cfg.micro_batch_size, cfg.seq_len, cfg.pack)
    out = Path(cfg.out_dir)
    ckpt_root = out / "checkpoints"
    step = 0
    last = state.latest(ckpt_root)
    if last is not None:
        saved = state.load(last, model, optimizer)
        step = saved["step"]
        blend.load_state_dict(saved["data"])
        if rank == 0:
            print(f"resuming from {last} (step {step})", file=sys.stderr)
    log = Metrics(out, step, rank == 0)
    use_amp = device.type == "cuda"
    n_params = sum(p.numel() for p in params.values())
    peak = cfg.peak_tflops or (next((v for k, v in PEAK_TFLOPS.items() if k in torch.cuda.get_device_name(device)), None)
                               if use_amp else None)  # fmt: skip
    progress = _progress(cfg.steps, step, rank == 0)
    while step < cfg.steps:
        t0 = time.perf_counter()
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        micro = [batcher() for _ in range(cfg.grad_accum)]
        supervised = distributed.all_sum(sum(float((b["targets"] != IGNORE).sum()) for b in micro), device)
        tokens = distributed.all_sum(sum(float(b["attention_mask"].gt(0).sum()) for b in micro), device)
        loss_sum = 0.0
        for batch in micro:
            batch = batch.to(device)
            targets = batch.pop("targets")
            with torch.autocast(device.type, dtype=getattr(torch, cfg.dtype), enabled=use_amp):
                logits = model(**batch).logits
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum")
            (loss * world / supervised).backward()
            loss_sum += float(loss.detach())
        if world > 1 and not cfg.fsdp:
            distributed.average_gradients([params[n] for n in trainable])
        grad_norm = float(torch.nn.utils.clip_grad_norm_([params[n] for n in trainable], cfg.grad_clip))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        seconds = time.perf_counter() - t0
        record = {"step": step, "loss": distributed.all_sum(loss_sum, device) / supervised, "lr": lr,
                  "grad_norm": grad_norm, "tokens": int(tokens), "supervised_tokens": int(supervised),
                  "tokens_per_s": tokens / seconds, "padding": sum(map(padding_fraction, micro)) / len(micro),
                  "skipped": sum(blend.skipped.values())}  # fmt: skip
        if peak:
            record["mfu"] = 6 * n_params * tokens / seconds / (world * peak * 1e12)
        log(record, verbose=step % cfg.log_every == 0 or step == cfg.steps)
        progress(record)
        if step % cfg.save_every == 0 or step == cfg.steps:
            extra = {"data": batcher.state_dict(), "config": _jsonable(asdict(cfg))}
            state.save(ckpt_root, step, model, optimizer, extra, cfg.keep_last)
    return _save_final(model, processor, out / "model", rank)


def _save_final(model: NVLM, processor: Processor, path: Path, rank: int) -> Path:
    """``save_pretrained`` (the NVLM-D-72B layout for D), gathering the shards first under FSDP2.

    The model is written to ``<path>.tmp`` and renamed to ``path`` only once complete: a failed save (a full
    disk) removes its ``.tmp`` and leaves an existing ``path`` as it was, and a save killed part-way leaves
    only a ``.tmp``, discarded by the next save. The old ``path`` is moved aside (``.old``) just before the
    rename, so at no moment does ``path`` hold a partial model.
    """
    import shutil

    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        with torch.device("meta"):
            final = NVLM(model.config)
        final.load_state_dict(full, assign=True)
        if model.config.llm.tie_word_embeddings:
            final.language_model.lm_head.weight = final.language_model.model.embed_tokens.weight
        tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            final.save_pretrained(tmp, processor=processor)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
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
        import os

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
                print(f"{self.path}: dropped {dropped} unreadable line(s), e.g. one cut short by a full disk",
                      file=sys.stderr)  # fmt: skip
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, self.path)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tensorboard"))
        except ImportError:
            self.tb = None

    def __call__(self, record: dict[str, Any], verbose: bool) -> None:
        import errno
        import os

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
                raise OSError(e.errno, f"{self.path}: metrics line of step {record.get('step')} not written "
                                       f"({e.strerror})") from None  # fmt: skip
        finally:
            os.close(fd)
        if self.tb is not None:
            for k, v in record.items():
                if k != "step":
                    self.tb.add_scalar(k, v, record["step"])
        if verbose:
            print(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()),
                  file=sys.stderr, flush=True)  # fmt: skip


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
