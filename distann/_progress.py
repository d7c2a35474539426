"""Waiting on futures, with an optional progress bar (the CLI turns it on)."""

from __future__ import annotations

from collections.abc import Sequence


def wait_all(futures: Sequence, desc: str, progress: bool, gather: bool = True) -> list | None:
    """Wait for ``futures``, raising the first task error as soon as it happens; return their
    results in order, or None with ``gather=False`` (results stay on the workers)."""
    from distributed import as_completed

    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(futures), desc=desc, unit="task")
    try:
        for fut in as_completed(futures):
            if fut.status == "error":
                fut.result()  # raises the task's exception
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return [f.result() for f in futures] if gather else None
