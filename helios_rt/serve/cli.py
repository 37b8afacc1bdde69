"""The `serve` subcommand: load a model and serve the page and the stream WebSocket."""

from __future__ import annotations

import argparse
import os

from .config import ServeConfig

_TOKEN_ENV = "HELIOS_RT_TOKEN"


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    """Add `serve` to the CLI's subparsers; `run_serve(args)` runs it."""
    from ..cli import add_engine_arguments

    p = subparsers.add_parser("serve", help="serve a page that plays the video live and switches prompts")
    p.add_argument("--model", required=True, help="'demo' (built-in, untrained) or a Helios checkpoint folder")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--max-sessions", type=int, default=1, help="streams generating at once (they take turns)")
    p.add_argument("--max-queue", type=int, default=8, help="sessions that may wait for a turn")
    p.add_argument("--chunks-ahead", type=int, default=2, help="chunks generated ahead of what a client received")
    p.add_argument("--jpeg-qscale", type=int, default=3, help="JPEG quantiser, 2 (best) .. 31 (smallest)")
    p.add_argument("--jpeg-chroma", default="444", choices=["444", "420"],
                   help="420: about half the bytes, colour edges as each browser upsamples them")  # fmt: skip
    p.add_argument("--token-env", default=_TOKEN_ENV,
                   help=f"variable holding a bearer token to require (default {_TOKEN_ENV}; unset: none)")  # fmt: skip
    add_engine_arguments(p)
    p.set_defaults(func=run_serve)
    return p


def serve_config(args: argparse.Namespace) -> ServeConfig:
    """The server's limits from the command line; the token is read from the environment, never argv."""
    if "RANK" in os.environ or os.environ.get("WORLD_SIZE", "1") != "1":  # torchrun sets both on every rank
        raise ValueError("serve does not run under torchrun (every rank would start a server); "
                         "run `helios-rt serve` as one process")  # fmt: skip
    token = os.environ.get(args.token_env) or None
    config = ServeConfig(host=args.host, port=args.port, token=token, max_sessions=args.max_sessions,
                         max_queue=args.max_queue, chunks_ahead=args.chunks_ahead, jpeg_qscale=args.jpeg_qscale,
                         jpeg_chroma=args.jpeg_chroma)  # fmt: skip
    if not config.is_local and token is None:
        raise ValueError(f"--host {args.host} is reachable from other machines: set a token in {args.token_env} "
                         "first, or serve on 127.0.0.1")  # fmt: skip
    return config


def run_serve(args: argparse.Namespace) -> int:
    """Load the model, warm it up, serve until Ctrl-C."""
    from ..cli import _engine_config
    from ..engine import Engine
    from ._require import require_aiohttp

    config = serve_config(args)  # options checked before the model loads
    require_aiohttp()
    from aiohttp import web

    from .app import create_app

    with Engine.from_pretrained(args.model, _engine_config(args)) as engine:
        engine.warmup()
        url = f"http://{'127.0.0.1' if config.host in ('0.0.0.0', '::') else config.host}:{config.port}/"
        print(f"helios-rt serve: open {url}{'#token=...' if config.token else ''}", flush=True)
        # no access log: the page's WebSocket URL carries the token (?token=) and would be written there
        web.run_app(create_app(engine, config), host=config.host, port=config.port, print=None, access_log=None)
    return 0
