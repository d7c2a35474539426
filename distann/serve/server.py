"""Running the service: open the index on the cluster, then serve it with uvicorn."""

from __future__ import annotations

import ipaddress
import logging

from distann.serve.app import ServeSettings, create_app
from distann.serve.holder import IndexHolder
from distann.store.location import Location

log = logging.getLogger(__name__)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def make_holder(url: str, client, *, replicas: int = 1, storage_options: dict | None = None) -> IndexHolder:
    """Open the committed index at ``url`` on ``client``'s cluster (resident) behind a holder
    that can switch generations."""
    from distann.search.index import open_index

    def open_generation(loc: Location):
        return open_index(loc.url, storage_options=loc.storage_options, client=client, replicas=replicas)

    return IndexHolder(Location(url, dict(storage_options or {})), open_generation)


def serve(holder: IndexHolder, settings: ServeSettings, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve until interrupted (SIGINT / SIGTERM)."""
    import uvicorn

    if not is_loopback(host) and not settings.token:
        log.warning("serving on %s without a token: anyone who reaches this address can search the index "
                    "(set --token or DISTANN_TOKEN)", host)
    app = create_app(holder, settings)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False, lifespan="on")
    server = uvicorn.Server(config)
    log.info("serving %s (generation %d) on http://%s:%d (OpenAPI: /docs)", holder.loc.url,
             holder.current.generation, host, port)
    server.run()
