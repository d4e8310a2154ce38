"""Do a model's tensors hold training data? Rows and columns found by hashing, whatever the attacks say.

A model that stores its training rows (a nearest-neighbour classifier's `_fit_X`, a support-vector
machine's support vectors, a buyer's tensor stuffed with a column) leaks them however well it
generalises. Every training row (the numeric features, in column order) and every numeric column (in
row order, and sorted) is cut into short windows, the needles. Every tensor is read as sequences
(flattened in C order, and with each other axis made the fastest-varying one, so that the columns of a
2-D tensor are sequences too); each window of each sequence is looked up among the needles by a 64-bit
rolling hash, and a hit is confirmed value by value. Both sides are compared exactly, after float32
rounding and after float16 rounding.

A window too short or too plain to identify anything is no needle: a row window needs at least
`MIN_ROW_FEATURES` features, a column window `COLUMN_WINDOW` values, and both at least
`MIN_DISTINCT` distinct values, so that the zeros, ones and small counts every model holds do not trip
the check. This finds data stored as it is; data stored transformed (scaled, shuffled, encoded) is
left to the membership-inference attacks and to the steward.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

# Matching is done on values rounded to each of these, finest first.
ROUNDINGS: tuple[tuple[str, type[np.floating]], ...] = (
    ("exact", np.float64), ("float32", np.float32), ("float16", np.float16))
MIN_ROW_FEATURES = 3
ROW_WINDOW = 8  # a row wider than this is found by any 8 consecutive features of it
COLUMN_WINDOW = 8
MIN_DISTINCT = 3
MAX_TRAINING_ROWS = 100_000  # needles come from at most this many training rows
MAX_ELEMENTS = 256_000_000  # tensors beyond this many elements in all are left unchecked, and counted
_CHUNK = 1 << 22  # sequence elements hashed at a time, to bound memory

_BASE = np.uint64(0x9E3779B97F4A7C15)  # rolling-hash base: odd, with well-mixed bits


@dataclass(frozen=True)
class Reproduction:
    """A tensor holds training data: `what` is "row" or "column", at the finest `rounding` that matched."""

    tensor: str
    what: str
    rounding: str
    matches: int  # distinct training windows found in the tensor

    def as_dict(self) -> dict[str, str | int]:
        return {"tensor": self.tensor, "what": self.what, "rounding": self.rounding, "matches": self.matches}


@dataclass(frozen=True)
class WeightsFinding:
    checked_tensors: int
    skipped_tensors: int  # past MAX_ELEMENTS: not checked
    reproduces: list[Reproduction]

    def as_dict(self) -> dict[str, object]:
        return {"checked_tensors": self.checked_tensors, "skipped_tensors": self.skipped_tensors,
                "reproduces": [r.as_dict() for r in self.reproduces]}


def rounded(values: np.ndarray, dtype: type[np.floating]) -> np.ndarray:
    """`values` rounded to `dtype`, back in float64, with -0.0 made 0.0 (overflow becomes inf)."""
    with np.errstate(over="ignore", invalid="ignore"):
        return np.asarray(values, dtype=np.float64).astype(dtype).astype(np.float64) + 0.0


def codes(values: np.ndarray) -> np.ndarray:
    """One 64-bit code per float64 value, same shape: its bits, folded and multiplied so that the low
    bits of every value reach the high bits of a window's hash. NaNs may code differently; no needle
    holds one."""
    bits = np.ascontiguousarray(values, dtype=np.float64).view(np.uint64)
    with np.errstate(over="ignore"):
        folded = bits ^ (bits >> np.uint64(29))
        folded *= np.uint64(0xBF58476D1CE4E5B9)
    return folded


def window_hashes(line_codes: np.ndarray, length: int) -> np.ndarray:
    """The hash of every window of `length` consecutive codes along the last axis (wrapping uint64)."""
    count = line_codes.shape[-1] - length + 1
    if count <= 0:
        return np.empty((*line_codes.shape[:-1], 0), dtype=np.uint64)
    hashes = np.zeros((*line_codes.shape[:-1], count), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for offset in range(length):
            hashes *= _BASE
            hashes += line_codes[..., offset:offset + count]
    return hashes


def informative_windows(lines: np.ndarray, length: int) -> np.ndarray:
    """Which windows along the last axis are finite and hold at least MIN_DISTINCT (three) values.

    A window holds three distinct values exactly when one of its values lies strictly between its
    minimum and its maximum.
    """
    view = np.lib.stride_tricks.sliding_window_view(lines, length, axis=-1)
    with np.errstate(invalid="ignore"):
        low, high = view.min(axis=-1), view.max(axis=-1)
        count = view.shape[-2]
        between = np.zeros(low.shape, dtype=bool)
        for offset in range(length):
            values = lines[..., offset:offset + count]
            between |= (values > low) & (values < high)
    return np.asarray(between & np.isfinite(low) & np.isfinite(high))


# The top bits of a window's hash index a table of flags, one set per needle, so most windows are ruled
# out by one lookup: with 50,000 needles, 2**24 flags let about one window in 300 through.
_FILTER_BITS = 24
_FILTER_SHIFT = np.uint64(64 - _FILTER_BITS)


@dataclass(frozen=True)
class _Source:
    """Windows of one kind taken along the rows of `lines`."""

    what: str
    lines: np.ndarray


@dataclass(frozen=True)
class _Needles:
    """Every needle of one length at one rounding: sorted hashes, and where each window comes from."""

    length: int
    hashes: np.ndarray  # sorted, distinct
    sources: list[_Source]
    source: np.ndarray  # the window of hashes[i] is sources[source[i]].lines[line[i], start[i]:][:length]
    line: np.ndarray
    start: np.ndarray
    flags: np.ndarray  # flags[hash >> _FILTER_SHIFT]: some needle's hash starts with those bits

    def found_in(self, sequence: np.ndarray, sequence_hashes: np.ndarray, seen: set[int]) -> None:
        """Add to `seen` the needles that occur in `sequence`, confirmed value by value."""
        positions = np.flatnonzero(self.flags[(sequence_hashes >> _FILTER_SHIFT).view(np.int64)])
        if not positions.shape[0]:
            return
        slot = np.searchsorted(self.hashes, sequence_hashes[positions])
        slot[slot == self.hashes.shape[0]] = 0
        hit = self.hashes[slot] == sequence_hashes[positions]
        positions, indices = positions[hit], slot[hit]
        if not positions.shape[0]:
            return
        found = np.lib.stride_tricks.sliding_window_view(sequence, self.length)[positions]
        for number, source in enumerate(self.sources):
            mine = self.source[indices] == number
            if not mine.any():
                continue
            mine_indices = indices[mine]
            wanted = np.lib.stride_tricks.sliding_window_view(source.lines, self.length, axis=1)[
                self.line[mine_indices], self.start[mine_indices]]
            confirmed = (wanted == found[mine]).all(axis=1)
            seen.update(np.unique(mine_indices[confirmed]).tolist())

    def kinds(self, indices: set[int]) -> dict[str, int]:
        """How many of these needles are rows, how many columns."""
        counts: dict[str, int] = {}
        for index in indices:
            what = self.sources[int(self.source[index])].what
            counts[what] = counts.get(what, 0) + 1
        return counts


def _needles(sources: list[_Source], length: int) -> _Needles:
    """Every informative window of `length` along the lines of the sources, one per distinct hash."""
    hashes, source_ids, lines, starts = [], [], [], []
    for number, source in enumerate(sources):
        line, start = np.nonzero(informative_windows(source.lines, length))
        hashes.append(window_hashes(codes(source.lines), length)[line, start])
        source_ids.append(np.full(line.shape[0], number, dtype=np.intp))
        lines.append(line)
        starts.append(start)
    # A 64-bit hash shared by two different windows is vanishingly rare; one of them stands for both.
    unique, first = np.unique(np.concatenate(hashes), return_index=True)
    flags = np.zeros(1 << _FILTER_BITS, dtype=bool)
    flags[(unique >> _FILTER_SHIFT).astype(np.intp)] = True
    return _Needles(length, unique, sources, np.concatenate(source_ids)[first], np.concatenate(lines)[first],
                    np.concatenate(starts)[first], flags)


class TrainingNeedles:
    """The training data's rows and columns as hashed windows, built once per gate run."""

    def __init__(self, columns: np.ndarray, row_orders: Iterable[list[int]] | None = None) -> None:
        """`columns`: the training rows' numeric columns (n x d, NaN where missing), in table order;
        `row_orders`: lists of column indices, each the order of a row's feature vector (default: table
        order)."""
        matrix = np.asarray(columns, dtype=np.float64)
        if matrix.ndim != 2:
            raise ValueError("training columns must be a 2-D array")
        matrix = matrix[:MAX_TRAINING_ROWS]
        orders: list[list[int]] = []
        for order in row_orders if row_orders is not None else [list(range(matrix.shape[1]))]:
            if len(order) >= MIN_ROW_FEATURES and list(order) not in orders:
                orders.append(list(order))
        self.sets: dict[str, list[_Needles]] = {}
        for rounding, dtype in ROUNDINGS:
            data = rounded(matrix, dtype)
            by_length: dict[int, list[_Source]] = {}
            for order in orders:
                by_length.setdefault(min(len(order), ROW_WINDOW), []).append(
                    _Source("row", np.ascontiguousarray(data[:, order])))
            if data.shape[0] >= COLUMN_WINDOW:
                by_length.setdefault(COLUMN_WINDOW, []).extend([
                    _Source("column", np.ascontiguousarray(data.T)),
                    _Source("column", np.ascontiguousarray(np.sort(data, axis=0).T))])
            needle_sets = [_needles(sources, length) for length, sources in sorted(by_length.items())]
            self.sets[rounding] = [n for n in needle_sets if n.hashes.shape[0]]

    @property
    def empty(self) -> bool:
        return not any(self.sets.values())


