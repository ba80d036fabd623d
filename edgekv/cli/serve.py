"""`edgekv serve`: the OpenAI-compatible HTTP server (edgekv/server) on uvicorn."""

from __future__ import annotations

import signal
import socket
from pathlib import Path

import click

from edgekv.cli.common import backend_option, console, policy_option, positions_option
from edgekv.core.errors import EdgekvError

API_KEY_VARIABLE = "EDGEKV_API_KEY"
SHUTDOWN_GRACE_S = 5  # how long streams in flight may go on after SIGTERM before they are cancelled


def check_port_free(host: str, port: int) -> None:
    """A clear error for a port in use, before minutes of start-up would end in uvicorn's."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as e:
            raise EdgekvError(f"cannot listen on {host}:{port} ({e.strerror}); pick another with --port") from None


@click.command()
@click.argument("directory", type=click.Path(path_type=Path), required=False)
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (loopback only by default; 0.0.0.0 opens it to the network).")
@click.option("--port", type=int, default=8000, show_default=True)
@click.option("--api-key", default=None, envvar=API_KEY_VARIABLE,
              help=f"Require 'Authorization: Bearer KEY' on every request [default: ${API_KEY_VARIABLE}, else none].")
@policy_option
@positions_option
@backend_option
@click.option("--max-context", type=int, default=None,
              help="Largest prompt plus max_tokens a request may ask for [default: the model's trained context].")
@click.option("--max-tokens", "default_max_tokens", type=int, default=512, show_default=True,
              help="max_tokens of a request that gives none.")
@click.option("--queue-size", type=click.IntRange(min=1), default=8, show_default=True,
              help="Requests that may wait for the engine; more are refused with 503.")
@click.option("--timeout", "timeout_s", type=click.FloatRange(min=0, min_open=True), default=600, show_default=True,
              help="Seconds a request may take, waiting included; then it stops with 504.")
@click.option("--cache-disk-mib", type=click.IntRange(min=0), default=4096, show_default=True,
              help="Conversations' KV caches kept in files once the host budget is full; the least recent "
                   "are dropped past this.")
@click.option("--spill-dir", type=click.Path(path_type=Path), default=None,
              help="Where the session directory for spilled KV goes [default: system temp].")
def serve(directory, host, port, api_key, policy, positions, backend, max_context, default_max_tokens, queue_size,
          timeout_s, cache_disk_mib, spill_dir) -> None:
    """Serve the model over HTTP with OpenAI's chat-completions API (POST /v1/chat/completions)."""
    import logging

    import uvicorn

    from edgekv.api import Model
    from edgekv.server.app import ServerSettings, create_app

    check_port_free(host, port)
    model = Model.open(directory, policy, backend, positions, spill_dir)
    try:
        trained = model.engine.manifest.model["max_context"]
        if max_context is not None and max_context < 2:
            raise EdgekvError("--max-context must be at least 2 tokens")
        settings = ServerSettings(
            max_context=max_context or trained, cache_memory_bytes=model.engine.manifest.profile.host_kv_bytes,
            cache_disk_bytes=cache_disk_mib * 2**20, api_key=api_key or None, queue_size=queue_size,
            timeout_s=timeout_s, default_max_tokens=default_max_tokens)
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        console.print(f"serving {model.name} ({policy}) on http://{host}:{port}/v1"
                      f"{' (API key required)' if settings.api_key else ''}", highlight=False)
        server = uvicorn.Server(uvicorn.Config(create_app(model, settings), host=host, port=port, access_log=False,
                                               timeout_graceful_shutdown=SHUTDOWN_GRACE_S, log_level="info"))
        # On SIGTERM or Ctrl-C uvicorn stops accepting, lets streams in flight finish for a few seconds,
        # then cancels them, and the app's shutdown stops the engine thread. uvicorn then raises the signal
        # again for the handler it found: a no-op here, so that close() removes the spill files and the
        # exit status is 0.
        previous = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            server.run()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
    finally:
        model.close()
