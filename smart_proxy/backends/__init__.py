"""Backends other than a local llama-server: models served by another server the proxy forwards to."""

__all__: list[str] = []
