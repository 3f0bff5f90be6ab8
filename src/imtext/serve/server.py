"""``imtext serve``: the service on uvicorn, its first version loading in the background."""

from __future__ import annotations

import logging
import socket

from imtext.config import ServeConfig
from imtext.errors import ImtextError
from imtext.serve.app import create_app
from imtext.serve.service import Service

log = logging.getLogger("imtext.serve")


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host``:``port``; an :class:`ImtextError` saying what to do when
    the address is taken or not this machine's."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        family, kind, proto, _, address = infos[0]
        # The protocol must be IPPROTO_TCP (not 0): asyncio sets TCP_NODELAY only on such
        # sockets, and without it every keep-alive response waits ~40 ms for a delayed ACK.
        sock = socket.socket(family, kind, proto or socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        raise ImtextError(
            f"cannot listen on {host}:{port} ({exc.strerror or exc}); pass another --port or "
            "stop what uses it"
        ) from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def run_server(service: Service, cfg: ServeConfig, host: str, port: int) -> None:
    """Serve until interrupted (Ctrl-C, SIGTERM). The first version loads in the background
    (``/readyz`` answers 503 meanwhile); if it cannot be loaded, the server stops and this raises
    an :class:`ImtextError` with the reason."""
    import uvicorn

    if cfg.threads is not None:
        import faiss

        faiss.omp_set_num_threads(cfg.threads)
    sock = bind(host, port)
    config = uvicorn.Config(
        create_app(service, cfg),
        log_config=None,  # the CLI's logging: one format for imtext and uvicorn
        access_log=False,
        timeout_graceful_shutdown=5,
    )
    server = uvicorn.Server(config)

    def stop(reason: str) -> None:
        server.should_exit = True

    service.start(on_failure=stop)
    log.info("listening on http://%s:%d (search page at /, readiness at /readyz)", host, port)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        # uvicorn shut down gracefully on Ctrl-C / SIGTERM, then re-raised the signal.
        log.info("stopped")
    finally:
        service.stop()
        sock.close()
    if service.failure:
        raise ImtextError(f"serve: {service.failure}")
