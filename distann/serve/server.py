"""Running the service: open the index on the cluster, then serve it with uvicorn (HTTP, or
HTTPS with ``--tls-cert`` / ``--tls-key``)."""

from __future__ import annotations

import ipaddress
import logging
import os
import ssl

from distann.errors import ValidationError
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


def check_tls(cert: str | None, key: str | None) -> bool:
    """Validate ``--tls-cert`` / ``--tls-key`` before anything starts: both or neither, existing
    files, a certificate that loads and a private key that loads and matches it. True if TLS is on."""
    if cert is None and key is None:
        return False
    if cert is None or key is None:
        given, missing = ("tls_cert", "tls_key") if key is None else ("tls_key", "tls_cert")
        raise ValidationError(missing, None, f"a file as well: {given} was given, and TLS needs both the "
                              "certificate (chain) and its private key")
    for param, path in (("tls_cert", cert), ("tls_key", key)):
        if not os.path.isfile(path):
            raise ValidationError(param, path, "an existing PEM file")
    try:  # the certificate alone first, so that an error names the file at fault
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=cert)
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise ValidationError("tls_cert", cert, f"a PEM certificate (chain) file: {_reason(exc)}") from None
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as exc:
        raise ValidationError("tls_key", key, "a PEM private key (unencrypted) matching the certificate of "
                              f"tls_cert: {_reason(exc)}") from None
    return True


def _reason(exc: BaseException) -> str:
    return getattr(exc, "reason", None) or getattr(exc, "strerror", None) or str(exc)


def make_holder(url: str, client, *, replicas: int = 1, storage_options: dict | None = None) -> IndexHolder:
    """Open the committed index at ``url`` on ``client``'s cluster (resident) behind a holder
    that can switch generations."""
    from distann.search.index import open_index

    def open_generation(loc: Location):
        return open_index(loc.url, storage_options=loc.storage_options, client=client, replicas=replicas)

    return IndexHolder(Location(url, dict(storage_options or {})), open_generation)


def make_server(holder: IndexHolder, settings: ServeSettings, host: str = "127.0.0.1", port: int = 8000, *,
                tls_cert: str | None = None, tls_key: str | None = None):
    """The uvicorn server of ``distann serve`` (not started): HTTPS with ``tls_cert`` and ``tls_key``
    (PEM files, checked here; plain HTTP is then refused on the port)."""
    import uvicorn

    tls = check_tls(tls_cert, tls_key)
    if not is_loopback(host):
        if not settings.token:
            log.warning("serving on %s without a token: anyone who reaches this address can search the index "
                        "(set --token or DISTANN_TOKEN)", host)
        if not tls:
            log.warning("serving on %s over plain HTTP: the token and the queries cross the network in clear "
                        "(set --tls-cert and --tls-key)", host)
    app = create_app(holder, settings)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False, lifespan="on",
                            ssl_certfile=tls_cert, ssl_keyfile=tls_key)
    server = uvicorn.Server(config)
    server.scheme = "https" if tls else "http"
    return server


def serve(holder: IndexHolder, settings: ServeSettings, host: str = "127.0.0.1", port: int = 8000, *,
          tls_cert: str | None = None, tls_key: str | None = None) -> None:
    """Serve until interrupted (SIGINT / SIGTERM); see :func:`make_server`."""
    server = make_server(holder, settings, host, port, tls_cert=tls_cert, tls_key=tls_key)
    log.info("serving %s (generation %d) on %s://%s:%d (OpenAPI: /docs)", holder.loc.url,
             holder.current.generation, server.scheme, host, port)
    server.run()
