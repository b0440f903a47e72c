"""What a transport message looks like on the wire: the header layout, building and parsing
it, the packed-buffer layout, dtype codes and receive specs. Pure torch (no
``torch.distributed``), so it is testable without processes.

Header: ``HEADER_WORDS`` int64 words: magic, tensor count, fold, CRC of the tag, payload
bytes, descriptor length, flags; then per tensor ``dtype code, ndim, dims...`` (words 8..47,
``_FLAG_TRUNCATED`` when they do not fit); then the tag's first 128 UTF-8 bytes (words
48..63). Packed buffer (``pack=True``): the header (when checked), then each tensor at the
next ``ALIGN``-byte offset, deterministic from the shapes alone.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["ALIGN", "HEADER_BYTES", "HEADER_WORDS", "ParsedHeader", "Spec", "build_header",
           "fmt_specs", "nbytes", "norm_spec", "packed_layout", "parse_header"]

HEADER_WORDS = 64
HEADER_BYTES = HEADER_WORDS * 8
_MAGIC = 0x48454C4958_5031  # "HELIXP1"
_W_MAGIC, _W_COUNT, _W_FOLD, _W_TAGCRC, _W_BYTES, _W_NDESC, _W_FLAGS = range(7)
_DESC_START, _DESC_END = 8, 48  # per tensor: dtype code, ndim, dims...
_TAG_START = _DESC_END  # words 48..63: the tag's first 128 UTF-8 bytes
_TAG_BYTES = (HEADER_WORDS - _TAG_START) * 8
_FLAG_TRUNCATED = 1

ALIGN = 64  # byte alignment of each tensor inside a packed buffer

_DTYPES = (
    torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32,
    torch.int16, torch.int8, torch.uint8, torch.bool, torch.complex64, torch.complex128,
)
_DTYPE_CODE = {d: i + 1 for i, d in enumerate(_DTYPES)}

Spec = tuple[tuple[int, ...], torch.dtype]


def dtype_code(dtype: torch.dtype) -> int:
    code = _DTYPE_CODE.get(dtype)
    if code is None:
        code = 1000 + zlib.crc32(str(dtype).encode())
    return code


def dtype_name(code: int) -> str:
    for d in _DTYPES:
        if _DTYPE_CODE[d] == code:
            return str(d).replace("torch.", "")
    for name in dir(torch):
        d = getattr(torch, name)
        if isinstance(d, torch.dtype) and dtype_code(d) == code:
            return str(d).replace("torch.", "")
    return f"dtype#{code}"


def norm_spec(spec: Any) -> Spec:
    """``(shape, dtype)`` or anything with ``.shape`` and ``.dtype`` (a tensor, a FakeTensor,
    a spec dataclass) -> ``(tuple_of_ints, dtype)``."""
    if type(spec) is tuple and len(spec) == 2 and isinstance(spec[1], torch.dtype):
        shape, dtype = spec
    else:
        try:
            shape, dtype = spec.shape, spec.dtype
        except AttributeError:
            raise TypeError(
                f"a receive spec must be (shape, dtype) or have .shape and .dtype; got {spec!r}"
            ) from None
    return tuple(map(int, shape)), dtype


def fmt_specs(specs: Sequence[Spec]) -> str:
    parts = [f"{tuple(shape)} {str(dtype).replace('torch.', '')}" for shape, dtype in specs]
    n = len(specs)
    return f"{n} tensor{'s' if n != 1 else ''} [{', '.join(parts)}]"


def nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    n = dtype.itemsize
    for d in shape:
        n *= d
    return n


def build_header(specs: Sequence[Spec], fold: int, tag: str) -> list[int]:
    words = [0] * HEADER_WORDS
    tag_bytes = tag.encode("utf-8")
    desc: list[int] = []
    total = 0
    for shape, dtype in specs:
        desc += [dtype_code(dtype), len(shape), *shape]
        total += nbytes(shape, dtype)
    words[_W_MAGIC] = _MAGIC
    words[_W_COUNT] = len(specs)
    words[_W_FOLD] = fold
    words[_W_TAGCRC] = zlib.crc32(tag_bytes)
    words[_W_BYTES] = total
    words[_W_NDESC] = len(desc)
    room = _DESC_END - _DESC_START
    if len(desc) > room:
        words[_W_FLAGS] |= _FLAG_TRUNCATED
    words[_DESC_START:_DESC_START + min(room, len(desc))] = desc[:room]
    padded = tag_bytes[:_TAG_BYTES].ljust(_TAG_BYTES, b"\0")
    for i in range(HEADER_WORDS - _TAG_START):
        words[_TAG_START + i] = int.from_bytes(padded[8 * i:8 * i + 8], "little", signed=True)
    return words


@dataclass
class ParsedHeader:
    valid: bool
    specs: list[tuple[tuple[int, ...], str]]
    truncated: bool
    fold: int
    tag: str
    nbytes: int

    def describe(self) -> str:
        if not self.valid:
            return "something that is not a transport header (the message streams are out of step, " \
                   "or the sender runs with HELIX_TRANSPORT_CHECK=off)"
        parts = [f"{shape} {dtype}" for shape, dtype in self.specs]
        more = ", ..." if self.truncated else ""
        n = len(self.specs) if not self.truncated else f">={len(self.specs)}"
        return f"{n} tensors [{', '.join(parts)}{more}] ({self.nbytes} bytes), fold {self.fold}, tag {self.tag!r}"


def parse_header(words: list[int]) -> ParsedHeader:
    if words[_W_MAGIC] != _MAGIC:
        return ParsedHeader(False, [], False, -1, "", 0)
    desc = words[_DESC_START:_DESC_START + min(words[_W_NDESC], _DESC_END - _DESC_START)]
    specs = []
    i = 0
    while i + 1 < len(desc) and len(specs) < words[_W_COUNT]:
        code, ndim = desc[i], desc[i + 1]
        if i + 2 + ndim > len(desc):
            break
        specs.append((tuple(desc[i + 2:i + 2 + ndim]), dtype_name(code)))
        i += 2 + ndim
    raw = b"".join(int(w).to_bytes(8, "little", signed=True) for w in words[_TAG_START:])
    tag = raw.rstrip(b"\0").decode("utf-8", errors="replace")
    truncated = bool(words[_W_FLAGS] & _FLAG_TRUNCATED) or len(specs) < words[_W_COUNT]
    return ParsedHeader(True, specs, truncated, words[_W_FOLD], tag, words[_W_BYTES])


def packed_layout(specs: Sequence[Spec], with_header: bool) -> tuple[list[int], int]:
    """Byte offsets of each tensor in a packed buffer and its total size (deterministic, so
    sender and receiver agree from the shapes alone)."""
    off = HEADER_BYTES if with_header else 0
    offsets = []
    for shape, dtype in specs:
        off = (off + ALIGN - 1) // ALIGN * ALIGN
        offsets.append(off)
        off += nbytes(shape, dtype)
    return offsets, off