def numeric_view(array: np.ndarray) -> np.ndarray | None:
    """A tensor's values as float64, or None for what holds no numbers (strings, objects, booleans)."""
    if array.dtype.kind in "fiu" and array.size:
        return np.asarray(array, dtype=np.float64)
    return None


def _sequences(tensor: np.ndarray) -> Iterator[np.ndarray]:
    """The tensor flattened in C order, then with each other axis made the fastest-varying one."""
    yield tensor.ravel()
    for axis in range(tensor.ndim - 1):
        if tensor.shape[axis] > 1:
            yield np.moveaxis(tensor, axis, -1).ravel()


def _chunks(sequence: np.ndarray, overlap: int) -> Iterator[np.ndarray]:
    """Consecutive pieces of a long sequence that together hold every window of `overlap + 1` values."""
    for begin in range(0, max(sequence.shape[0] - overlap, 1), _CHUNK):
        yield sequence[begin:begin + _CHUNK + overlap]


def _found(tensor: np.ndarray, stored_as: np.dtype[Any], needles: TrainingNeedles) -> dict[str, tuple[str, int]]:
    """Per kind ("row", "column"): the finest rounding at which the tensor holds training windows, and
    how many distinct ones it holds."""
    # A tensor stored in float32 (float16) reads the same at the roundings finer than its own: hash it once.
    reuse = {np.dtype(np.float32): {"float32"}, np.dtype(np.float16): {"float32", "float16"}}.get(stored_as, set())
    seen = {rounding: [set[int]() for _ in needles.sets.get(rounding, [])] for rounding, _ in ROUNDINGS}
    lengths = {n.length for sets in needles.sets.values() for n in sets}
    if not lengths:
        return {}
    for raw in _sequences(tensor):
        for raw_piece in _chunks(raw, max(lengths) - 1):
            piece = raw_piece
            hashes: dict[int, np.ndarray] = {}
            for rounding, dtype in ROUNDINGS:
                if rounding not in reuse:
                    piece = rounded(raw_piece, dtype)
                    piece_codes = codes(piece)
                    hashes = {length: window_hashes(piece_codes, length) for length in lengths}
                for needle_set, found in zip(needles.sets.get(rounding, []), seen[rounding], strict=True):
                    needle_set.found_in(piece, hashes[needle_set.length], found)
    best: dict[str, tuple[str, int]] = {}
    for rounding, _ in ROUNDINGS:
        for needle_set, found in zip(needles.sets.get(rounding, []), seen[rounding], strict=True):
            for what, matches in needle_set.kinds(found).items():
                if what not in best:
                    best[what] = (rounding, matches)
                elif best[what][0] == rounding:
                    best[what] = (rounding, best[what][1] + matches)
    return best


def check_tensors(tensors: Iterable[tuple[str, np.ndarray]], needles: TrainingNeedles) -> WeightsFinding:
    """Which tensors reproduce a training row or column, exactly or after float32 or float16 rounding."""
    checked = skipped = 0
    budget = MAX_ELEMENTS
    reproduces: list[Reproduction] = []
    for name, raw in tensors:
        tensor = numeric_view(np.asarray(raw))
        if tensor is None:
            continue
        if tensor.size > budget:
            skipped += 1
            continue
        budget -= tensor.size
        checked += 1
        for what, (rounding, matches) in sorted(_found(tensor, np.asarray(raw).dtype, needles).items()):
            reproduces.append(Reproduction(name, what, rounding, matches))
    return WeightsFinding(checked, skipped, reproduces)
