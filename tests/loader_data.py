"""Data and a process for the loader tests: a tiny processor, records that are told apart by their tokens,
and ``python loader_data.py MODE DATA OUT`` (a training process that holds a loader with workers).

Modes: ``interrupt`` (Ctrl-C after a batch), ``wait`` (hold the loader until killed), ``torchrun`` (under
torchrun after gloo's init: save this rank's first batches and state to OUT/rank{r}.pt).
"""

import faulthandler
import json
import os
import signal
import sys
import time
from pathlib import Path

import torch
from PIL import Image
from train_data import write_colors

from nvlm import Processor
from nvlm.data.blend import Source
from nvlm.data.loader import Loader
from nvlm.image import ImageProcessor
from nvlm.presets import preset
from nvlm.tokenizer import build_tiny_tokenizer

SEQ_LEN, ROWS = 96, 2


def processor(images: type[ImageProcessor] = ImageProcessor) -> Processor:
    return Processor(build_tiny_tokenizer(), images(tile_size=56, max_tiles=2), preset("tiny-d"))


class FailingImages(ImageProcessor):
    """An image processor with a bug: every image raises (importable, so a worker can unpickle it)."""

    def __call__(self, image: Image.Image) -> torch.Tensor:
        raise RuntimeError("boom")


def write_data(root: Path, n: int = 120) -> list[Source]:
    """Wide images (2 tiles + thumbnail), ``n`` distinct text records and two unusable lines."""
    write_colors(root, wide=True)
    lines = [
        json.dumps({"messages": [{"role": "user", "content": f"{a}+1?"}, {"role": "assistant", "content": str(a + 1)}]})
        for a in range(n)
    ]
    lines[3], lines[10] = "{not json", json.dumps({"messages": []})
    (root / "numbers.jsonl").write_text("".join(x + "\n" for x in lines))
    return sources_in(root)


def sources_in(root: Path) -> list[Source]:
    return [Source(str(root / "train.jsonl"), 1.0), Source(str(root / "numbers.jsonl"), 3.0)]


def loader(sources: list[Source], rank: int = 0, world_size: int = 1, num_workers: int = 0, **kw) -> Loader:
    return Loader(
        kw.pop("processor", None) or processor(), sources, SEQ_LEN, ROWS, True, 1, rank, world_size, num_workers, **kw
    )


def descendants(pid: int) -> list[int]:
    """The processes under ``pid`` (from /proc)."""
    parent = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError):
                pass
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        found += kids
        todo += kids
    return found


def main() -> None:
    mode, data, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    sources = sources_in(data) if mode == "torchrun" else write_data(data)  # torchrun's ranks share the test's
    if mode == "torchrun":
        import torch.distributed as dist

        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        with loader(sources, rank, world, num_workers=2) as data_loader:
            batches = [dict(data_loader()) for _ in range(4)]
            torch.save({"batches": batches, "state": data_loader.state_dict()}, out / f"rank{rank}.pt")
        dist.barrier()
        dist.destroy_process_group()
        return
    data_loader = loader(sources, num_workers=2)
    data_loader()
    # written whole, then renamed: the test polls for pids.json and would otherwise read it half written
    (out / "pids.json.tmp").write_text(json.dumps(descendants(os.getpid())))
    os.replace(out / "pids.json.tmp", out / "pids.json")
    if mode == "interrupt":  # in this thread: os.kill may hand the signal to one of torch's threads, and a
        faulthandler.dump_traceback_later(40, exit=True)  # an exit that hangs prints where (the test shows it)
        signal.signal(signal.SIGINT, signal.default_int_handler)  # Python's own, whatever the parent ignored
        signal.raise_signal(signal.SIGINT)  # main thread asleep for 600 s would never see it
    time.sleep(600)


if __name__ == "__main__":
    main()
