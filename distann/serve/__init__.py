"""Serving: the HTTP search service over a cluster-hosted index, and its Python client.

Needs the ``serve`` extra (``pip install "distann[serve]"``: FastAPI, uvicorn,
prometheus_client, httpx).
"""
