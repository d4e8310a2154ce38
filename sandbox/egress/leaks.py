"""Leak scan: find a dataset version's patient rows, ids and runs of its values in any output byte.

When a version is registered, `FingerprintIndex.build` reads its parquet file once and keeps only keyed
64-bit hashes, never raw values:

- **ids**: every privacy-unit value.
- **values**: every distinct value of the quasi-identifier (QI) columns. A QI column is one the card
  gives a domain (bounds or categories), booleans excepted (two values identify no one), and the
  privacy unit is kept apart as the id. These hashes only select which output tokens matter.
- **rows**: per row, an order-free signature of its QI values (a sum of per-value hashes), so a row
  matches in any column order.
- **runs**: sampled hashes of n-grams of each QI column in row order, n chosen from the column's
  entropy (about 48 bits per n-gram), so a column dumped into JSON or prose (`"age": [72, 65, ...]`)
  is recognised; columns too low in entropy to make an n-gram of at most 32 distinctive are skipped.
- **distinctive values**: values of the other non-boolean columns that occur in one row only and
  are at least 6 characters long once canonical (a free-text note, an exact lab value).

`scan` tokenises an output as bytes in one numba-compiled pass (or, without numba, in numpy passes with the same
result), never per token in Python: a token is a run of
letters, digits, `_ . - +` and non-ASCII bytes; ASCII letters are casefolded, trailing `.-+` dropped
(end of sentence), and numbers canonicalised (`072`, `72.0`, `72.`, `+72`, `7.2e1` all hash as `72`),
so quoting, separators (CSV, TSV, JSON, Python repr, printed tables, prose) and number formatting do
not matter. Tokens in the QI value set form a *value stream*, across line breaks, so pretty-printed
JSON records count too. A row is found when a window of the stream holds exactly a row's QI values in
any order, allowing one foreign value inside the window (an index or a 0/1 flag column). The hash
key is random per index and lives in the index header: the file is not a copy of the data, but who
holds file and key can test guesses, as the scanner must; treat the index file as confidential.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

try:
    import numba as _numba  # type: ignore[import-not-found,import-untyped,unused-ignore]
except ImportError:  # the numpy passes below do the same work, several times slower
    _numba = None  # type: ignore[assignment,unused-ignore]

U64 = npt.NDArray[np.uint64]
I64 = npt.NDArray[np.int64]
Mask = npt.NDArray[np.bool_]

INDEX_FORMAT = 1
MAX_FINDINGS = 100
CHUNK_BYTES = 1 << 21
RUN_BITS = 48  # entropy an n-gram of column values must carry to count as a run
MAX_RUN = 32
RUN_SAMPLE_SHIFT = np.uint64(62)  # keep the n-grams whose top 2 bits are 0: a quarter
DISTINCTIVE_MIN_CHARS = 6
MIN_ROW_VALUES = 3

_C1 = np.uint64(0xFF51AFD7ED558CCD)
_C2 = np.uint64(0xC4CEB9FE1A85EC53)
_S33 = np.uint64(33)
_ALL = np.uint64(0xFFFFFFFFFFFFFFFF)
_MASKS = np.array([0] + [(1 << (8 * n)) - 1 for n in range(1, 8)] + [0xFFFFFFFFFFFFFFFF], dtype=np.uint64)

# Which bytes belong to tokens: ASCII letters and digits, `_ . - +`, and every non-ASCII byte.
_TOKEN = np.zeros(256, dtype=np.bool_)
for _byte in range(256):
    _char = chr(_byte)
    _TOKEN[_byte] = (_char.isascii() and (_char.isalnum() or _char in "_.-+")) or _byte >= 0x80
_TRIM = np.zeros(256, dtype=np.bool_)
for _char in ".-+":
    _TRIM[ord(_char)] = True
_EXPONENT = re.compile(rb"[-+]?(?:\d+\.?\d*|\.\d+)e[-+]?\d+")


@dataclass(frozen=True)
class LeakFinding:
    """One place an output matched the index; `detail` names columns and the line, never a value."""

    kind: str  # "row" | "id" | "values"
    line: int
    detail: str


@dataclass(frozen=True)
class LeakReport:
    """Counts of distinct rows, distinct ids and value runs found, and the first findings."""

    rows: int
    ids: int
    value_runs: int
    findings: list[LeakFinding] = field(default_factory=list)


@dataclass(frozen=True)
class _Keys:
    token: np.uint64
    negative: np.uint64
    zero: np.uint64
    row: np.uint64
    run: np.uint64
    run_base: np.uint64
    run_base_inverse: np.uint64

    @classmethod
    def derive(cls, secret: bytes) -> _Keys:
        def word(label: str) -> int:
            digest = hashlib.blake2b(secret, digest_size=8, person=label.encode().ljust(16, b"\0")).digest()
            return int.from_bytes(digest, "little")

        base = word("run-base") | 1  # odd, so invertible modulo 2**64
        return cls(token=np.uint64(word("token")), negative=np.uint64(word("negative")),
                   zero=np.uint64(word("zero")), row=np.uint64(word("row")), run=np.uint64(word("run")),
                   run_base=np.uint64(base), run_base_inverse=np.uint64(pow(base, -1, 1 << 64)))


def _fmix(x: U64) -> U64:
    """MurmurHash3's 64-bit finaliser, in place: every input bit reaches every output bit."""
    x ^= x >> _S33
    x *= _C1
    x ^= x >> _S33
    x *= _C2
    x ^= x >> _S33
    return x


