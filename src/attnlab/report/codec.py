"""The compact form of the numbers in the report page: every step's values stored once, exactly as shown.

A step's values are kept at the precision the page writes them (4 decimals, or whole numbers when every
value is whole, as ``attnlab explain`` does): each value becomes the integer ``q = round(v * 10**dec)``,
written as a zigzag LEB128 varint (1 byte for |q| < 64, 2 for |q| < 8192, ...) and the bytes base64'd.
Attention weights over many tokens are mostly small, so a 256 x 256 map of MiniLM takes ~1.05 bytes per
cell instead of the ~8 characters of a JSON number. Codes 0, 1, 2 stand for nan, +inf and -inf (masked
scores); a finite value is stored as ``zigzag(q) + 3``. When the values spread evenly over a range of fewer than
65,533 steps (attention scores), fixed little-endian uint16 codes ``q - low + 3`` are shorter and are used
instead (``"mode": "u16"``). Values too large for exact integers in JavaScript (|q| >= 2**53) are stored as
raw little-endian float64 (``"mode": "f64"``).

Masks (True = hidden) are bit-packed (``np.packbits``, big-endian bit order) and base64'd.

:func:`decode` is the Python twin of the page's decoder (``report.js``): tests use it to check that the
page gets back exactly the numbers ``attnlab explain`` prints.
"""

from __future__ import annotations

import base64
from typing import Any

import numpy as np

from attnlab.errors import AttnlabInputError

__all__ = ["decimals_of", "decode", "decode_bits", "encode", "encode_bits", "quantise"]

_DECIMALS = 4
_SPECIAL = 3  # codes 0..2: nan, +inf, -inf
_MAX_EXACT = 2**53


def decimals_of(values: np.ndarray) -> int:
    """0 when every finite value is a whole number (within 1e-6, as the walkthrough's renderers), else 4."""
    finite = values[np.isfinite(values)]
    head = finite[:4096]  # most steps show their first non-whole number early: skip the full pass
    if head.size and not np.all(np.abs(head - np.round(head)) < 1e-6):
        return _DECIMALS
    whole = bool(finite.size) and bool(np.all(np.abs(finite - np.round(finite)) < 1e-6))
    return 0 if whole else _DECIMALS


