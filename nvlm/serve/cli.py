"""``nvlm serve --model DIR [--host 127.0.0.1] [--port 8000]``: the OpenAI-compatible server."""

from __future__ import annotations

import argparse
from pathlib import Path

from nvlm.options import add_options, from_args
from nvlm.pretrained import NVLM
from nvlm.processor import Processor
from nvlm.quant import add_quantize_argument
from nvlm.serve.engine import MAX_BATCH, EngineThread
from nvlm.serve.limits import MIB, Limits


def _serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from nvlm.serve.app import create_app
    except ImportError:
        raise ImportError("nvlm serve needs the server extra: pip install 'nvlm[server]'") from None

    model = NVLM.from_pretrained(args.model, dtype=args.dtype, device=args.device, quantize=args.quantize)
    processor = Processor.from_pretrained(args.model, max_tiles=args.max_tiles)
    engine = EngineThread(model, processor, max_batch=args.max_batch, max_waiting=args.max_queue)
    limits = from_args(Limits, args, max_body_bytes=args.max_body_mb * MIB)
    name = args.served_model_name or Path(args.model).resolve().name
    uvicorn.run(create_app(engine, name, limits), host=args.host, port=args.port, log_level="info")
    engine.shutdown()
    return 0


def add_subcommand(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a model over the OpenAI chat-completions API")
    p.add_argument("--model", required=True, help="checkpoint directory")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default=None, help="the model id clients send (default: the directory name)")
    p.add_argument("--dtype", default=None)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 or auto")
    add_quantize_argument(p)
    p.add_argument("--max-tiles", type=int, default=None)
    p.add_argument("--max-batch", type=int, default=MAX_BATCH, help="sequences decoded together")
    p.add_argument("--max-body-mb", type=int, default=Limits.max_body_bytes // MIB, help="request body size limit")
    add_options(p, Limits)
    p.set_defaults(func=_serve)
