"""Dataset-scale near-duplicate detection (``distann dedup``); see ``dedup.driver``."""

from distann.dedup.driver import dedup

__all__ = ["dedup"]