def quantise(values: np.ndarray, dec: int) -> np.ndarray:
    """``round(v * 10**dec)`` as int64, rounding exactly as Python's ``f"{v:.{dec}f}"`` does (the float
    itself, not ``v * 10**dec``, decides a tie). Non-finite values give 0 (they are coded separately)."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    finite = np.isfinite(v)
    scaled = np.where(finite, v, 0.0) * (10.0 ** dec)
    q = np.round(scaled)
    near_tie = finite & (np.abs(np.abs(scaled - np.trunc(scaled)) - 0.5) < 1e-6)
    for i in np.flatnonzero(near_tie):  # rare: let the exact decimal expansion decide
        q[i] = float(f"{v[i]:.{dec}f}".replace(".", ""))
    return q.astype(np.int64)


def _varints(z: np.ndarray) -> bytes:
    """LEB128 of non-negative integer codes, vectorised: one column per byte, then the used bytes of
    each row in order."""
    if not z.size:
        return b""
    z = z.astype(np.uint32) if int(z.max()) < 2**32 else z.astype(np.uint64)
    n = np.ones(z.shape, dtype=np.int8)
    for k in range(1, 10):
        more = z >= (1 << (7 * k))
        if not more.any():
            break
        n += more
    width = int(n.max())
    table = np.empty((z.size, width), dtype=np.uint8)  # (N, bytes)
    for k in range(width):
        table[:, k] = ((z >> (7 * k)) & 0x7F).astype(np.uint8) | np.where(n > k + 1, 0x80, 0).astype(np.uint8)
    return table[np.arange(width)[None, :] < n[:, None]].tobytes()


def encode(values: Any, skip: Any = None) -> dict[str, Any]:
    """The compact form of an array: ``{"mode": "q", "dec": 0|4, "data": base64}`` (row-major order).

    ``skip``: a boolean mask (a causal mask's future cells); when every cell it covers holds one value
    (0 or -inf), those cells are left out of the data and ``"fill"`` holds that value (a number, or
    ``"-inf"`` / ``"inf"`` / ``"nan"``); decoding needs the same mask."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if skip is not None:
        hidden = np.asarray(skip, dtype=bool).reshape(-1)
        held = np.unique(v[hidden].astype(str)) if hidden.any() else np.array([])
        if hidden.any() and held.size == 1:
            blob = encode(v[~hidden])
            fill = float(v[hidden][0])
            blob["fill"] = fill if np.isfinite(fill) else str(fill)
            blob["dec"] = decimals_of(v)
            if blob["mode"] != "f64" and blob["dec"] != decimals_of(v[~hidden]):
                return encode(v)  # the shown decimals would differ: keep every cell
            return blob
    dec = decimals_of(v)
    finite = np.isfinite(v)
    if finite.any() and float(np.max(np.abs(v[finite]))) * 10.0 ** dec >= _MAX_EXACT / 2:
        return {"mode": "f64", "dec": dec, "data": base64.b64encode(v.astype("<f8").tobytes()).decode("ascii")}
    q = quantise(v, dec)
    zig = np.where(q >= 0, 2 * q, -2 * q - 1).astype(np.uint64) + np.uint64(_SPECIAL)  # (N,)
    zig = np.where(np.isnan(v), 0, np.where(v == np.inf, 1, np.where(v == -np.inf, 2, zig))).astype(np.uint64)
    varint = _varints(zig)
    if finite.any():  # values spread evenly over a range (scores): fixed 2 bytes from the smallest may be shorter
        low = int(q[finite].min())
        span = int(q[finite].max()) - low + _SPECIAL
        if span < 2**16 and 2 * v.size < len(varint):
            codes = np.where(finite, q - low + _SPECIAL, zig).astype("<u2")  # (N,), specials as in "q"
            return {"mode": "u16", "dec": dec, "low": low,
                    "data": base64.b64encode(codes.tobytes()).decode("ascii")}
    return {"mode": "q", "dec": dec, "data": base64.b64encode(varint).decode("ascii")}


def decode(blob: dict[str, Any], size: int, skip: Any = None) -> np.ndarray:
    """The values back (float64, ``size`` of them): ``q / 10**dec``, with nan / ±inf (``skip``: the mask
    given to :func:`encode`, for a blob with ``"fill"``)."""
    if "fill" in blob:
        hidden = np.asarray(skip, dtype=bool).reshape(-1)
        if hidden.size != size:
            raise AttnlabInputError(f"a blob with 'fill' needs its mask of {size} cells, got {hidden.size}")
        out = np.full(size, float(blob["fill"]))
        rest = {k: v for k, v in blob.items() if k != "fill"}
        out[~hidden] = decode(rest, int((~hidden).sum()))
        return out
    raw = base64.b64decode(blob["data"])
    if blob["mode"] == "f64":
        return np.frombuffer(raw, dtype="<f8").copy()
    if blob["mode"] == "u16":
        codes = np.frombuffer(raw, dtype="<u2").astype(np.int64)
        values = (codes - _SPECIAL + blob["low"]) / 10.0 ** blob["dec"]
        special = np.array([np.nan, np.inf, -np.inf])[np.minimum(codes, 2)]
        return np.where(codes < _SPECIAL, special, values)
    out = np.empty(size, dtype=np.float64)
    k = value = shift = 0
    for byte in raw:
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte & 0x80:
            continue
        if value < _SPECIAL:
            out[k] = (np.nan, np.inf, -np.inf)[value]
        else:
            z = value - _SPECIAL
            q = z // 2 if z % 2 == 0 else -(z + 1) // 2
            out[k] = q / 10.0 ** blob["dec"]
        k += 1
        value = shift = 0
    if k != size:
        raise AttnlabInputError(f"blob holds {k} values, expected {size}")
    return out


def encode_bits(mask: np.ndarray) -> str:
    """A boolean array, row-major, as base64 of its packed bits."""
    return base64.b64encode(np.packbits(np.asarray(mask, dtype=bool).reshape(-1)).tobytes()).decode("ascii")


def decode_bits(data: str, size: int) -> np.ndarray:
    return np.unpackbits(np.frombuffer(base64.b64decode(data), dtype=np.uint8))[:size].astype(bool)
