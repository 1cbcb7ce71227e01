"""The server's limits, one place for their defaults: ``create_app`` reads them, ``nvlm serve`` makes its
options from them (``nvlm.options``). No FastAPI here, so the command line is built without the server extra."""

from __future__ import annotations

from dataclasses import dataclass

from nvlm.options import option

MIB = 2**20


@dataclass
class Limits:
    max_body_bytes: int = 20 * MIB  # counted as received, chunked bodies too (``--max-body-mb``)
    max_images: int = option(8, "images per request")
    max_image_pixels: int = option(25_000_000, "pixels per image, checked from the header before decoding")
    max_queue: int = option(256, "waiting sequences before 429")
    timeout_s: float = option(600.0, "seconds per request", flag="--timeout")
    default_max_tokens: int = 1024
    allow_remote_images: bool = option(False, "fetch http(s) image URLs (public hosts only; see fetch.py)")
    fetch_timeout_s: float = option(10.0, "seconds for all remote images of a request", flag="--fetch-timeout")
    fetch_workers: int = 4  # the fetch pool's threads (its own: slow hosts hold nothing else)
    local_image_dir: str | None = option(None, "serve file:// images from under this directory", flag="--image-dir")
