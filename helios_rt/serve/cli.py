"""The `serve` subcommand: bind the port, load a model, serve the page and the stream WebSocket."""

from __future__ import annotations

import argparse
import errno
import os
import socket

from ..options import add_engine_arguments, engine_config
from .config import ServeConfig

_TOKEN_ENV = "HELIOS_RT_TOKEN"
_EXAMPLE = """example:
  helios-rt serve --model demo                    # then open http://127.0.0.1:8765/
  HELIOS_RT_TOKEN=$(openssl rand -hex 16) helios-rt serve --model demo --host 0.0.0.0
                                                  # then open http://HOST:8765/#token=<that token>
"""


class _Help(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults after each option's help, and the example kept as written."""


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    """Add `serve` to the CLI's subparsers; `run_serve(args)` runs it."""
    defaults = ServeConfig()
    p = subparsers.add_parser("serve", help="serve a page that plays the video live and switches prompts",
                              description="Serve a page that plays the video as it is generated and switches "
                              "prompts live.", epilog=_EXAMPLE,
                              formatter_class=_Help)  # fmt: skip
    p.add_argument("--model", required=True, default=argparse.SUPPRESS,
                   help="'demo' (built-in, bouncing shapes) or a Helios checkpoint folder")  # fmt: skip
    s = p.add_argument_group("serving options")
    s.add_argument("--host", default=defaults.host,
                   help="address to bind; another than this machine's needs a token in --token-env")  # fmt: skip
    s.add_argument("--port", type=int, default=defaults.port, help="TCP port, bound before the model loads")
    s.add_argument("--max-sessions", type=int, default=defaults.max_sessions,
                   help="streams generating at once (they take turns)")  # fmt: skip
    s.add_argument("--max-queue", type=int, default=defaults.max_queue, help="sessions that may wait for a turn")
    s.add_argument("--chunks-ahead", type=int, default=defaults.chunks_ahead,
                   help="chunks generated ahead of what a client received")  # fmt: skip
    s.add_argument("--jpeg-qscale", type=int, default=defaults.jpeg_qscale,
                   help="JPEG quantiser, 2 (best) .. 31 (smallest)")  # fmt: skip
    s.add_argument("--jpeg-chroma", default=defaults.jpeg_chroma, choices=["444", "420"],
                   help="420: about half the bytes, colour edges as each browser upsamples them")  # fmt: skip
    s.add_argument("--token-env", default=_TOKEN_ENV, metavar="VAR",
                   help="environment variable holding a bearer token to require (unset or empty: none)")  # fmt: skip
    add_engine_arguments(p.add_argument_group("engine options"))
    p.set_defaults(func=run_serve)
    return p


def serve_config(args: argparse.Namespace) -> ServeConfig:
    """The server's limits from the command line; the token is read from the environment, never argv."""
    if "RANK" in os.environ or os.environ.get("WORLD_SIZE", "1") != "1":  # torchrun sets both on every rank
        raise ValueError("serve does not run under torchrun (every rank would start a server); "
                         "run `helios-rt serve` as one process")  # fmt: skip
    token = os.environ.get(args.token_env) or None
    if token is not None and len(token) < 8:
        raise ValueError(f"{args.token_env} holds a token of {len(token)} characters; use at least 8 "
                         "(e.g. `openssl rand -hex 16`)")  # fmt: skip
    config = ServeConfig(host=args.host, port=args.port, token=token, max_sessions=args.max_sessions,
                         max_queue=args.max_queue, chunks_ahead=args.chunks_ahead, jpeg_qscale=args.jpeg_qscale,
                         jpeg_chroma=args.jpeg_chroma)  # fmt: skip
    if not config.is_local and token is None:
        raise ValueError(f"--host {args.host} is reachable from other machines: set a token in {args.token_env} "
                         "first, or serve on 127.0.0.1")  # fmt: skip
    return config


def bind(config: ServeConfig) -> socket.socket:
    """The listening socket, bound before the model loads: a port in use fails in a second, not after a load."""
    try:
        infos = socket.getaddrinfo(config.host, config.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as err:
        raise ValueError(f"--host {config.host} is not an address of this machine ({err.strerror})") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart does not wait for TIME_WAIT
    try:
        sock.bind(address)
        sock.listen(128)
    except OSError as err:
        sock.close()
        if err.errno == errno.EADDRINUSE:
            raise ValueError(f"port {config.port} on {config.host} is in use (another helios-rt serve?); stop it "
                             "or pick another port with --port") from None  # fmt: skip
        raise ValueError(f"cannot listen on {config.host}:{config.port}: {err.strerror}") from None
    return sock


def run_serve(args: argparse.Namespace) -> int:
    """Bind the port, load the model, warm it up, serve until Ctrl-C."""
    from ..engine import Engine
    from ._require import require_aiohttp

    config = serve_config(args)  # options checked before the model loads
    require_aiohttp()
    from aiohttp import web

    from .app import create_app

    sock = bind(config)
    try:
        with Engine.from_pretrained(args.model, engine_config(args)) as engine:
            engine.warmup()
            url = f"http://{'127.0.0.1' if config.host in ('0.0.0.0', '::') else config.host}:{config.port}/"
            print(f"helios-rt serve: open {url}{'#token=...' if config.token else ''}", flush=True)
            # no access log: the page's WebSocket URL carries the token (?token=) and would be written there
            web.run_app(create_app(engine, config), sock=sock, print=None, access_log=None)
    finally:
        sock.close()
    return 0