def _chunks(data: bytes) -> list[tuple[int, bytes]]:
    """Pieces of about CHUNK_BYTES cut at a line break or separator, so no token is cut in two."""
    pieces = []
    start = 0
    while start < len(data):
        end = start + CHUNK_BYTES
        if end < len(data):
            cut = data.rfind(b"\n", start + CHUNK_BYTES // 2, end)
            if cut < 0:
                back = min(4096, end - start)
                tail = np.frombuffer(data, dtype=np.uint8, count=back, offset=end - back)
                separators = np.flatnonzero(~_TOKEN[tail])
                cut = end - len(tail) + int(separators[-1]) if separators.size else end - 1
            end = cut + 1
        pieces.append((start, data[start:end]))
        start = end
    return pieces


def _token_hashes_numpy(chunk: bytes, keys: _Keys) -> tuple[I64, U64]:
    """Start offsets and keyed hashes of the canonical tokens of one chunk, in numpy passes."""
    raw = np.frombuffer(chunk, dtype=np.uint8)
    size = raw.size
    # Comparisons run at memory speed where byte-table lookups do not; each mask is one pass.
    upper = (raw - np.uint8(65)) < 26
    letters = upper | ((raw - np.uint8(97)) < 26)
    digits_mask = (raw - np.uint8(48)) < 10
    dot = raw == 46
    sign = (raw == 45) | (raw == 43)
    letter_e = (raw | np.uint8(32)) == 101
    other = (letters & ~letter_e) | (raw == 95) | (raw >= 128)
    padded = np.zeros(size + 16, dtype=np.uint8)
    np.add(raw, upper.view(np.uint8) << np.uint8(5), out=padded[:size])
    inside = np.zeros(size + 2, dtype=np.bool_)
    np.logical_or(letters | digits_mask | dot | sign, raw >= 95, out=inside[1:-1])
    inside[1:-1] &= (raw != 96) & ((raw < 123) | (raw >= 128))
    # A dash between a digit and a letter separates: "79-year-old", "30-day" hold the numbers 79 and 30.
    dashes = np.flatnonzero(raw[1:-1] == 45) + 1 if size > 2 else np.zeros(0, dtype=np.int64)
    joins = dashes[digits_mask[dashes - 1] & letters[dashes + 1]]
    inside[joins + 1] = False
    edges = np.flatnonzero(inside[1:] != inside[:-1])
    starts = edges[0::2]
    ends = edges[1::2]
    # Drop trailing dots, dashes and plus signs: "beijing-xuanwu." ends a sentence, "72." too.
    trailing = np.flatnonzero(_TRIM[padded[ends - 1]])
    while trailing.size:
        ends[trailing] -= 1
        trailing = trailing[(ends[trailing] > starts[trailing]) & _TRIM[padded[ends[trailing] - 1]]]
    keep = ends > starts
    if not keep.all():
        starts, ends = starts[keep], ends[keep]
    if not starts.size:
        return starts.astype(np.int64), np.zeros(0, dtype=np.uint64)

    # Per-token counts of dots, e's, signs and other letters from one prefix sum of 8-bit fields.
    code = dot.astype(np.uint32)
    code |= letter_e.astype(np.uint32) << np.uint32(8)
    code |= sign.astype(np.uint32) << np.uint32(16)
    code |= other.astype(np.uint32) << np.uint32(24)
    counts = np.zeros(size + 1, dtype=np.uint32)
    np.cumsum(code, out=counts[1:])
    packed = counts[ends] - counts[starts]
    length = ends - starts
    dots = packed & np.uint32(0xFF)
    letter_e = (packed >> np.uint32(8)) & np.uint32(0xFF)
    signs = (packed >> np.uint32(16)) & np.uint32(0xFF)
    others = packed >> np.uint32(24)
    digits = length - dots - letter_e - signs - others
    short = length < 256
    plain = short & (others == 0) & (digits > 0) & (dots <= 1)
    lead = padded[starts]
    signed_first = (lead == ord("-")) | (lead == ord("+"))
    number = plain & (letter_e == 0) & ((signs == 0) | ((signs == 1) & signed_first))
    negative = number & (lead == ord("-"))
    zero = np.zeros(starts.size, dtype=np.bool_)

    spans_start = starts.copy()
    spans_end = ends.copy()
    numbers = np.flatnonzero(number)
    if numbers.size:
        s = starts[numbers] + signed_first[numbers]
        e = ends[numbers].copy()
        # Leading zeros of the integer part, then trailing zeros of a fraction and a bare point.
        active = np.flatnonzero(padded[s] == ord("0"))
        while active.size:
            s[active] += 1
            active = active[(padded[s[active]] == ord("0")) & (s[active] < e[active])]
        fractional = np.flatnonzero(dots[numbers] == 1)
        active = fractional[padded[e[fractional] - 1] == ord("0")]
        while active.size:
            e[active] -= 1
            active = active[(padded[e[active] - 1] == ord("0")) & (e[active] > s[active])]
        pointed = fractional[(e[fractional] > s[fractional]) & (padded[e[fractional] - 1] == ord("."))]
        e[pointed] -= 1
        empty = e <= s
        zero[numbers[empty]] = True
        spans_start[numbers] = s
        spans_end[numbers] = np.maximum(e, s)

    hashes = _hash_spans(padded, spans_start, spans_end, keys.token)
    hashes[negative] ^= keys.negative
    hashes[zero] = keys.zero

    exponents = np.flatnonzero(plain & (letter_e == 1) & (signs <= 2))
    _canonical_exponents(chunk, starts, ends, exponents, hashes, keys)
    return starts.astype(np.int64), hashes


def _canonical_exponents(chunk: bytes, starts: I64, ends: I64, candidates: I64, hashes: U64, keys: _Keys) -> None:
    """Exponent notation is rare in outputs; canonicalise it in Python, one token at a time."""
    for position in candidates.tolist():
        text = chunk[int(starts[position]):int(ends[position])].lower()
        if _EXPONENT.fullmatch(text):
            hashes[position] = _number_hash(float(text), keys)


# Byte classes for the compiled tokeniser, one bit each; a byte is in a token when _IN is set.
_IN, _DIGIT, _LETTER, _DOT, _SIGN, _E, _OTHER = 1, 2, 4, 8, 16, 32, 64
_CLASSES = np.zeros(256, dtype=np.uint8)
for _byte in range(256):
    _char = chr(_byte)
    _CLASSES[_byte] = ((_IN if _TOKEN[_byte] else 0) | (_DIGIT if "0" <= _char <= "9" else 0)
                       | (_LETTER if _char.isascii() and _char.isalpha() else 0) | (_DOT if _char == "." else 0)
                       | (_SIGN if _char in "-+" else 0) | (_E if _char in "eE" else 0)
                       | (_OTHER if (_char.isascii() and _char.isalpha() and _char not in "eE") or _char == "_"
                          or _byte >= 0x80 else 0))


def _fmix_word(x: np.uint64) -> np.uint64:
    x ^= x >> _S33
    x *= _C1
    x ^= x >> _S33
    x *= _C2
    x ^= x >> _S33
    return x


def _load_word(raw: npt.NDArray[np.uint8], at: int, count: int) -> np.uint64:
    """`count` (0 to 8) bytes from `at` as a little-endian word, ASCII letters casefolded."""
    word = np.uint64(0)
    for k in range(count):
        byte = raw[at + k]
        if 65 <= byte <= 90:
            byte += 32
        word |= np.uint64(byte) << np.uint64(8 * k)
    return word


def _tokens_kernel(raw: npt.NDArray[np.uint8], classes: npt.NDArray[np.uint8], key: np.uint64,
                   negative_key: np.uint64, zero_key: np.uint64, starts: I64, ends: I64, hashes: U64,
                   exponents: I64) -> tuple[int, int]:
    """_token_hashes_numpy in one compiled pass: fills starts, trimmed ends, hashes and exponent candidates."""
    size = raw.size
    count = 0
    candidates = 0
    i = 0
    while i < size:
        if not classes[raw[i]] & _IN:
            i += 1
            continue
        start = i
        i += 1
        joined = False
        while i < size:
            c = classes[raw[i]]
            if not c & _IN:
                break
            # A dash between a digit and a letter separates: "79-year-old" holds the number 79.
            if (c & _SIGN and raw[i] == 45 and i + 1 < size and classes[raw[i - 1]] & _DIGIT
                    and classes[raw[i + 1]] & _LETTER):
                joined = True
                break
            i += 1
        end = i
        if joined:
            i += 1  # the dash belongs to no token
        # Drop trailing dots, dashes and plus signs (`_DOT | _SIGN`).
        while end > start and classes[raw[end - 1]] & (_DOT | _SIGN):
            end -= 1
        if end == start:
            continue
        length = end - start
        span_start = start
        span_end = end
        negative = False
        zero = False
        if length < 256:
            dots = 0
            letter_e = 0
            signs = 0
            others = 0
            for k in range(start, end):
                c = classes[raw[k]]
                if c & _DOT:
                    dots += 1
                elif c & _E:
                    letter_e += 1
                elif c & _SIGN:
                    signs += 1
                elif c & _OTHER:
                    others += 1
            digits = length - dots - letter_e - signs - others
            if others == 0 and digits > 0 and dots <= 1:
                lead = raw[start]
                signed_first = lead == 45 or lead == 43
                if letter_e == 0 and (signs == 0 or (signs == 1 and signed_first)):
                    negative = lead == 45
                    s = start + 1 if signed_first else start
                    e = end
                    while s < e and raw[s] == 48:
                        s += 1
                    if dots == 1:
                        while e > s and raw[e - 1] == 48:
                            e -= 1
                        if e > s and raw[e - 1] == 46:
                            e -= 1
                    if e <= s:
                        zero = True
                    span_start = s
                    span_end = e
                elif letter_e == 1 and signs <= 2:
                    exponents[candidates] = count
                    candidates += 1
        starts[count] = start
        ends[count] = end
        if zero:
            hashes[count] = zero_key
        else:
            n = span_end - span_start
            h = _load_lower(raw, span_start, min(n, 8))
            h ^= np.uint64(n) * _C2
            h ^= key
            h = _fmix_one(h)
            if n > 8:
                h = _fmix_one(h ^ _load_lower(raw, span_start + 8, min(n - 8, 8)))
            if n > 16:
                h = _fmix_one(h ^ _load_lower(raw, span_start + 16, min(n - 16, 8)))
            if n > 24:
                h = _fmix_one(h ^ _load_lower(raw, span_end - 8, 8) ^ _C1)
            if negative:
                h ^= negative_key
            hashes[count] = h
        count += 1
    return count, candidates


def _compile(function: Any) -> Any:
    """`function` compiled by numba, cached on disk where a cache directory is writable; None without numba."""
    if _numba is None:
        return None
    try:
        return _numba.njit(cache=True, nogil=True)(function)
    except Exception:  # no writable cache location (a read-only package, no home): compile per process
        return _numba.njit(cache=False, nogil=True)(function)


# The kernel calls these by name, so they must be compiled before it is.
_fmix_one: Any = _compile(_fmix_word)
_load_lower: Any = _compile(_load_word)
_compiled_tokens: Any = _compile(_tokens_kernel)


def _token_hashes_numba(chunk: bytes, keys: _Keys) -> tuple[I64, U64]:
    """Start offsets and keyed hashes of the canonical tokens of one chunk, in one compiled pass."""
    raw = np.frombuffer(chunk, dtype=np.uint8)
    capacity = raw.size // 2 + 1  # tokens are separated by at least one byte
    starts = np.empty(capacity, dtype=np.int64)
    ends = np.empty(capacity, dtype=np.int64)
    hashes = np.empty(capacity, dtype=np.uint64)
    exponents = np.empty(capacity, dtype=np.int64)
    count, candidates = _compiled_tokens(raw, _CLASSES, keys.token, keys.negative, keys.zero,
                                         starts, ends, hashes, exponents)
    starts, ends, hashes = starts[:count], ends[:count], hashes[:count]
    if candidates:
        _canonical_exponents(chunk, starts, ends, exponents[:candidates], hashes, keys)
    return starts, hashes


def _token_hashes(chunk: bytes, keys: _Keys) -> tuple[I64, U64]:
    """Start offsets and keyed hashes of the canonical tokens of one chunk."""
    if _compiled_tokens is not None:
        return _token_hashes_numba(chunk, keys)
    return _token_hashes_numpy(chunk, keys)


def _hash_spans(padded: npt.NDArray[np.uint8], starts: I64, ends: I64, key: np.uint64) -> U64:
    """Keyed hashes of byte spans: the first 24 bytes, the last 8, and the length."""
    words = np.ndarray(shape=(padded.size - 8,), dtype="<u8", buffer=padded.data, strides=(1,))
    length = (ends - starts).astype(np.uint64)
    hashes = words[starts] & _MASKS[np.minimum(length, 8)]
    hashes ^= length * _C2
    hashes ^= key
    _fmix(hashes)
    for offset in (8, 16):
        longer = np.flatnonzero(length > offset)
        if not longer.size:
            break
        rest = np.minimum(length[longer] - np.uint64(offset), np.uint64(8))
        word = words[starts[longer] + offset] & _MASKS[rest]
        hashes[longer] = _fmix(hashes[longer] ^ word)
    longest = np.flatnonzero(length > 24)
    if longest.size:
        hashes[longest] = _fmix(hashes[longest] ^ words[ends[longest] - 8] ^ _C1)
    return hashes


def _number_hash(value: float, keys: _Keys) -> np.uint64:
    text = np.format_float_positional(value, trim="-").encode() if math.isfinite(value) else repr(value).encode()
    _, hashes = _token_hashes(text, keys)
    return hashes[0] if hashes.size == 1 else np.uint64(0)


def _value_hashes(values: list[Any], keys: _Keys) -> tuple[U64, Mask]:
    """One hash per value (its longest token when it spells several) and whether it has one."""
    texts = [_render(value) for value in values]
    joined = "\n".join(texts).encode("utf-8", "surrogatepass")
    line_starts = np.zeros(len(texts), dtype=np.int64)
    if texts:
        line_starts[1:] = np.cumsum([len(t.encode("utf-8", "surrogatepass")) + 1 for t in texts])[:-1]
    starts_all: list[I64] = []
    hashes_all: list[U64] = []
    lengths_all: list[I64] = []
    for offset, chunk in _chunks(joined):
        starts, hashes = _token_hashes(chunk, keys)
        ends = _token_ends(chunk, starts)
        starts_all.append(starts + offset)
        hashes_all.append(hashes)
        lengths_all.append(ends - starts)
    result = np.zeros(len(texts), dtype=np.uint64)
    present = np.zeros(len(texts), dtype=np.bool_)
    if not starts_all:
        return result, present
    starts = np.concatenate(starts_all)
    hashes = np.concatenate(hashes_all)
    lengths = np.concatenate(lengths_all)
    owner = np.searchsorted(line_starts, starts, side="right") - 1
    order = np.lexsort((-lengths, owner))
    owner, hashes = owner[order], hashes[order]
    first = np.ones(owner.size, dtype=np.bool_)
    first[1:] = owner[1:] != owner[:-1]
    result[owner[first]] = hashes[first]
    present[owner[first]] = True
    return result, present


def _token_ends(chunk: bytes, starts: I64) -> I64:
    raw = np.frombuffer(chunk, dtype=np.uint8)
    inside = np.zeros(raw.size + 1, dtype=np.bool_)
    np.take(_TOKEN, raw, out=inside[:-1])
    separators = np.flatnonzero(~inside)
    return separators[np.searchsorted(separators, starts)].astype(np.int64)


def _render(value: Any) -> str:
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return str(int(value))
    return str(value)


def _bitmap(hashes: U64) -> tuple[npt.NDArray[np.uint8], int]:
    """A one-hash Bloom filter over the top bits: about 16 bits per member, so ~6% pass by chance."""
    bits = int(min(30, max(16, math.ceil(math.log2(max(1, hashes.size) * 16)))))
    table = np.zeros(1 << (bits - 3), dtype=np.uint8)
    slots = hashes >> np.uint64(64 - bits)
    byte = (slots >> np.uint64(3)).astype(np.int64)
    bit = (slots & np.uint64(7)).astype(np.uint8)
    for b in range(8):
        selected = bit == b
        table[byte[selected]] |= np.uint8(1 << b)
    return table, 64 - bits


def _maybe(bitmap: tuple[npt.NDArray[np.uint8], int], hashes: U64) -> Mask:
    table, shift = bitmap
    slots = hashes >> np.uint64(shift)
    bytes_ = table[(slots >> np.uint64(3)).astype(np.int64)]
    found: Mask = ((bytes_ >> (slots & np.uint64(7)).astype(np.uint8)) & 1) == 1
    return found


Directory = tuple[npt.NDArray[np.uint32], int]


def _directory(sorted_hashes: U64) -> Directory | None:
    """Where each bucket of the top bits starts in `sorted_hashes`, for the compiled lookup; None without it.

    Keyed hashes are uniform, so about 8 members share a bucket: a lookup is a bucket read and a short search,
    with no sorting of the queries. Capped at 2**20 buckets (4 MiB)."""
    if _compiled_member is None or not sorted_hashes.size or sorted_hashes.size >= 1 << 32:
        return None
    bits = min(20, max(1, int(sorted_hashes.size).bit_length() - 3))
    bounds = np.arange(1 << bits, dtype=np.uint64) << np.uint64(64 - bits)
    directory = np.empty((1 << bits) + 1, dtype=np.uint32)
    directory[:-1] = np.searchsorted(sorted_hashes, bounds)
    directory[-1] = sorted_hashes.size
    return directory, 64 - bits


def _member_kernel(sorted_hashes: U64, directory: npt.NDArray[np.uint32], shift: np.uint64, hashes: U64,
                   found: Mask) -> None:
    for i in range(hashes.size):
        wanted = hashes[i]
        bucket = wanted >> shift
        low = np.int64(directory[bucket])
        high = np.int64(directory[bucket + np.uint64(1)])
        end = high
        while low < high:
            middle = (low + high) >> 1
            if sorted_hashes[middle] < wanted:
                low = middle + 1
            else:
                high = middle
        found[i] = low < end and sorted_hashes[low] == wanted


_compiled_member: Any = _compile(_member_kernel)


def _is_member(sorted_hashes: U64, directory: npt.NDArray[np.uint32], shift: np.uint64, wanted: np.uint64) -> bool:
    """One lookup of _member_kernel."""
    bucket = wanted >> shift
    low = np.int64(directory[bucket])
    high = np.int64(directory[bucket + np.uint64(1)])
    end = high
    while low < high:
        middle = (low + high) >> 1
        if sorted_hashes[middle] < wanted:
            low = middle + 1
        else:
            high = middle
    return bool(low < end and sorted_hashes[low] == wanted)


def _bitmap_pass(table: npt.NDArray[np.uint8], shift: np.uint64, totals: U64, count: int,
                 passed: npt.NDArray[np.uint8]) -> None:
    """_maybe over totals[:count] into passed, without branches, so the table's cache misses overlap."""
    for i in range(count):
        slot = totals[i] >> shift
        passed[i] = (table[slot >> np.uint64(3)] >> (slot & np.uint64(7))) & np.uint8(1)


def _append_match(sums: U64, at: I64, count: int, total: np.uint64, position: int) -> tuple[U64, I64]:
    """Store match `count` (its row sum and stream position), doubling both arrays when they are full."""
    if count == sums.size:
        grown_sums = np.empty(2 * sums.size, dtype=np.uint64)
        grown_sums[:count] = sums[:count]
        sums = grown_sums
        grown_at = np.empty(2 * at.size, dtype=np.int64)
        grown_at[:count] = at[:count]
        at = grown_at
    sums[count] = total
    at[count] = position
    return sums, at


def _rows_kernel(stream: U64, row_key: np.uint64, widths: I64, table: npt.NDArray[np.uint8],
                 table_shift: np.uint64, rows: U64, directory: npt.NDArray[np.uint32],
                 directory_shift: np.uint64) -> tuple[int, I64]:
    """FingerprintIndex._find_rows_numpy in compiled loops: the count of distinct row sums matched, and the
    sorted stream positions of each one's first match, in the numpy path's order of matching."""
    n = stream.size
    weights = np.empty(n, dtype=np.uint64)
    prefix = np.zeros(n + 1, dtype=np.uint64)
    for i in range(n):
        weights[i] = _fmix_one(stream[i] ^ row_key)
        prefix[i + 1] = prefix[i] + weights[i]
    sums = np.empty(1024, dtype=np.uint64)
    at = np.empty(1024, dtype=np.int64)
    count = 0
    covered = np.zeros(n + 1, dtype=np.int64)
    uncovered = np.zeros(n + 1, dtype=np.int64)
    totals = np.empty(n, dtype=np.uint64)
    passed = np.empty(n, dtype=np.uint8)
    positions = np.empty(n, dtype=np.int64)
    for w in range(widths.size):
        width = widths[w]
        if n < width:
            continue
        covered[:] = 0
        windows = n - width + 1
        for p in range(windows):
            totals[p] = prefix[p + width] - prefix[p]
        _bitmap_pass_one(table, table_shift, totals, windows, passed)
        for p in range(windows):
            if passed[p] and _is_member_one(rows, directory, directory_shift, totals[p]):
                sums, at = _append_match_one(sums, at, count, totals[p], p)
                count += 1
                covered[p] += 1
                covered[p + width] -= 1
        if n < width + 1:
            continue
        depth = 0
        for i in range(n):
            depth += covered[i]
            uncovered[i + 1] = uncovered[i] + (1 if depth == 0 else 0)
        found = 0
        for p in range(n - width):
            if uncovered[p + width + 1] - uncovered[p] > 1:
                positions[found] = p
                found += 1
        for inner in range(1, width):
            for k in range(found):
                p = positions[k]
                totals[k] = prefix[p + width + 1] - prefix[p] - weights[p + inner]
            _bitmap_pass_one(table, table_shift, totals, found, passed)
            for k in range(found):
                if passed[k] and _is_member_one(rows, directory, directory_shift, totals[k]):
                    sums, at = _append_match_one(sums, at, count, totals[k], positions[k])
                    count += 1
    # First match of each distinct sum, by an open-addressing table keyed on the (uniform) sums' low bits.
    slots = 16
    while slots < 2 * count:
        slots *= 2
    mask = np.uint64(slots - 1)
    keys = np.empty(slots, dtype=np.uint64)
    used = np.zeros(slots, dtype=np.bool_)
    first = np.empty(count, dtype=np.int64)
    distinct = 0
    for i in range(count):
        total = sums[i]
        slot = _fmix_one(total) & mask
        while used[slot] and keys[slot] != total:
            slot = (slot + np.uint64(1)) & mask
        if not used[slot]:
            used[slot] = True
            keys[slot] = total
            first[distinct] = at[i]
            distinct += 1
    return distinct, np.sort(first[:distinct])


# _rows_kernel calls these by name, so they must be compiled before it is.
_is_member_one: Any = _compile(_is_member)
_bitmap_pass_one: Any = _compile(_bitmap_pass)
_append_match_one: Any = _compile(_append_match)
_compiled_rows: Any = _compile(_rows_kernel)


def _member(sorted_hashes: U64, hashes: U64, directory: Directory | None = None) -> Mask:
    if not sorted_hashes.size or not hashes.size:
        return np.zeros(hashes.size, dtype=np.bool_)
    if directory is not None and _compiled_member is not None:
        found = np.empty(hashes.size, dtype=np.bool_)
        _compiled_member(sorted_hashes, directory[0], np.uint64(directory[1]), hashes, found)
        return found
    if hashes.size > 4096 and sorted_hashes.size > 1 << 16:
        # NumPy's binary search starts from the previous answer when keys ascend: sorted queries walk
        # a large index in cache-friendly order, several times faster than random probes.
        order = np.argsort(hashes, kind="stable")
        ordered = hashes[order]
        where = np.minimum(np.searchsorted(sorted_hashes, ordered), sorted_hashes.size - 1)
        found = np.empty(hashes.size, dtype=np.bool_)
        found[order] = sorted_hashes[where] == ordered
        return found
    where = np.minimum(np.searchsorted(sorted_hashes, hashes), sorted_hashes.size - 1)
    direct: Mask = sorted_hashes[where] == hashes
    return direct


def _run_hashes_kernel(stream: U64, width: int, run_key: np.uint64, base: np.uint64, base_inverse: np.uint64,
                       salt: np.uint64, windows: U64) -> None:
    """_run_hashes in one compiled pass, as a rolling sum: arithmetic modulo 2**64 is exact and `base` is
    invertible, so sum(f[j + k] * base**k) rolled forward equals the numpy path's prefix differences times
    base**-j, bit for bit."""
    top = np.uint64(1)  # base ** (width - 1)
    rolling = np.uint64(0)
    power = np.uint64(1)
    for k in range(width):
        rolling += _fmix_one(stream[k] ^ run_key) * power
        top = power
        power *= base
    windows[0] = _fmix_one(rolling ^ salt)
    for j in range(1, windows.size):
        leaving = _fmix_one(stream[j - 1] ^ run_key)
        entering = _fmix_one(stream[j + width - 1] ^ run_key)
        rolling = (rolling - leaving) * base_inverse + entering * top
        windows[j] = _fmix_one(rolling ^ salt)


_compiled_run_hashes: Any = _compile(_run_hashes_kernel)


def _run_hashes(stream: U64, width: int, keys: _Keys) -> U64:
    """Order-dependent keyed hashes of every `width` consecutive values of a hash stream."""
    count = stream.size - width + 1
    if count <= 0:
        return np.zeros(0, dtype=np.uint64)
    if _compiled_run_hashes is not None:
        windows = np.empty(count, dtype=np.uint64)
        _compiled_run_hashes(stream, width, keys.run, keys.run_base, keys.run_base_inverse,
                             np.uint64((width * int(_C1)) & int(_ALL)), windows)
        return windows
    return _run_hashes_numpy(stream, width, keys)


def _run_hashes_numpy(stream: U64, width: int, keys: _Keys) -> U64:
    count = stream.size - width + 1
    if count <= 0:
        return np.zeros(0, dtype=np.uint64)
    powers = np.full(stream.size + 1, keys.run_base, dtype=np.uint64)
    powers[0] = 1
    np.cumprod(powers, out=powers)
    inverse = np.full(count, keys.run_base_inverse, dtype=np.uint64)
    inverse[0] = 1
    np.cumprod(inverse, out=inverse)
    prefix = np.zeros(stream.size + 1, dtype=np.uint64)
    np.cumsum(_fmix(stream ^ keys.run) * powers[:-1], out=prefix[1:])
    windows = (prefix[width:] - prefix[:count]) * inverse
    windows ^= np.uint64((width * int(_C1)) & int(_ALL))
    return _fmix(windows)


def _sampled(hashes: U64) -> Mask:
    return np.asarray((hashes >> RUN_SAMPLE_SHIFT) == 0)


def _sampled_kernel(windows: U64, table: npt.NDArray[np.uint8], shift: np.uint64, positions: I64) -> int:
    """Fills positions with np.flatnonzero(_sampled(windows) & _maybe(bitmap, windows)); returns their count."""
    found = 0
    for i in range(windows.size):
        window = windows[i]
        if window >> RUN_SAMPLE_SHIFT == np.uint64(0):
            slot = window >> shift
            if (table[slot >> np.uint64(3)] >> (slot & np.uint64(7))) & np.uint8(1):
                positions[found] = i
                found += 1
    return found


_compiled_sampled: Any = _compile(_sampled_kernel)


def _run_width(column: pa.ChunkedArray) -> int | None:
    """The n-gram length whose values carry RUN_BITS of entropy, or None when over MAX_RUN."""
    counts = np.asarray(pc.value_counts(column.drop_null()).field("counts"), dtype=np.float64)
    if not counts.size:
        return None
    p = counts / counts.sum()
    entropy = float(-(p * np.log2(p)).sum())
    if entropy <= 0:
        return None
    width = max(4, math.ceil(RUN_BITS / entropy))
    return width if width <= MAX_RUN else None


class FingerprintIndex:
    """Keyed hashes of one dataset version's ids, QI values, rows and column runs; scans outputs."""

    def __init__(self, header: dict[str, Any], arrays: dict[str, U64]) -> None:
        self.header = header
        self._keys = _Keys.derive(bytes.fromhex(header["key"]))
        self._ids = arrays["ids"]
        self._values = arrays["values"]
        self._distinctive = arrays["distinctive"]
        self._rows = arrays["rows"]
        self._runs = {column: arrays[f"runs:{column}"] for column in header["run_widths"]}
        self._tokens_bitmap = _bitmap(np.concatenate([self._ids, self._values, self._distinctive]))
        self._rows_bitmap = _bitmap(self._rows)
        self._runs_bitmap = _bitmap(np.concatenate([np.zeros(0, np.uint64), *self._runs.values()]))
        self._directories = {"ids": _directory(self._ids), "values": _directory(self._values),
                             "distinctive": _directory(self._distinctive), "rows": _directory(self._rows),
                             **{f"runs:{column}": _directory(runs) for column, runs in self._runs.items()}}
        # Compile (or load from numba's cache) the kernels now, so no scan pays for it.
        _token_hashes(b"warm -1.50 2e3 x-1 7-day", self._keys)
        warm = np.arange(1, 40, dtype=np.uint64) << np.uint64(58)
        _member(warm, warm, _directory(warm))
        _run_hashes(warm, 4, self._keys)
        if _compiled_rows is not None and self._directories["rows"] is not None:
            self._find_rows(warm, np.arange(warm.size, dtype=np.int64))

    @property
    def size_bytes(self) -> int:
        arrays = [self._ids, self._values, self._distinctive, self._rows, *self._runs.values()]
        return sum(array.nbytes for array in arrays)

    @classmethod
    def build(cls, parquet: Path, card: dict[str, Any], destination: Path) -> FingerprintIndex:
        """Hash a version's ids, QI values, row signatures and column runs into `destination`."""
        secret = secrets.token_bytes(32)
        keys = _Keys.derive(secret)
        table = pq.read_table(parquet)
        columns: dict[str, dict[str, Any]] = card["columns"]
        unit = card["privacy_unit"]
        quasi = [name for name, spec in columns.items()
                 if name != unit and name in table.column_names and spec.get("type") != "boolean"
                 and (spec.get("bounds") is not None or spec.get("categories") is not None)]
        others = [name for name, spec in columns.items()
                  if name not in quasi and name != unit and name in table.column_names
                  and spec.get("type") != "boolean"]

        ids = np.zeros(0, dtype=np.uint64)
        if unit in table.column_names:
            unique_ids = pc.unique(table.column(unit).drop_null()).to_pylist()
            id_hashes, present = _value_hashes(unique_ids, keys)
            ids = np.unique(id_hashes[present])

        row_sum = np.zeros(table.num_rows, dtype=np.uint64)
        row_width = np.zeros(table.num_rows, dtype=np.int64)
        value_sets: list[U64] = []
        runs: dict[str, U64] = {}
        run_widths: dict[str, int] = {}
        for name in quasi:
            per_row, present = _column_hashes(table.column(name), keys)
            value_sets.append(per_row[present])
            row_sum += np.where(present, _fmix(per_row ^ keys.row), np.uint64(0))
            row_width += present
            width = _run_width(table.column(name))
            if width is not None and table.num_rows >= width:
                windows = _run_hashes(per_row, width, keys)
                # A window over a missing value is not a run of values anyone could print.
                gaps = np.concatenate([[0], np.cumsum(~present)])
                whole = (gaps[width:] - gaps[:-width]) == 0
                runs[name] = np.unique(windows[whole & _sampled(windows)])
                run_widths[name] = width
        values = np.unique(np.concatenate([np.zeros(0, np.uint64), *value_sets]))
        indexed = row_width >= MIN_ROW_VALUES
        rows = np.unique(row_sum[indexed])

        distinctive_sets: list[U64] = []
        for name in others:
            counts = pc.value_counts(table.column(name).drop_null())
            once = pc.filter(counts.field("values"), pc.equal(counts.field("counts"), 1)).to_pylist()
            long_enough = [value for value in once if len(_render(value)) >= DISTINCTIVE_MIN_CHARS]
            hashes, present = _value_hashes(long_enough, keys)
            distinctive_sets.append(hashes[present])
        distinctive = np.setdiff1d(np.unique(np.concatenate([np.zeros(0, np.uint64), *distinctive_sets])), values)

        header = {
            "format": INDEX_FORMAT, "key": secret.hex(), "privacy_unit": unit, "quasi_identifiers": quasi,
            "distinctive_columns": others, "row_widths": sorted({int(w) for w in np.unique(row_width[indexed])}),
            "run_widths": run_widths, "rows_indexed": int(indexed.sum()), "source_rows": table.num_rows,
        }
        arrays = {"ids": ids, "values": values, "distinctive": distinctive, "rows": rows,
                  **{f"runs:{name}": hashes for name, hashes in runs.items()}}
        buffer = io.BytesIO()
        stored: dict[str, npt.NDArray[Any]] = {"header": np.frombuffer(json.dumps(header).encode(), dtype=np.uint8),
                                               **arrays}
        np.savez(buffer, allow_pickle=False, **stored)
        destination.write_bytes(buffer.getvalue())
        return cls(header, arrays)

    @classmethod
    def load(cls, path: Path) -> FingerprintIndex:
        with np.load(path, allow_pickle=False) as stored:
            header: dict[str, Any] = json.loads(bytes(stored["header"]).decode())
            if header.get("format") != INDEX_FORMAT:
                raise ValueError(f"{path.name}: leak index format {header.get('format')!r}, expected {INDEX_FORMAT}")
            arrays = {name: np.asarray(stored[name], dtype=np.uint64) for name in stored.files if name != "header"}
        return cls(header, arrays)

    def scan(self, data: bytes) -> LeakReport:
        """Rows, ids and value runs of the indexed version found anywhere in `data`."""
        ids_found: list[U64] = []
        id_offsets: list[I64] = []
        stream_parts: list[U64] = []
        stream_offsets: list[I64] = []
        distinctive_offsets: list[I64] = []
        for offset, chunk in _chunks(data):
            starts, hashes = _token_hashes(chunk, self._keys)
            maybe = np.flatnonzero(_maybe(self._tokens_bitmap, hashes))
            if not maybe.size:
                continue
            hashes, starts = hashes[maybe], starts[maybe] + offset
            # The QI value set is small and cache-resident; only the rest is looked up among the ids.
            is_value = _member(self._values, hashes, self._directories["values"])
            rest = np.flatnonzero(~is_value)
            is_id = rest[_member(self._ids, hashes[rest], self._directories["ids"])]
            if is_id.size:
                ids_found.append(hashes[is_id])
                id_offsets.append(starts[is_id])
            stream_parts.append(hashes[is_value])
            stream_offsets.append(starts[is_value])
            is_distinctive = _member(self._distinctive, hashes, self._directories["distinctive"])
            if is_distinctive.any():
                distinctive_offsets.append(starts[is_distinctive])
        stream = np.concatenate([np.zeros(0, np.uint64), *stream_parts])
        offsets = np.concatenate([np.zeros(0, np.int64), *stream_offsets])

        findings: list[tuple[int, str, str]] = []  # (byte offset, kind, detail with {line})
        id_hashes = np.concatenate([np.zeros(0, np.uint64), *ids_found])
        if id_hashes.size:
            first = np.concatenate(id_offsets)
            findings += [(int(at), "id", f"a value of privacy-unit column {self.header['privacy_unit']} "
                          "on line {line}") for at in first[:MAX_FINDINGS]]
        rows, row_offsets = self._find_rows(stream, offsets)
        columns = ", ".join(self.header["quasi_identifiers"])
        findings += [(int(at), "row", f"a row's values of columns {columns} on line {{line}}")
                     for at in row_offsets[:MAX_FINDINGS]]
        run_offsets = self._find_runs(stream, offsets)
        for column, at in run_offsets[:MAX_FINDINGS]:
            width = self.header["run_widths"][column]
            findings.append((at, "values", f"a run of {width}+ values of column {column} in dataset order "
                                           "starting on line {line}"))
        distinctive_lines = self._distinctive_lines(data, distinctive_offsets)
        for line in distinctive_lines[:MAX_FINDINGS]:
            named = ", ".join(self.header["distinctive_columns"])
            findings.append((-line, "values", f"two or more distinctive values of columns {named} "
                                              "on line {line}"))
        report_findings = self._located(data, findings)
        return LeakReport(rows=rows, ids=_distinct(id_hashes),
                          value_runs=len(run_offsets) + len(distinctive_lines), findings=report_findings)

    def _find_rows(self, stream: U64, offsets: I64) -> tuple[int, list[int]]:
        """Distinct indexed rows whose values appear as a window of the stream (at most one foreign value inside),
        and the sorted offsets of each one's first match."""
        if not self._rows.size or not stream.size:
            return 0, []
        directory = self._directories["rows"]
        if _compiled_rows is None or directory is None:
            return self._find_rows_numpy(stream, offsets)
        table, table_shift = self._rows_bitmap
        widths = np.asarray(self.header["row_widths"], dtype=np.int64)
        distinct, at = _compiled_rows(stream, self._keys.row, widths, table, np.uint64(table_shift), self._rows,
                                      directory[0], np.uint64(directory[1]))
        return int(distinct), offsets[at].tolist()

    def _find_rows_numpy(self, stream: U64, offsets: I64) -> tuple[int, list[int]]:
        if not self._rows.size or not stream.size:
            return 0, []
        weights = _fmix(stream ^ self._keys.row)
        prefix = np.zeros(stream.size + 1, dtype=np.uint64)
        np.cumsum(weights, out=prefix[1:])
        matched_sums: list[U64] = []
        matched_at: list[I64] = []
        for width in self.header["row_widths"]:
            if stream.size < width:
                continue
            sums = prefix[width:] - prefix[:-width]
            maybe = np.flatnonzero(_maybe(self._rows_bitmap, sums))
            hit = maybe[_member(self._rows, sums[maybe], self._directories["rows"])]
            matched_sums.append(sums[hit])
            matched_at.append(hit)
            if stream.size < width + 1:
                continue
            # One foreign value inside the window (a printed index, a 0/1 flag, a row number), tried only
            # where no exact window already covers the values, so a plain dump costs one probe per value.
            covered = np.zeros(stream.size + 1, dtype=np.int64)
            np.add.at(covered, hit, 1)
            np.add.at(covered, hit + width, -1)
            uncovered = np.concatenate([[0], np.cumsum(np.cumsum(covered)[:-1] == 0)])
            positions = np.flatnonzero(uncovered[width + 1:] - uncovered[:-(width + 1)] > 1)
            wide = prefix[positions + width + 1] - prefix[positions]
            for inner in range(1, width):
                trimmed = wide - weights[positions + inner]
                maybe = np.flatnonzero(_maybe(self._rows_bitmap, trimmed))
                hit = maybe[_member(self._rows, trimmed[maybe], self._directories["rows"])]
                matched_sums.append(trimmed[hit])
                matched_at.append(positions[hit])
        sums = np.concatenate(matched_sums) if matched_sums else np.zeros(0, np.uint64)
        if not sums.size:
            return 0, []
        unique_sums, first = np.unique(sums, return_index=True)
        at = np.sort(np.concatenate(matched_at)[first])
        return int(unique_sums.size), offsets[at].tolist()

    def _find_runs(self, stream: U64, offsets: I64) -> list[tuple[str, int]]:
        found: list[tuple[str, int]] = []
        by_width: dict[int, list[str]] = {}
        for column, width in self.header["run_widths"].items():
            by_width.setdefault(int(width), []).append(column)
        for width, columns in sorted(by_width.items()):
            windows = _run_hashes(stream, width, self._keys)
            if _compiled_sampled is not None:
                table, shift = self._runs_bitmap
                sampled = np.empty(windows.size, dtype=np.int64)
                sampled = sampled[:_compiled_sampled(windows, table, np.uint64(shift), sampled)]
            else:
                sampled = np.flatnonzero(_sampled(windows))
                sampled = sampled[_maybe(self._runs_bitmap, windows[sampled])]
            for column in columns:
                hits = sampled[_member(self._runs[column], windows[sampled], self._directories[f"runs:{column}"])]
                # Overlapping windows of one run count once: a new run starts past the last one's end.
                last_end = -1
                for position in hits.tolist():
                    if position >= last_end:
                        found.append((column, int(offsets[position])))
                    last_end = position + width
        return sorted(found, key=lambda item: item[1])

    @staticmethod
    def _distinctive_lines(data: bytes, parts: list[I64]) -> list[int]:
        if not parts:
            return []
        lines = _line_numbers(data, np.concatenate(parts))
        numbers, counts = np.unique(lines, return_counts=True)
        return [int(n) for n in numbers[counts >= 2]]

    @staticmethod
    def _located(data: bytes, findings: list[tuple[int, str, str]]) -> list[LeakFinding]:
        if not findings:
            return []
        byte_offsets = np.array([max(at, 0) for at, _, _ in findings], dtype=np.int64)
        lines = _line_numbers(data, byte_offsets)
        located = [LeakFinding(kind=kind, line=-at if at < 0 else int(line), detail=detail.format(
                   line=-at if at < 0 else int(line)))
                   for (at, kind, detail), line in zip(findings, lines, strict=True)]
        located.sort(key=lambda finding: (finding.line, finding.kind))
        return located[:MAX_FINDINGS]


def _distinct(hashes: U64) -> int:
    """len(np.unique(hashes)), by a plain sort: faster than numpy's hash-based unique on millions."""
    if not hashes.size:
        return 0
    ordered = np.sort(hashes)
    return int(np.count_nonzero(ordered[1:] != ordered[:-1])) + 1


def _line_numbers(data: bytes, byte_offsets: I64) -> I64:
    newlines = np.flatnonzero(np.frombuffer(data, dtype=np.uint8) == ord("\n"))
    return np.asarray(np.searchsorted(newlines, byte_offsets, side="right") + 1, dtype=np.int64)


def _column_hashes(column: pa.ChunkedArray, keys: _Keys) -> tuple[U64, Mask]:
    """Per-row hashes of a column, hashing each distinct value once."""
    encoded = pc.dictionary_encode(column.combine_chunks())
    dictionary = encoded.dictionary.to_pylist()
    value_hashes, value_present = _value_hashes(dictionary, keys)
    indices = encoded.indices.to_numpy(zero_copy_only=False)
    valid = np.asarray(encoded.indices.is_valid(), dtype=np.bool_)
    safe = np.where(valid, np.nan_to_num(indices, nan=0), 0).astype(np.int64)
    present = valid & value_present[safe] if value_hashes.size else np.zeros(len(column), dtype=np.bool_)
    per_row = value_hashes[safe] if value_hashes.size else np.zeros(len(column), dtype=np.uint64)
    return np.where(present, per_row, np.uint64(0)).astype(np.uint64), present


def leak_verdict(report: LeakReport, *, block_rows: int, block_ids: int) -> tuple[str, str]:
    """Block when rows (or runs of column values, which are rows seen sideways) or ids reach policy's bar."""
    reasons = []
    if report.rows >= block_rows:
        reasons.append(f"{report.rows} dataset row(s) found (policy blocks at {block_rows})")
    if report.value_runs >= block_rows:
        reasons.append(f"{report.value_runs} run(s) of dataset values found (policy blocks at {block_rows})")
    if report.ids >= block_ids:
        reasons.append(f"{report.ids} privacy-unit id(s) found (policy blocks at {block_ids})")
    if reasons:
        lines = sorted({finding.line for finding in report.findings})[:10]
        where = f"; first on lines {', '.join(map(str, lines))}" if lines else ""
        return "block", "; ".join(reasons) + where
    if report.rows or report.ids or report.value_runs:
        return "pass", (f"below policy thresholds: {report.rows} row(s), {report.ids} id(s), "
                        f"{report.value_runs} value run(s)")
    return "pass", "no dataset rows, ids or runs of dataset values found"
