"""Run by the tests under ``torchrun`` (gloo, CPU), or alone as one process.

fsdp_runs.py train  RUNS_JSON        train each TrainConfig (a list of dicts) in turn, one process group
fsdp_runs.py resave CFG_JSON CKPT OUT  build the run's model and optimiser, load checkpoint CKPT (saved on
                                       any world size) and save it again under OUT (resharded as this world)
"""

import json
import sys
from pathlib import Path

from nvlm.train import distributed, state
from nvlm.train.config import TrainConfig
from nvlm.train.loop import build, make_optimizer, train


def main() -> None:
    mode = sys.argv[1]
    if mode == "train":
        for run in json.loads(sys.argv[2]):
            train(TrainConfig(**run))
    else:
        cfg = TrainConfig(**json.loads(sys.argv[2]))
        rank, world, device = distributed.setup(cfg.device)
        model, _, _ = build(cfg, device, world)
        optimizer = make_optimizer(model, cfg)
        saved, ranks = state.load(state.latest(Path(sys.argv[3])), model, optimizer)
        state.save(Path(sys.argv[4]), saved["step"], model, optimizer, ranks[min(rank, len(ranks) - 1)], {}, 1)
    distributed.teardown()


if __name__ == "__main__":
    main()
