"""The user's own tokens, embeddings and weights: parsed and checked, never trusted.

User files are data: ``.npy`` files are read with ``allow_pickle=False``, JSON with :mod:`json`, CSV with
:mod:`csv`. Every problem is a ``ValueError`` (``TypeError`` for a value of the wrong kind, ``OSError`` for files) with a one-line message naming
the argument, what was expected and what was found.
"""

from __future__ import annotations

import csv
import json
import math
import unicodedata
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from attnlab.errors import AttnlabInputError, AttnlabInputTypeError

__all__ = ["WEIGHT_NAMES", "invisible_only", "is_invisible", "load_embeddings", "load_weights", "parse_tokens", "to_matrix", "unique_labels"]

WEIGHT_NAMES = ("W_query", "W_key", "W_value")

_FLOAT32_MAX = float(np.finfo(np.float32).max)  # larger numbers become inf in float32


# Characters that show nothing: format characters (zero-width space U+200B, joiners, U+FEFF, soft hyphen),
# controls, separators, and the fillers that fonts draw blank.
_INVISIBLE_CATEGORIES = ("Cf", "Cc", "Zs", "Zl", "Zp")
_BLANK_FILLERS = frozenset("\u115f\u1160\u3164\uffa0\u2800")


def is_invisible(char: str) -> bool:
    """True for a character that shows nothing (zero-width, control, space-like)."""
    return char.isspace() or char in _BLANK_FILLERS or unicodedata.category(char) in _INVISIBLE_CATEGORIES


def invisible_only(text: str) -> bool:
    """True when ``text`` has no visible character at all (empty included)."""
    return all(is_invisible(c) for c in text)


def _codes(text: str, limit: int = 4) -> str:
    shown = sorted(set(text))
    names = ", ".join(f"U+{ord(c):04X}" for c in shown[:limit])
    return names + (", ..." if len(shown) > limit else "")


def parse_tokens(text: str | Sequence[str], *, what: str = "--tokens") -> tuple[str, ...]:
    """Tokens from a whitespace-separated string (or a sequence of strings); a token made only of invisible
    characters (zero-width spaces and the like, which ``str.split`` keeps) is a ValueError."""
    if isinstance(text, str):
        tokens = tuple(text.split())
    elif not isinstance(text, Sequence):
        raise AttnlabInputTypeError(f"{what} must be a str of whitespace-separated tokens or a sequence of str, "
                                    f"got {type(text).__name__} ({text!r})")
    else:
        tokens = tuple(str(t) for t in text)
        if any(not t.strip() or any(c.isspace() for c in t) for t in tokens):
            raise AttnlabInputError(f"{what} must be non-empty tokens without spaces, got {list(tokens)!r}")
    if not tokens:
        raise AttnlabInputError(f"{what} is empty: give at least one token, e.g. {what} \"The cat ran\"")
    for i, t in enumerate(tokens):
        if invisible_only(t):
            raise AttnlabInputError(f"{what}: token {i + 1} is made only of invisible characters ({_codes(t)}), which "
                             f"would show as nothing; give visible tokens, e.g. {what} \"The cat ran\"")
    return tokens


def unique_labels(tokens: Sequence[str]) -> tuple[str, ...]:
    """Display labels: the tokens, with the 1-based position appended to a token that repeats."""
    counts: dict[str, int] = {}
    for t in tokens:
        counts[t] = counts.get(t, 0) + 1
    return tuple(t if counts[t] == 1 else f"{t}({i + 1})" for i, t in enumerate(tokens))


def _shown(value: Any) -> str:
    """The user's number as they wrote it, shortened when it is very long (a 400-digit int)."""
    text = str(value)  # str, not repr: np.float64(1e+39) shows as 1e+39
    return text if len(text) <= 40 else f"{text[:12]}...{text[-6:]} ({len(text)} characters)"


def _too_large(what: str, where: str, value: Any) -> ValueError:
    return AttnlabInputError(f"{what}: {where} is too large for float32 (at most ±{_FLOAT32_MAX:.7g}), "
                      f"got {_shown(value)}")


