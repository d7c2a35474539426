"""Host-side helpers shared by the kernel backends."""

from __future__ import annotations

import functools

import numpy as np

from distann.errors import ValidationError


def check_metric(metric: str) -> bool:
    """Return True for "ip", False for "l2"; raise ValidationError otherwise."""
    if metric != "l2" and metric != "ip":
        raise ValidationError("metric", metric, "must be 'l2' or 'ip'")
    return metric == "ip"


def f32(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32)


def i64(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.int64)


def u8(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.uint8)


def centre_of(rows: np.ndarray) -> np.ndarray:
    """A centre for the l2 computations on ``rows``: the mean of a strided sample of at most
    ~1024 rows, rounded to a multiple of a power of two no larger than the per-coordinate RMS
    spread.

    Any centre leaves distances unchanged; one within the data's spread removes the offset that
    makes ||q||^2 + ||x||^2 - 2<q, x> cancel (Faiss FAQ). The rounding keeps integer-valued
    data integer after centring, so its arithmetic stays exact and its ties exact.
    """
    step = max(1, rows.shape[0] // 1024)
    sample = rows[::step].astype(np.float64)
    mu = sample.mean(axis=0)
    rms = float(np.sqrt(((sample - mu) ** 2).mean())) if sample.size else 0.0
    if rms > 0 and np.isfinite(rms):
        unit = 2.0 ** np.floor(np.log2(rms))
        mu = np.round(mu / unit) * unit
    return mu.astype(np.float32)


def padded(shape: tuple[int, ...], is_ip: bool) -> tuple[np.ndarray, np.ndarray]:
    D = np.full(shape, -np.inf if is_ip else np.inf, dtype=np.float32)
    I = np.full(shape, -1, dtype=np.int64)
    return D, I


def scan_outputs(nq: int, nprobe, k, is_ip: bool, out):
    """(nprobe, k, D and I of shape (nq, nprobe, k): ``out`` or new padded arrays, whether
    there is nothing to scan)."""
    nprobe, k = int(nprobe), int(k)
    if out is None:
        D, I = padded((nq, nprobe, k), is_ip)
    else:
        D, I = out
        if D.shape != (nq, nprobe, k) or I.shape != D.shape or D.dtype != np.float32 or I.dtype != np.int64 \
                or not (D.flags.c_contiguous and I.flags.c_contiguous):
            raise ValidationError("out", (D.shape, I.shape), f"C-contiguous float32 / int64 arrays of shape "
                                                             f"{(nq, nprobe, k)}")
    return nprobe, k, D, I, nq == 0 or nprobe <= 0 or k <= 0


def check_codes(codes: np.ndarray, ncols: int, what: str) -> None:
    if codes.ndim != 2 or codes.shape[1] != ncols:
        raise ValidationError("codes", codes.shape, f"must be (N, {ncols}): {what}")


@functools.lru_cache(maxsize=1)
def f16_table() -> np.ndarray:
    """float32 value of every IEEE half-precision bit pattern (65536 entries, 256 KiB), built
    once per process; the fp16 scalar quantizer's decode table."""
    return np.arange(65536, dtype=np.uint16).view(np.float16).astype(np.float32)
