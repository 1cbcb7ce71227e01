"""``nvlm serve --model DIR [--host 127.0.0.1] [--port 8000]``: the OpenAI-compatible server."""

from __future__ import annotations

import argparse
from pathlib import Path

from nvlm.quant import add_quantize_argument


def _serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from nvlm.serve.app import Limits, create_app
    except ImportError:
        raise ImportError("nvlm serve needs the server extra: pip install 'nvlm[server]'") from None
    from nvlm.models.nvlm import NVLM
    from nvlm.processor import Processor
    from nvlm.serve.engine import EngineThread

    model = NVLM.from_pretrained(args.model, dtype=args.dtype, device=args.device, quantize=args.quantize)
    processor = Processor.from_pretrained(args.model, max_tiles=args.max_tiles)
    engine = EngineThread(model, processor, max_batch=args.max_batch, max_waiting=args.max_queue)
    limits = Limits(
        max_body_bytes=args.max_body_mb * 2**20,
        max_images=args.max_images,
        max_image_pixels=args.max_image_pixels,
        max_queue=args.max_queue,
        timeout_s=args.timeout,
        allow_remote_images=args.allow_remote_images,
        fetch_timeout_s=args.fetch_timeout,
        local_image_dir=args.image_dir,
    )
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
    p.add_argument("--max-batch", type=int, default=32, help="sequences decoded together")
    p.add_argument("--max-queue", type=int, default=256, help="waiting sequences before 429")
    p.add_argument("--max-images", type=int, default=8, help="images per request")
    p.add_argument("--max-image-pixels", type=int, default=25_000_000)
    p.add_argument("--max-body-mb", type=int, default=20)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--allow-remote-images", action="store_true", help="fetch http(s) image URLs (public hosts only)")
    p.add_argument("--fetch-timeout", type=float, default=10.0, help="seconds for all remote images of a request")
    p.add_argument("--image-dir", default=None, help="serve file:// images from under this directory")
    p.set_defaults(func=_serve)
