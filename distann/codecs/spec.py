"""The index spec: a Faiss index-factory string parsed into a validated object.

Grammar (comma-separated parts, in this order)::

    [transform,]* IVF<nlist>, quantizer [,RFlat]

    transform  = PCA<D> | PCAR<D> | RR<D> | OPQ<M> | OPQ<M>_<D>
    quantizer  = Flat | SQ8 | SQfp16 | PQ<M> | PQ<M>x<bits>      (bits 1..8, default 8)

``PCA<D>`` projects on the D leading principal components, ``PCAR<D>`` also applies a random
rotation after the projection, ``RR<D>`` is a random rotation (to D dimensions),
``OPQ<M>[_<D>]`` a rotation (to D dimensions) trained to suit a PQ with M sub-quantizers.
``RFlat`` re-ranks the best ``k_factor * k`` candidates with the stored raw vectors.

:func:`parse_spec` checks the grammar; :meth:`IndexSpec.dims` checks it against the data's
dimension (a PQ's M must divide the dimension it sees). Both raise
:class:`~distann.errors.ValidationError` naming the part that is wrong.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from distann.errors import ValidationError

_TRANSFORM_RE = re.compile(r"(PCAR|PCA|RR)(\d+)|OPQ(\d+)(?:_(\d+))?")
_IVF_RE = re.compile(r"IVF(\d+)")
_PQ_RE = re.compile(r"PQ(\d+)(?:x(\d+))?")
SCALAR = ("Flat", "SQ8", "SQfp16")
MAX_PQ_BITS = 8

GRAMMAR = ("'[transform,]IVF<nlist>,<quantizer>[,RFlat]' with transform PCA<D>, PCAR<D>, RR<D> or "
           "OPQ<M>[_<D>] and quantizer Flat, SQ8, SQfp16, PQ<M> or PQ<M>x<bits>, e.g. 'IVF1024,Flat', "
           "'IVF1024,SQ8', 'OPQ16,IVF1024,PQ16', 'IVF1024,PQ16,RFlat'")


@dataclass(frozen=True)
class TransformSpec:
    """One pre-transform: ``kind`` PCA, PCAR, RR or OPQ; ``d_out`` None keeps the input
    dimension (OPQ without ``_<D>``); ``m`` is OPQ's sub-quantizer count."""

    kind: str
    d_out: int | None = None
    m: int = 0

    def __str__(self) -> str:
        if self.kind == "OPQ":
            return f"OPQ{self.m}" + (f"_{self.d_out}" if self.d_out is not None else "")
        return f"{self.kind}{self.d_out}"


@dataclass(frozen=True)
class QuantizerSpec:
    """The vector quantizer: ``kind`` Flat, SQ8, SQfp16 or PQ (``m`` sub-quantizers of ``nbits``)."""

    kind: str
    m: int = 0
    nbits: int = 8

    def __str__(self) -> str:
        if self.kind != "PQ":
            return self.kind
        return f"PQ{self.m}" + (f"x{self.nbits}" if self.nbits != 8 else "")


@dataclass(frozen=True)
class IndexSpec:
    """A parsed spec string; ``str()`` gives its canonical form."""

    transforms: tuple[TransformSpec, ...]
    nlist: int
    quantizer: QuantizerSpec
    refine: bool = False

    @property
    def codec(self) -> str:
        """The vector quantizer's kind (Flat, SQ8, SQfp16, PQ)."""
        return self.quantizer.kind

    def __str__(self) -> str:
        parts = [str(t) for t in self.transforms] + [f"IVF{self.nlist}", str(self.quantizer)]
        return ",".join(parts + (["RFlat"] if self.refine else []))

    def dims(self, d: int, param: str = "spec") -> list[int]:
        """The dimension after each transform (``[d, d1, ...]``); ValidationError if a transform
        or the PQ does not fit the dimension it receives."""
        out = [d]
        for t in self.transforms:
            d_in = out[-1]
            d_out = d_in if t.d_out is None else t.d_out
            if t.kind in ("PCA", "PCAR") and d_out > d_in:
                raise ValidationError(param, str(self), f"{t}: a PCA cannot output more dimensions than it "
                                                        f"receives ({d_in}); use at most {t.kind}{d_in}")
            if t.kind == "OPQ":
                if d_out > d_in:
                    raise ValidationError(param, str(self), f"{t}: OPQ cannot output more dimensions than it "
                                                            f"receives ({d_in})")
                if d_out % t.m:
                    raise ValidationError(param, str(self), f"{t}: its {t.m} sub-quantizers must divide its "
                                                            f"output dimension {d_out}")
            out.append(d_out)
        q = self.quantizer
        if q.kind == "PQ" and out[-1] % q.m:
            last = out[-1]
            fits = [m for m in range(q.m, 0, -1) if last % m == 0][0]
            lower, upper = last - last % q.m, last - last % q.m + q.m
            reduce = f"OPQ{q.m}_{lower} or PCA{lower}, " if lower else ""
            raise ValidationError(param, str(self), f"{q}: {q.m} sub-quantizers do not divide the dimension "
                                                    f"{last} they see; use PQ{fits}, or first a transform to a "
                                                    f"multiple of {q.m}: {reduce}RR{upper}")
        return out