def _number(value: Any, what: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise AttnlabInputTypeError(f"{what}: {where} must be a number, got {value!r}")
    try:
        v = float(value)
    except OverflowError:  # an int too large for a float
        raise _too_large(what, where, value) from None
    if not math.isfinite(v):
        raise AttnlabInputError(f"{what}: {where} must be a finite number, got {value!r}")
    if abs(v) > _FLOAT32_MAX:
        raise _too_large(what, where, value)
    return v


def to_matrix(obj: Any, what: str) -> np.ndarray:
    """A non-empty 2-D float32 matrix of finite numbers from nested lists, a numpy array or a tensor."""
    if hasattr(obj, "detach"):  # a torch tensor
        obj = obj.detach().cpu().numpy()
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind not in "fiu":
            raise AttnlabInputError(f"{what} must hold numbers, got an array of dtype {obj.dtype}")
        if obj.ndim != 2:
            raise AttnlabInputError(f"{what} must be a 2-D matrix (one row per token), got shape {obj.shape}")
        if obj.size == 0:
            raise AttnlabInputError(f"{what} is empty: got shape {obj.shape}")
        if not np.isfinite(obj).all():
            r, c = np.argwhere(~np.isfinite(obj))[0]
            raise AttnlabInputError(f"{what}: row {r + 1}, column {c + 1} must be a finite number, got {obj[r, c]}")
        if obj.dtype.kind == "f" and obj.dtype.itemsize > 4:  # ints are at most 2**64, far below the limit
            big = np.abs(obj) > _FLOAT32_MAX
            if big.any():
                r, c = np.argwhere(big)[0]
                raise _too_large(what, f"row {r + 1}, column {c + 1}", obj[r, c])
        return obj.astype(np.float32)
    if not isinstance(obj, (list, tuple)):
        raise AttnlabInputTypeError(f"{what} must be a list of rows (e.g. [[0.2, 0.1], [0.9, 0.3]]), got {type(obj).__name__}")
    if not obj:
        raise AttnlabInputError(f"{what} is empty: give at least one row")
    rows: list[list[float]] = []
    for r, row in enumerate(obj):
        if not isinstance(row, (list, tuple)):
            raise AttnlabInputTypeError(f"{what}: row {r + 1} must be a list of numbers, got {row!r}")
        if not row:
            raise AttnlabInputError(f"{what}: row {r + 1} is empty")
        rows.append([_number(v, what, f"row {r + 1}, column {c + 1}") for c, v in enumerate(row)])
    width = len(rows[0])
    for r, row in enumerate(rows):
        if len(row) != width:
            raise AttnlabInputError(
                f"{what} has ragged rows: row 1 has {width} numbers but row {r + 1} has {len(row)}"
            )
    return np.asarray(rows, dtype=np.float32)


def _read_json(text: str, what: str, source: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise AttnlabInputError(f"{what}: {source} is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None


def _read_text(path: Path, what: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise AttnlabInputError(f"{what}: {path} is not a UTF-8 text file") from None
    except OSError as exc:
        raise OSError(f"{what}: cannot read {path}: {exc.strerror or exc}") from None


def _read_csv(path: Path, what: str) -> list[list[float]]:
    text = _read_text(path, what)
    rows: list[list[float]] = []
    try:
        reader = list(csv.reader(text.splitlines()))
    except csv.Error as exc:
        raise AttnlabInputError(f"{what}: {path} is not valid CSV ({exc})") from None
    for r, row in enumerate(reader):
        cells = [c.strip() for c in row]
        if not any(cells):
            continue  # blank line
        values = []
        for c, cell in enumerate(cells):
            try:
                values.append(float(cell))
            except ValueError:
                raise AttnlabInputError(
                    f"{what}: {path} line {r + 1}, column {c + 1} must be a number, got {cell!r}"
                ) from None
        rows.append(values)
    return rows


def _file(spec: str, what: str, suffixes: tuple[str, ...]) -> Path:
    path = Path(spec)
    if not path.exists():
        raise OSError(f"{what}: no such file: {spec}")
    if not path.is_file():
        raise OSError(f"{what}: not a file: {spec}")
    if path.suffix.lower() not in suffixes:
        raise AttnlabInputError(f"{what}: {spec} must end in {', '.join(suffixes)}, got {path.suffix or 'no suffix'!r}")
    return path


def load_embeddings(spec: str, *, what: str = "--embeddings") -> np.ndarray:
    """Embeddings from inline JSON (``'[[0.2, 0.1, 0.5], ...]'``) or a ``.json``, ``.csv`` or ``.npy``
    file: a (num_tokens, d_in) float32 matrix."""
    spec = spec.strip()
    if not spec:
        raise AttnlabInputError(f"{what} is empty: give inline JSON such as '[[0.2, 0.1], [0.9, 0.3]]' or a file")
    if spec[0] in "[{":
        return to_matrix(_read_json(spec, what, "the inline value"), what)
    path = _file(spec, what, (".json", ".csv", ".npy"))
    suffix = path.suffix.lower()
    if suffix == ".json":
        return to_matrix(_read_json(_read_text(path, what), what, str(path)), what)
    if suffix == ".csv":
        return to_matrix(_read_csv(path, what), what)
    try:
        with path.open("rb") as fh:
            magic = fh.read(6)
    except OSError as exc:
        raise OSError(f"{what}: cannot read {path}: {exc.strerror or exc}") from None
    if magic != b"\x93NUMPY":
        raise AttnlabInputError(f"{what}: {path} is not a valid .npy file (no NPY header; save it with numpy.save)")
    try:
        array = np.load(path, allow_pickle=False)
    except ValueError:  # object arrays need pickle: refused
        raise AttnlabInputError(f"{what}: {path} holds Python objects, not numbers (refused: user files are data)") \
            from None
    except OSError as exc:
        raise AttnlabInputError(f"{what}: {path} is not a valid .npy file ({exc})") from None
    if not isinstance(array, np.ndarray):
        raise AttnlabInputTypeError(f"{what}: {path} must hold one array, got {type(array).__name__}")
    return to_matrix(array, what)


def load_weights(spec: str | Mapping[str, Any], *, what: str = "--weights") -> dict[str, np.ndarray]:
    """W_query, W_key and W_value, each d_in × d_out (``x @ W``), from a JSON file, inline JSON or a
    mapping."""
    if isinstance(spec, Mapping):
        data: Any = spec
    else:
        spec = spec.strip()
        if not spec:
            raise AttnlabInputError(f"{what} is empty: give a .json file with W_query, W_key and W_value")
        if spec[0] == "{":
            data = _read_json(spec, what, "the inline value")
        else:
            path = _file(spec, what, (".json",))
            data = _read_json(_read_text(path, what), what, str(path))
    if not isinstance(data, Mapping):
        raise AttnlabInputTypeError(
            f"{what} must be a JSON object with keys {', '.join(WEIGHT_NAMES)}, got {type(data).__name__}"
        )
    missing = [k for k in WEIGHT_NAMES if k not in data]
    if missing:
        raise AttnlabInputError(
            f"{what} must have keys {', '.join(WEIGHT_NAMES)}; missing {', '.join(missing)} "
            f"(found {', '.join(map(str, data)) or 'none'})"
        )
    return {k: to_matrix(data[k], f"{what} {k}") for k in WEIGHT_NAMES}