def parse_spec(spec: object, param: str = "spec") -> IndexSpec:
    """Parse and check a spec string (grammar only: see :meth:`IndexSpec.dims` for the dimension)."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValidationError(param, spec, f"a spec string {GRAMMAR}")
    parts = [p.strip() for p in spec.split(",")]
    if not any(_IVF_RE.fullmatch(p) for p in parts):
        raise ValidationError(param, spec, f"an IVF<nlist> part (the coarse quantizer); the grammar is {GRAMMAR}")
    transforms: list[TransformSpec] = []
    i = 0
    while i < len(parts) and not _IVF_RE.fullmatch(parts[i]):
        transforms.append(_transform(parts[i], spec, param))
        i += 1
    nlist = int(_IVF_RE.fullmatch(parts[i]).group(1))  # type: ignore[union-attr]
    if nlist < 1:
        raise ValidationError(param, spec, "IVF<nlist> with nlist >= 1")
    if i + 1 == len(parts):
        raise ValidationError(param, spec, f"a quantizer after IVF{nlist}: Flat, SQ8, SQfp16 or PQ<M>[x<bits>]")
    quantizer = _quantizer(parts[i + 1], spec, param)
    rest = parts[i + 2:]
    refine = rest == ["RFlat"]
    if rest and not refine:
        raise ValidationError(param, spec, f"nothing after the quantizer but an optional RFlat; got "
                                           f"{','.join(rest)!r} ({GRAMMAR})")
    return IndexSpec(tuple(transforms), nlist, quantizer, refine)


def _transform(part: str, spec: str, param: str) -> TransformSpec:
    m = _TRANSFORM_RE.fullmatch(part)
    if m is None:
        raise ValidationError(param, spec, f"unsupported part {part!r}: before IVF<nlist> only the transforms "
                                           f"PCA<D>, PCAR<D>, RR<D>, OPQ<M>[_<D>] ({GRAMMAR})")
    if m.group(1):
        d_out = int(m.group(2))
        if d_out < 1:
            raise ValidationError(param, spec, f"{part}: an output dimension >= 1")
        return TransformSpec(m.group(1), d_out)
    mm = int(m.group(3))
    d_out = int(m.group(4)) if m.group(4) is not None else None
    if mm < 1 or (d_out is not None and d_out < 1):
        raise ValidationError(param, spec, f"{part}: OPQ<M>[_<D>] with M >= 1 and D >= 1")
    return TransformSpec("OPQ", d_out, mm)


def _quantizer(part: str, spec: str, param: str) -> QuantizerSpec:
    if part in SCALAR:
        return QuantizerSpec(part)
    m = _PQ_RE.fullmatch(part)
    if m is None:
        raise ValidationError(param, spec, f"unsupported quantizer {part!r}: Flat, SQ8, SQfp16, PQ<M> or "
                                           f"PQ<M>x<bits> ({GRAMMAR})")
    mm = int(m.group(1))
    nbits = int(m.group(2)) if m.group(2) is not None else 8
    if mm < 1:
        raise ValidationError(param, spec, f"{part}: PQ<M> with M >= 1 sub-quantizers")
    if not 1 <= nbits <= MAX_PQ_BITS:
        raise ValidationError(param, spec, f"{part}: PQ codes of 1 to {MAX_PQ_BITS} bits per sub-quantizer "
                                           f"(stored one byte each); got {nbits}")
    return QuantizerSpec("PQ", mm, nbits)
