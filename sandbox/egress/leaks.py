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
- **rare values** (format 3): values of any non-boolean column but the id that are in at most RARE_ROWS cells
  of the version (counted over all those columns, as an output does not say which column a value came from),
  each with the rows it is in. A record that carries PARTIAL_VALUES (3) or more rare values of one row, in any
  order and any subset of its columns, without an id, is a *partial row*: a few precise measurements are enough
  to point at a patient.

`scan` tokenises an output as bytes in one numba-compiled pass (or, without numba, in numpy passes with the same
result), never per token in Python: a token is a run of
letters, digits, `_ . - +` and non-ASCII bytes; ASCII letters are casefolded, trailing `.-+` dropped
(end of sentence), and numbers canonicalised (`072`, `72.0`, `72.`, `+72`, `7.2e1` all hash as `72`),
so quoting, separators (CSV, TSV, JSON, Python repr, printed tables, prose) and number formatting do
not matter. The compiled pass also sorts each token as it goes (a QI value, maybe an id, or nothing), with no
array of tokens in between; a chunk holding a token in exponent notation is redone in two steps, as those
are canonicalised in Python. The runs of all (up to 8) run columns are then sought in one pass over the stream.
Tokens in the QI value set form a *value stream*, across line breaks, so pretty-printed
JSON records count too. A row is found when a window of the stream holds exactly a row's QI values in
any order, allowing one foreign value inside the window (an index or a 0/1 flag column). A partial row is
found when rare values standing within one record (on one line within LINE_BYTES, or within RECORD_BYTES across
lines) all point at one row. The hash
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
from typing import Any, Literal

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

INDEX_FORMAT = 3  # 2 adds each run column's domain, 3 the rare values' rows; 1 and 2 still load (see `load`)
MAX_FINDINGS = 100
CHUNK_BYTES = 1 << 21
RUN_BITS = 48  # entropy an n-gram of column values must carry to count as a run
MAX_RUN = 32
RUN_SAMPLE_SHIFT = np.uint64(62)  # keep the n-grams whose top 2 bits are 0: a quarter
DISTINCTIVE_MIN_CHARS = 6
TOKEN_CACHE_ENTRIES = 2048  # 64 KiB of remembered token hashes
MIN_ROW_VALUES = 3
RARE_ROWS = 4  # a value in at most this many cells of the version is rare: it points at a few rows
PARTIAL_VALUES = 3  # rare values of one row in one record that make a partial row
RECORD_BYTES = 512  # rare values this close belong to one record, across line breaks (pretty JSON, wrapped prose)
LINE_BYTES = 1024  # ... and this close on one line (a long prose line; wider windows meet chance triples)

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

    kind: str  # "row" | "partial_row" | "id" | "values"
    line: int
    detail: str


@dataclass(frozen=True)
class LeakReport:
    """Counts of distinct rows, distinct ids, value runs and partial rows found, and the first findings."""

    rows: int
    ids: int
    value_runs: int
    findings: list[LeakFinding] = field(default_factory=list)
    partial_rows: int = 0  # rows of which PARTIAL_VALUES+ rare values stand together in one record


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


def _chunks(data: bytes) -> list[tuple[int, memoryview]]:
    """Pieces of about CHUNK_BYTES cut at a line break or separator, so no token is cut in two (views, not
    copies)."""
    pieces = []
    view = memoryview(data)
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
        pieces.append((start, view[start:end]))
        start = end
    return pieces


def _token_hashes_numpy(chunk: bytes | memoryview, keys: _Keys) -> tuple[I64, U64]:
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


def _canonical_exponents(chunk: bytes | memoryview, starts: I64, ends: I64, candidates: I64, hashes: U64,
                         keys: _Keys) -> None:
    """Exponent notation is rare in outputs; canonicalise it in Python, one token at a time."""
    for position in candidates.tolist():
        text = bytes(chunk[int(starts[position]):int(ends[position])]).lower()
        if _EXPONENT.fullmatch(text):
            hashes[position] = _number_hash(float(text), keys)


# Byte classes for the compiled tokeniser, one bit each; a byte is in a token when _IN is set.
_IN, _DIGIT, _LETTER, _DOT, _SIGN, _E, _OTHER, _DASH = 1, 2, 4, 8, 16, 32, 64, 128
_CLASSES = np.zeros(256, dtype=np.uint8)
for _byte in range(256):
    _char = chr(_byte)
    _CLASSES[_byte] = ((_IN if _TOKEN[_byte] else 0) | (_DIGIT if "0" <= _char <= "9" else 0)
                       | (_LETTER if _char.isascii() and _char.isalpha() else 0) | (_DOT if _char == "." else 0)
                       | (_SIGN if _char in "-+" else 0) | (_E if _char in "eE" else 0)
                       | (_OTHER if (_char.isascii() and _char.isalpha() and _char not in "eE") or _char == "_"
                          or _byte >= 0x80 else 0) | (_DASH if _char == "-" else 0))
_LOW_BITS = np.uint64(0x7F7F7F7F7F7F7F7F)
_HIGH_BITS = np.uint64(0x8080808080808080)
_BYTE_ONES = np.uint64(0x0101010101010101)


def _compile(function: Any, *, inline: bool = False) -> Any:
    """`function` compiled by numba, cached on disk where a cache directory is writable; None without numba.

    An `inline` helper is compiled into each kernel that calls it: called, it would cost a function call and
    a reference count on each array it takes, per token or lookup."""
    if _numba is None:
        return None
    mode: Literal["always", "never"] = "always" if inline else "never"
    try:
        return _numba.njit(cache=True, nogil=True, inline=mode)(function)
    except Exception:  # no writable cache location (a read-only package, no home): compile per process
        return _numba.njit(cache=False, nogil=True, inline=mode)(function)


def _intrinsics() -> tuple[Any, Any, Any]:
    """Three LLVM operations numba does not offer: a cache prefetch of `array[index]`, which lets the
    lookups below overlap their cache misses, an unaligned 8-byte load of `raw[at:at + 8]`, and a count of
    a word's trailing zero bits."""
    if _numba is None:
        return None, None, None
    from llvmlite import ir  # type: ignore[import-not-found,import-untyped,unused-ignore]
    from numba.core import cgutils, types  # type: ignore[import-not-found,import-untyped,unused-ignore]
    from numba.extending import intrinsic  # type: ignore[import-not-found,import-untyped,unused-ignore]

    def pointer(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        array_type = signature.args[0]
        array = context.make_array(array_type)(context, builder, args[0])
        return cgutils.get_item_pointer(context, builder, array_type, array, [args[1]],  # type: ignore[no-untyped-call]
                                        wraparound=False)

    @intrinsic
    def prefetch(typingctx: Any, array: Any, index: Any) -> Any:
        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            address = builder.bitcast(pointer(context, builder, signature, args), ir.IntType(8).as_pointer())
            i32 = ir.IntType(32)
            function = builder.module.declare_intrinsic(
                "llvm.prefetch", [address.type], ir.FunctionType(ir.VoidType(), [address.type, i32, i32, i32]))
            builder.call(function, [address, i32(0), i32(3), i32(1)])  # read, keep in all levels, data
            return context.get_dummy_value()
        return types.none(array, types.intp), codegen

    @intrinsic
    def load_word(typingctx: Any, raw: Any, at: Any) -> Any:
        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            address = builder.bitcast(pointer(context, builder, signature, args), ir.IntType(64).as_pointer())
            return builder.load(address, align=1)
        return types.uint64(raw, types.intp), codegen

    @intrinsic
    def trailing_zeros(typingctx: Any, word: Any) -> Any:
        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            return builder.cttz(args[0], ir.Constant(ir.IntType(1), 0))
        return types.uint64(types.uint64), codegen

    return prefetch, load_word, trailing_zeros


_prefetch, _load_unaligned, _trailing_zeros = _intrinsics()


def _fmix_word(x: np.uint64) -> np.uint64:
    x ^= x >> _S33
    x *= _C1
    x ^= x >> _S33
    x *= _C2
    x ^= x >> _S33
    return x


def _load_word(raw: npt.NDArray[np.uint8], at: int, count: int) -> np.uint64:
    """`count` (1 to 8) bytes from `at` as a little-endian word, ASCII letters casefolded."""
    word: np.uint64
    if at + 8 <= raw.size:
        word = _load_unaligned(raw, at)
    else:
        word = np.uint64(0)
        for k in range(count):
            word |= np.uint64(raw[at + k]) << np.uint64(8 * k)
    # Casefold all eight bytes at once: a byte is upper case when ASCII and its low 7 bits lie in 'A'..'Z'.
    low = word & _LOW_BITS
    at_least_a = low + (_HIGH_BITS - np.uint64(ord("A")) * _BYTE_ONES)
    above_z = low + (_LOW_BITS - np.uint64(ord("Z")) * _BYTE_ONES)
    upper = at_least_a & ~above_z & ~word & _HIGH_BITS
    word |= upper >> np.uint64(2)  # 0x80 >> 2 is 0x20, the case bit
    if count < 8:
        word &= (np.uint64(1) << np.uint64(8 * count)) - np.uint64(1)
    return word


def _span_hash(raw: npt.NDArray[np.uint8], start: int, end: int, key: np.uint64) -> np.uint64:
    """Keyed hash of raw[start:end] (not empty), as _hash_spans: the first 24 bytes, the last 8, the length."""
    n = end - start
    h: np.uint64 = _fmix_one(_load_lower(raw, start, min(n, 8)) ^ (np.uint64(n) * _C2) ^ key)
    if n > 8:
        h = _fmix_one(h ^ _load_lower(raw, start + 8, min(n - 8, 8)))
    if n > 16:
        h = _fmix_one(h ^ _load_lower(raw, start + 16, min(n - 16, 8)))
    if n > 24:
        h = _fmix_one(h ^ _load_lower(raw, end - 8, 8) ^ _C1)
    return h


def _canonical_hash(raw: npt.NDArray[np.uint8], classes: npt.NDArray[np.uint8], start: int, end: int, seen: int,
                    key: np.uint64, negative_key: np.uint64, zero_key: np.uint64) -> tuple[np.uint64, bool]:
    """The hash of the token raw[start:end] (trimmed, `seen` the or of its bytes' classes), numbers canonical,
    and whether it may be in exponent notation (left to _canonical_exponents)."""
    span_start = start
    span_end = end
    negative = False
    # Only tokens of digits, dots, signs and e's can be numbers; the trimmed bytes are never digits or
    # other letters, so `seen` answers that for the trimmed token too.
    if end - start < 256 and seen & _DIGIT and not seen & _OTHER:
        dots = 0
        letter_e = 0
        signs = 0
        for k in range(start, end):
            c = classes[raw[k]]
            if c & _DOT:
                dots += 1
            elif c & _E:
                letter_e += 1
            elif c & _SIGN:
                signs += 1
        if dots <= 1:
            lead = raw[start]
            signed_first = lead == 45 or lead == 43
            if letter_e == 0 and (signs == 0 or (signs == 1 and signed_first)):
                negative = lead == 45
                span_start = start + 1 if signed_first else start
                while span_start < span_end and raw[span_start] == 48:
                    span_start += 1
                if dots == 1:
                    while span_end > span_start and raw[span_end - 1] == 48:
                        span_end -= 1
                    if span_end > span_start and raw[span_end - 1] == 46:
                        span_end -= 1
                if span_end <= span_start:
                    return zero_key, False
            elif letter_e == 1 and signs <= 2:
                return _span_hash_one(raw, start, end, key), True
    h = _span_hash_one(raw, span_start, span_end, key)
    return (h ^ negative_key if negative else h), False


def _in_token(byte: np.uint8) -> bool:
    """_TOKEN[byte] by arithmetic, which compiles to vector instructions where a table lookup does not."""
    return bool((byte >= 0x80) | (np.uint8(byte - 0x30) < 10) | (np.uint8((byte | 0x20) - 0x61) < 26)
                | (byte == 0x2B) | (byte == 0x2D) | (byte == 0x2E) | (byte == 0x5F))


def _token_masks(raw: npt.NDArray[np.uint8], flags: Mask, masks: U64) -> int:
    """masks[j] bit k set when byte 64 * j + k of raw is in a token, less each dash between a digit and a
    letter, which separates ("79-year-old" holds the number 79); returns the count of words. Each byte's flag
    is found first, in a loop the compiler vectorises, then packed 64 to a word."""
    size = raw.size
    for i in range(1, size - 1):
        byte = raw[i]
        joins = (byte == 0x2D) & (np.uint8(raw[i - 1] - 0x30) < 10) & (np.uint8((raw[i + 1] | 0x20) - 0x61) < 26)
        flags[i] = _in_token_one(byte) & ~joins
    if size:
        flags[0] = _in_token_one(raw[0])
        flags[size - 1] = _in_token_one(raw[size - 1])
    words = (size + 63) // 64
    for i in range(size, 64 * words):
        flags[i] = False
    for j in range(words):
        mask = np.uint64(0)
        for k in range(64):
            mask |= np.uint64(flags[64 * j + k]) << np.uint64(k)
        masks[j] = mask
    return words


def _classes_seen(raw: npt.NDArray[np.uint8], classes: npt.NDArray[np.uint8], start: int, end: int) -> int:
    """The classes of the bytes of raw[start:end], or'ed."""
    seen = 0
    for k in range(start, end):
        seen |= classes[raw[k]]
    return seen


def _tokens_kernel(raw: npt.NDArray[np.uint8], classes: npt.NDArray[np.uint8], key: np.uint64,
                   negative_key: np.uint64, zero_key: np.uint64, starts: I64, ends: I64, hashes: U64,
                   exponents: I64, cache: U64, flags: Mask, masks: U64) -> tuple[int, int]:
    """_token_hashes_numpy in one compiled pass: fills starts, trimmed ends, hashes and exponent candidates.

    Token boundaries come from bit masks of the bytes in tokens (`flags` holds a byte's, `masks` 64 of them a
    word; both sized for raw rounded up to 64 bytes), by counting zero bits: a loop over bytes would
    mispredict a branch at every boundary.

    Outputs repeat their tokens (column names, categories, small numbers), so the hashes of tokens of up to 24
    bytes are remembered in `cache`, 4 words an entry: the token's bytes as 3 words (zero-padded; token
    bytes are never zero, so they also tell its length), then its hash. The entry is picked by the words."""
    size = raw.size
    slots = np.uint64(cache.size // 4 - 1)  # a power of two, less one
    words = _token_masks_one(raw, flags, masks)
    count = 0
    candidates = 0
    position = 0
    while True:
        w = position >> 6
        if w >= words:
            break
        mask = masks[w] & (_ALL << np.uint64(position & 63))
        while mask == 0 and w + 1 < words:
            w += 1
            mask = masks[w]
        if mask == 0:
            break
        start = 64 * w + int(_trailing_zeros(mask))
        mask = ~masks[w] & (_ALL << np.uint64(start & 63))
        while mask == 0 and w + 1 < words:
            w += 1
            mask = ~masks[w]
        end = min(size, 64 * w + int(_trailing_zeros(mask))) if mask else size
        position = end
        # Drop trailing dots, dashes and plus signs (`_DOT | _SIGN`).
        while end > start and classes[raw[end - 1]] & (_DOT | _SIGN):
            end -= 1
        if end == start:
            continue
        length = end - start
        starts[count] = start
        ends[count] = end
        if length <= 24 and start + 24 <= size:
            first = _load_unaligned(raw, start) & _MASKS[min(length, 8)]
            second = _load_unaligned(raw, start + 8) & _MASKS[max(0, min(length - 8, 8))]
            third = _load_unaligned(raw, start + 16) & _MASKS[max(0, length - 16)]
            entry = 4 * np.int64(((first ^ (second * _C2) ^ third) * _C1 >> np.uint64(40)) & slots)
            if cache[entry] == first and cache[entry + 1] == second and cache[entry + 2] == third:
                hashes[count] = cache[entry + 3]
            else:
                seen = _classes_seen_one(raw, classes, start, end)
                h, exponent = _canonical_hash_one(raw, classes, start, end, seen, key, negative_key, zero_key)
                hashes[count] = h
                if exponent:
                    exponents[candidates] = count
                    candidates += 1
                else:  # an exponent's hash is not final yet
                    cache[entry], cache[entry + 1], cache[entry + 2], cache[entry + 3] = first, second, third, h
        else:
            seen = _classes_seen_one(raw, classes, start, end)
            h, exponent = _canonical_hash_one(raw, classes, start, end, seen, key, negative_key, zero_key)
            hashes[count] = h
            if exponent:
                exponents[candidates] = count
                candidates += 1
        count += 1
    return count, candidates


# The kernels call these by name, so they must be compiled before them.
_fmix_one: Any = _compile(_fmix_word, inline=True)
_load_lower: Any = _compile(_load_word, inline=True)
_span_hash_one: Any = _compile(_span_hash, inline=True)
_canonical_hash_one: Any = _compile(_canonical_hash, inline=True)
_in_token_one: Any = _compile(_in_token, inline=True)
_token_masks_one: Any = _compile(_token_masks, inline=True)
_classes_seen_one: Any = _compile(_classes_seen, inline=True)
_compiled_tokens: Any = _compile(_tokens_kernel)


@dataclass
class _TokenBuffers:
    """The compiled tokeniser's output arrays, reused from chunk to chunk of one scan."""

    starts: I64
    ends: I64
    hashes: U64
    exponents: I64
    cache: U64  # the tokeniser's memory of hashes, valid for one key only
    flags: Mask  # whether each byte is in a token
    masks: U64  # the same, a bit a byte

    @classmethod
    def sized(cls, size: int) -> _TokenBuffers:
        capacity = size // 2 + 1  # tokens are separated by at least one byte
        return cls(np.empty(capacity, dtype=np.int64), np.empty(capacity, dtype=np.int64),
                   np.empty(capacity, dtype=np.uint64), np.empty(capacity, dtype=np.int64),
                   np.zeros(4 * TOKEN_CACHE_ENTRIES, dtype=np.uint64), np.empty(2 * capacity + 64, dtype=np.bool_),
                   np.empty(capacity // 32 + 2, dtype=np.uint64))


def _token_hashes_numba(chunk: bytes | memoryview, keys: _Keys,
                        buffers: _TokenBuffers | None = None) -> tuple[I64, U64]:
    """Start offsets and keyed hashes of the canonical tokens of one chunk, in one compiled pass; the results
    are views of `buffers` when given."""
    raw = np.frombuffer(chunk, dtype=np.uint8)
    if buffers is None or buffers.starts.size < raw.size // 2 + 1:
        buffers = _TokenBuffers.sized(raw.size)
    count, candidates = _compiled_tokens(raw, _CLASSES, keys.token, keys.negative, keys.zero, buffers.starts,
                                         buffers.ends, buffers.hashes, buffers.exponents, buffers.cache, buffers.flags,
                                         buffers.masks)
    starts, ends, hashes = buffers.starts[:count], buffers.ends[:count], buffers.hashes[:count]
    if candidates:
        _canonical_exponents(chunk, starts, ends, buffers.exponents[:candidates], hashes, keys)
    return starts, hashes


def _token_hashes(chunk: bytes | memoryview, keys: _Keys, buffers: _TokenBuffers | None = None) -> tuple[I64, U64]:
    """Start offsets and keyed hashes of the canonical tokens of one chunk."""
    if _compiled_tokens is not None:
        return _token_hashes_numba(chunk, keys, buffers)
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


def _token_ends(chunk: bytes | memoryview, starts: I64) -> I64:
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
_EMPTY = np.uint64(0xFFFFFFFFFFFFFFFF)  # _classify_kernel's marks in its memo
_NOWHERE = np.int64(-2)
_NOTVALUE = np.int64(-1)  # _scan_chunk_kernel's mark of a token known to be no QI value
MEMO_ENTRIES = 4096
# A sorted hash array with its directory and the directory's shift, as the compiled kernels take it.
Table = tuple[U64, npt.NDArray[np.uint32], np.uint64]
LOOKAHEAD = 32  # lookups in flight: each prefetches its directory entry, then its first member
PROBES = 4  # members of a bucket _find compares without branching
BLOCK = 4096  # queries the compiled kernels gather before looking them up together
ROW_MEMO_ENTRIES = 1 << 14  # _rows_kernel's memo of settled window sums: 256 KiB


def _directory(sorted_hashes: U64) -> Directory | None:
    """Where each bucket of the top bits starts in `sorted_hashes`, for the compiled lookup; None without it.

    Keyed hashes are uniform, and there are about as many buckets as members, so a bucket holds 0 to 2 members
    nearly always: a lookup reads one directory entry, then compares the first PROBES members from there
    without a branch (sizes vary, so a loop over them would mispredict), with no sorting of the queries.
    At most 2**23 buckets (32 MiB)."""
    if _compiled_member is None or sorted_hashes.size >= 1 << 32:
        return None
    bits = min(23, max(1, int(sorted_hashes.size).bit_length()))
    bounds = np.arange(1 << bits, dtype=np.uint64) << np.uint64(64 - bits)
    directory = np.empty((1 << bits) + 1, dtype=np.uint32)
    directory[:-1] = np.searchsorted(sorted_hashes, bounds)
    directory[-1] = sorted_hashes.size
    return directory, 64 - bits


def _find(table: Table, wanted: np.uint64) -> int:
    """The position of `wanted` in the table's sorted hashes, or -1."""
    sorted_hashes, directory, shift = table
    bucket = wanted >> shift
    low = np.int64(directory[bucket])
    size = np.int64(directory[bucket + np.uint64(1)]) - low
    found = np.int64(-1)
    # Unrolled, with selects rather than branches. Reads stay in the bucket (an empty one reads its neighbour,
    # or nothing in an empty table), so a lookup touches no more cache lines than the bucket's.
    last = max(np.int64(0), low + size - 1) if sorted_hashes.size else np.int64(-1)
    for k in range(PROBES if last >= 0 else 0):
        at = min(low + k, last)
        if (sorted_hashes[at] == wanted) & (k < size):
            found = at
    if size > PROBES:  # rare: a bucket of more than PROBES members
        for k in range(PROBES, size):
            if sorted_hashes[low + k] == wanted:
                found = low + k
    return int(found)


def _find_many(table: Table, queries: U64, count: int, positions: I64) -> None:
    """positions[i] = _find(table, queries[i]) for i < count. Large tables miss the cache on every lookup;
    prefetching a directory entry 2 * LOOKAHEAD queries ahead and the members it points to LOOKAHEAD ahead
    keeps many misses in flight instead of waiting for each in turn."""
    sorted_hashes, directory, shift = table
    for i in range(count + 2 * LOOKAHEAD):
        if i < count:
            _prefetch(directory, queries[i] >> shift)
        ahead = i - LOOKAHEAD
        if 0 <= ahead < count:
            _prefetch(sorted_hashes, directory[queries[ahead] >> shift])
        done = i - 2 * LOOKAHEAD
        if done >= 0:
            positions[done] = _find_one(table, queries[done])


_find_one: Any = _compile(_find, inline=True)
_compiled_member: Any = _compile(_find_many)


def _classify_kernel(starts: I64, hashes: U64, offset: int, values: Table, ids: Table, distinctive: Table,
                     stream: npt.NDArray[np.int32], stream_at: I64, distinctive_at: I64, distinctive_pos: I64,
                     id_seen: npt.NDArray[np.uint8], id_at: I64, counts: I64, memo: U64, candidates: U64,
                     candidate_at: I64, positions: I64) -> None:
    """Sort one chunk's tokens: QI values join the value stream (as their position in `values`), the rest are
    looked up among the ids and the other values sought (distinctive or rare values of the other columns, disjoint
    from the QI values by construction), whose offsets and positions go to distinctive_at and distinctive_pos.

    counts holds, and gets updated: entries in stream (and stream_at), in distinctive_at, in id_at (which keeps
    the first ids found, as many as it holds), and distinct ids (each marked in the bitset id_seen). The caller
    sizes stream and distinctive_at for every token of the chunk.

    Most tokens repeat, so `memo` remembers recent answers, 2 words an entry picked by the hash's low bits: the
    hash, then its position among the values, or NOWHERE when it is in no set (ids and distinctive values
    are not remembered: each one found must be counted). Empty entries hold EMPTY."""
    streamed, distinguished, identified, distinct = counts[0], counts[1], counts[2], counts[3]
    slots = np.uint64(memo.size // 2 - 1)  # a power of two, less one
    others = 0
    for t in range(hashes.size):
        h = hashes[t]
        entry = 2 * np.int64(h & slots)
        if memo[entry + 1] != _EMPTY and memo[entry] == h:
            value = np.int64(memo[entry + 1])
            if value == _NOWHERE:
                continue
        else:
            value = _find_one(values, h)
            if value >= 0:
                memo[entry], memo[entry + 1] = h, np.uint64(value)
        if value >= 0:
            stream[streamed] = value
            stream_at[streamed] = starts[t] + offset
            streamed += 1
        else:
            candidates[others] = hashes[t]
            candidate_at[others] = starts[t] + offset
            others += 1
    _find_many_one(ids, candidates, others, positions)
    for k in range(others):
        found = positions[k]
        if found < 0 and not distinctive[0].size:
            entry = 2 * np.int64(candidates[k] & slots)
            memo[entry], memo[entry + 1] = candidates[k], np.uint64(_NOWHERE)
        if found >= 0:
            if identified < id_at.size:
                id_at[identified] = candidate_at[k]
                identified += 1
            bit = np.uint8(1 << (found & 7))
            if not id_seen[found >> 3] & bit:
                id_seen[found >> 3] |= bit
                distinct += 1
    if distinctive[0].size:
        _find_many_one(distinctive, candidates, others, positions)
        for k in range(others):
            if positions[k] >= 0:
                distinctive_at[distinguished] = candidate_at[k]
                distinctive_pos[distinguished] = positions[k]
                distinguished += 1
    counts[0], counts[1], counts[2], counts[3] = streamed, distinguished, identified, distinct


_find_many_one: Any = _compile(_find_many, inline=True)
_compiled_classify: Any = _compile(_classify_kernel)


def _scan_chunk_kernel(raw: npt.NDArray[np.uint8], classes: npt.NDArray[np.uint8], key: np.uint64,
                       negative_key: np.uint64, zero_key: np.uint64, offset: int, values: Table, ids: Table,
                       distinctive: Table, stream: npt.NDArray[np.int32], stream_at: I64, distinctive_at: I64,
                       distinctive_pos: I64, id_seen: npt.NDArray[np.uint8], id_at: I64, counts: I64, memo: U64,
                       candidates: U64,
                       candidate_at: I64, positions: I64, cache: U64, flags: Mask, masks: U64,
                       candidate_entry: I64) -> int:
    """_tokens_kernel and _classify_kernel in one pass over one chunk, with no array of tokens between them.

    The tokeniser's cache entries (`cache`, 5 words each) keep, beside a token's bytes and hash, what it is:
    its position among the QI values, NOTVALUE (a value it is not: it may be an id) or NOWHERE (in no set).
    Returns 0; or, committing nothing (counts and id_seen untouched), -1 when the chunk holds a token in
    exponent notation (the caller then takes the two-step path, whose exponents are canonicalised in Python),
    -2 when stream or distinctive_at has no room left for it."""
    size = raw.size
    streamed, distinguished, identified, distinct = counts[0], counts[1], counts[2], counts[3]
    slots = np.uint64(cache.size // 5 - 1)  # a power of two, less one
    memo_slots = np.uint64(memo.size // 2 - 1)
    remember_nowhere = not distinctive[0].size
    words = _token_masks_one(raw, flags, masks)
    others = 0
    position = 0
    while True:
        w = position >> 6
        if w >= words:
            break
        mask = masks[w] & (_ALL << np.uint64(position & 63))
        while mask == 0 and w + 1 < words:
            w += 1
            mask = masks[w]
        if mask == 0:
            break
        start = 64 * w + int(_trailing_zeros(mask))
        mask = ~masks[w] & (_ALL << np.uint64(start & 63))
        while mask == 0 and w + 1 < words:
            w += 1
            mask = ~masks[w]
        end = min(size, 64 * w + int(_trailing_zeros(mask))) if mask else size
        position = end
        while end > start and classes[raw[end - 1]] & (_DOT | _SIGN):
            end -= 1
        if end == start:
            continue
        length = end - start
        entry = np.int64(-1)
        value = _NOTVALUE
        if length <= 24 and start + 24 <= size:
            first = _load_unaligned(raw, start) & _MASKS[min(length, 8)]
            second = _load_unaligned(raw, start + 8) & _MASKS[max(0, min(length - 8, 8))]
            third = _load_unaligned(raw, start + 16) & _MASKS[max(0, length - 16)]
            entry = 5 * np.int64(((first ^ (second * _C2) ^ third) * _C1 >> np.uint64(40)) & slots)
            if cache[entry] == first and cache[entry + 1] == second and cache[entry + 2] == third:
                h = cache[entry + 3]
                value = np.int64(cache[entry + 4])
                if value == _NOWHERE:
                    continue
                if value >= 0:
                    if streamed >= stream.size:
                        return -2
                    stream[streamed] = value
                    stream_at[streamed] = start + offset
                    streamed += 1
                    continue
            else:
                seen = _classes_seen_one(raw, classes, start, end)
                h, exponent = _canonical_hash_one(raw, classes, start, end, seen, key, negative_key, zero_key)
                if exponent:
                    return -1
                cache[entry], cache[entry + 1], cache[entry + 2], cache[entry + 3] = first, second, third, h
                cache[entry + 4] = np.uint64(_NOTVALUE)
        else:
            seen = _classes_seen_one(raw, classes, start, end)
            h, exponent = _canonical_hash_one(raw, classes, start, end, seen, key, negative_key, zero_key)
            if exponent:
                return -1
        memo_entry = 2 * np.int64(h & memo_slots)
        if memo[memo_entry + 1] != _EMPTY and memo[memo_entry] == h:
            value = np.int64(memo[memo_entry + 1])
            if value == _NOWHERE:
                if entry >= 0:
                    cache[entry + 4] = np.uint64(_NOWHERE)
                continue
        else:
            value = _find_one(values, h)
            if value >= 0:
                memo[memo_entry], memo[memo_entry + 1] = h, np.uint64(value)
        if value >= 0:
            if entry >= 0:
                cache[entry + 4] = np.uint64(value)
            if streamed >= stream.size:
                return -2
            stream[streamed] = value
            stream_at[streamed] = start + offset
            streamed += 1
        else:
            candidates[others] = h
            candidate_at[others] = start + offset
            candidate_entry[others] = entry
            others += 1
    if distinctive[0].size and distinguished + others > distinctive_at.size:
        return -2
    _find_many_one(ids, candidates, others, positions)
    for k in range(others):
        found = positions[k]
        if found < 0 and remember_nowhere:
            h = candidates[k]
            memo_entry = 2 * np.int64(h & memo_slots)
            memo[memo_entry], memo[memo_entry + 1] = h, np.uint64(_NOWHERE)
            entry = candidate_entry[k]
            if entry >= 0 and cache[entry + 3] == h:  # what a hash is depends on the hash alone
                cache[entry + 4] = np.uint64(_NOWHERE)
        if found >= 0:
            if identified < id_at.size:
                id_at[identified] = candidate_at[k]
                identified += 1
            bit = np.uint8(1 << (found & 7))
            if not id_seen[found >> 3] & bit:
                id_seen[found >> 3] |= bit
                distinct += 1
    if distinctive[0].size:
        _find_many_one(distinctive, candidates, others, positions)
        for k in range(others):
            if positions[k] >= 0:
                distinctive_at[distinguished] = candidate_at[k]
                distinctive_pos[distinguished] = positions[k]
                distinguished += 1
    counts[0], counts[1], counts[2], counts[3] = streamed, distinguished, identified, distinct
    return 0


_compiled_scan: Any = _compile(_scan_chunk_kernel)


def _record_rows(table: Table, totals: U64, at: I64, count: int, positions: I64, seen: npt.NDArray[np.uint8],
                 first: I64, distinct: int) -> int:
    """Look up `count` window sums among the rows; each row matched for the first time (its bit in the bitset
    `seen` clear) gets its window's stream position appended to `first`. Returns the new count of distinct rows."""
    _find_many_one(table, totals, count, positions)
    for k in range(count):
        row = positions[k]
        if row < 0:
            continue
        bit = np.uint8(1 << (row & 7))
        if not seen[row >> 3] & bit:
            seen[row >> 3] |= bit
            first[distinct] = at[k]
            distinct += 1
    return distinct


def _remember_rows(memo: U64, mask: np.uint64, totals: U64, found: I64, count: int) -> None:
    """Enter `count` looked-up window sums in _rows_kernel's memo, each with whether it is a row (recorded by
    then, so finding it again changes nothing)."""
    for k in range(count):
        slot = np.int64((totals[k] >> np.uint64(24)) & mask) << 1
        memo[slot] = totals[k]
        memo[slot + 1] = np.uint64(2) if found[k] >= 0 else np.uint64(1)


def _filter_bits(h: np.uint64) -> np.uint64:
    """The 4 bits of one 64-bit word of a _row_filter that `h` sets: from bits 40 to 63 (the word is picked by
    the low bits)."""
    one = np.uint64(1)
    return ((one << ((h >> np.uint64(40)) & np.uint64(63))) | (one << ((h >> np.uint64(46)) & np.uint64(63)))
            | (one << ((h >> np.uint64(52)) & np.uint64(63))) | (one << (h >> np.uint64(58))))


def _row_filter(rows: U64) -> U64:
    """A Bloom filter of the row sums, one 64-bit word per lookup, 32 to 64 bits a row (at most 8 MiB): probing it
    is a few instructions where a lookup among the rows is two cache misses, and it turns away all but a
    fraction of a percent of the windows that are no row, which in an aggregate's value stream is nearly all of
    them. It never turns away a row."""
    words = np.zeros(min(1 << 20, 1 << max(0, (int(rows.size) * 32 - 1).bit_length() - 6)), dtype=np.uint64)
    one = np.uint64(1)
    bits = np.zeros(rows.size, dtype=np.uint64)
    for shift in (40, 46, 52, 58):
        bits |= one << ((rows >> np.uint64(shift)) & np.uint64(63))
    slot = (rows & np.uint64(words.size - 1)).astype(np.int64)
    np.bitwise_or.at(words, slot, bits)
    return words


def _passes(row_filter: U64, h: np.uint64) -> bool:
    bits = _filter_bits_one(h)
    return bool((row_filter[np.int64(h & np.uint64(row_filter.size - 1))] & bits) == bits)


_filter_bits_one: Any = _compile(_filter_bits, inline=True)
_remember: Any = _compile(_remember_rows, inline=True)
_passes_one: Any = _compile(_passes, inline=True)


def _rows_kernel(stream: npt.NDArray[np.int32], weights: U64, widths: I64, rows: Table, row_filter: U64,
                 seen: npt.NDArray[np.uint8], first: I64) -> int:
    """FingerprintIndex._find_rows_numpy in compiled loops, over a stream of value positions: counts the distinct
    rows matched (marking them in the bitset `seen`) and fills `first` with the stream position of each one's
    first match, in the numpy path's order of matching. Returns that count.

    Windows are looked up BLOCK at a time, less those `row_filter` turns away; while most windows of the last
    block were rows (a plain dump), the filter is skipped too, as it would turn away next to none."""
    n = stream.size
    totals = np.empty(BLOCK, dtype=np.uint64)
    at = np.empty(BLOCK, dtype=np.int64)
    found = np.empty(BLOCK, dtype=np.int64)
    uncovered = np.empty(n, dtype=np.uint8)
    valued = np.empty(0, dtype=np.uint64)
    # Sums of the one-foreign-value pass already settled, direct-mapped (sum, then 1: no row, 2: a row recorded
    # by then, 0: an empty slot): an aggregate repeats the same few sums, each one a probe of the large filter.
    memo = np.zeros(2 * ROW_MEMO_ENTRIES, dtype=np.uint64)
    memo_mask = np.uint64(ROW_MEMO_ENTRIES - 1)
    distinct = 0
    filtered = True
    for w in range(widths.size):
        width = widths[w]
        if n < width:
            continue
        # Every window of `width` values, by a running sum, BLOCK windows per batch of lookups.
        total = np.uint64(0)
        for k in range(width - 1):
            total += weights[stream[k]]
        covered_until = 0
        p = 0
        while p <= n - width:
            count = 0
            block_start = p
            while p <= n - width and count < BLOCK:
                total += weights[stream[p + width - 1]]
                if not filtered or _passes_one(row_filter, total):
                    totals[count] = total
                    at[count] = p
                    count += 1
                total -= weights[stream[p]]
                p += 1
            distinct = _record_rows_one(rows, totals, at, count, found, seen, first, distinct)
            hits = 0
            j = 0
            for q in range(block_start, p):
                if j < count and at[j] == q:
                    if found[j] >= 0:
                        covered_until = q + width
                        hits += 1
                    j += 1
                uncovered[q] = q >= covered_until
            filtered = 2 * hits < p - block_start
        for i in range(n - width + 1, n):
            uncovered[i] = i >= covered_until
        if n < width + 1:
            continue
        # One foreign value inside a window of width + 1, tried where 2+ of its values are in no exact match.
        positions = np.empty(n - width, dtype=np.int64)
        wide = np.empty(n - width, dtype=np.uint64)
        tried = 0
        gaps = 0
        for i in range(width + 1):
            gaps += int(uncovered[i])
        for q in range(n - width):
            if q:
                gaps += int(uncovered[q + width]) - int(uncovered[q - 1])
            if gaps > 1:
                positions[tried] = q
                tried += 1
        if not tried:
            continue
        if valued.size < n:
            valued = np.empty(n, dtype=np.uint64)  # each value's weight, read once per window and value below
            for i in range(n):
                valued[i] = weights[stream[i]]
        total = np.uint64(0)
        for k in range(tried):
            q = positions[k]
            if k and q == positions[k - 1] + 1:  # the next window: roll the sum on
                total += valued[q + width] - valued[q - 1]
            else:
                total = np.uint64(0)
                for i in range(width + 1):
                    total += valued[q + i]
            wide[k] = total
        for inner in range(1, width):
            k = 0
            while k < tried:
                count = 0
                while k < tried and count < BLOCK:
                    trimmed = wide[k] - valued[positions[k] + inner]
                    slot = np.int64((trimmed >> np.uint64(24)) & memo_mask) << 1
                    if memo[slot] != trimmed or not memo[slot + 1]:  # a known sum needs no second lookup
                        if _passes_one(row_filter, trimmed):
                            totals[count] = trimmed
                            at[count] = positions[k]
                            count += 1
                        else:
                            memo[slot] = trimmed
                            memo[slot + 1] = np.uint64(1)
                    k += 1
                distinct = _record_rows_one(rows, totals, at, count, found, seen, first, distinct)
                _remember(memo, memo_mask, totals, found, count)
    return distinct


_record_rows_one: Any = _compile(_record_rows, inline=True)
_compiled_rows: Any = _compile(_rows_kernel)


def _runs_kernel(stream: npt.NDArray[np.int32], in_domain: npt.NDArray[np.bool_], weights: U64, width: int,
                 base: np.uint64, base_inverse: np.uint64, salt: np.uint64, runs: Table, hits: I64) -> int:
    """The stream positions where a sampled n-gram of one column's runs starts, in order; returns their count.

    Only windows of values all in the column's domain can be its runs, so only those are hashed. The hash is
    _run_hashes' rolling sum sum(weights[j + k] * base**k), rolled forward while windows are consecutive:
    arithmetic modulo 2**64 is exact and `base` is invertible, so it equals the numpy path bit for bit."""
    n = stream.size
    top = np.uint64(1)  # base ** (width - 1)
    for _ in range(width - 1):
        top *= base
    windows = np.empty(BLOCK, dtype=np.uint64)
    at = np.empty(BLOCK, dtype=np.int64)
    found = np.empty(BLOCK, dtype=np.int64)
    hit_count = 0
    streak = 0
    rolling = np.uint64(0)
    rolled = -2  # the window start `rolling` holds
    q = 0
    while q < n:
        count = 0
        while q < n and count < BLOCK:
            streak = streak + 1 if in_domain[stream[q]] else 0
            q += 1
            if streak < width:
                continue
            j = q - width
            if rolled == j - 1:
                rolling = (rolling - weights[stream[j - 1]]) * base_inverse + weights[stream[q - 1]] * top
            else:
                rolling = np.uint64(0)
                power = np.uint64(1)
                for k in range(width):
                    rolling += weights[stream[j + k]] * power
                    power *= base
            rolled = j
            window = _fmix_one(rolling ^ salt)
            if window >> RUN_SAMPLE_SHIFT == np.uint64(0):
                windows[count] = window
                at[count] = j
                count += 1
        _find_many_one(runs, windows, count, found)
        for k in range(count):
            if found[k] >= 0:
                hits[hit_count] = at[k]
                hit_count += 1
    return hit_count


_compiled_runs: Any = _compile(_runs_kernel)


def _all_runs_kernel(stream: npt.NDArray[np.int32], lanes: U64, weights: U64, widths: I64, base: np.uint64,
                     base_inverse: np.uint64, salts: U64, runs: Any, hits: I64, hit_counts: I64) -> None:
    """_runs_kernel for up to 8 columns in one pass: hits[c, :hit_counts[c]] are column c's.

    The columns' streaks of in-domain values are 8-bit lanes of one word, counted together: lanes[v] holds 0xFF
    in the lanes of the columns whose domain holds value v, a lane stops counting at 128 (past any width), and
    a lane reaches its column's width when adding 128 - width sets its top bit. Only then is that column's
    window hashed, as _runs_kernel does."""
    n = stream.size
    columns = widths.size
    high = np.uint64(0x8080808080808080)
    ones = np.uint64(0x0101010101010101)
    reach = np.uint64(0)
    tops = np.ones(columns, dtype=np.uint64)  # base ** (width - 1)
    for c in range(columns):
        reach |= np.uint64(128 - widths[c]) << np.uint64(8 * c)
        for _ in range(widths[c] - 1):
            tops[c] *= base
    windows = np.empty((columns, BLOCK), dtype=np.uint64)
    at = np.empty((columns, BLOCK), dtype=np.int64)
    found = np.empty(BLOCK, dtype=np.int64)
    counts = np.zeros(columns, dtype=np.int64)
    rolling = np.zeros(columns, dtype=np.uint64)
    rolled = np.full(columns, -2, dtype=np.int64)  # the window start rolling[c] holds
    for c in range(columns):
        hit_counts[c] = 0
    streaks = np.uint64(0)
    for q in range(n):
        increment = ones & ~((streaks & high) >> np.uint64(7))
        streaks = (streaks + increment) & lanes[stream[q]]
        ready = (streaks + reach) & high
        while ready:
            lane = _trailing_zeros(ready) >> np.uint64(3)
            ready &= ready - np.uint64(1)
            c = int(lane)
            width = widths[c]
            j = q + 1 - width
            if rolled[c] == j - 1:
                rolling[c] = ((rolling[c] - weights[stream[j - 1]]) * base_inverse
                              + weights[stream[q]] * tops[c])
            else:
                total = np.uint64(0)
                power = np.uint64(1)
                for k in range(width):
                    total += weights[stream[j + k]] * power
                    power *= base
                rolling[c] = total
            rolled[c] = j
            window = _fmix_one(rolling[c] ^ salts[c])
            if window >> RUN_SAMPLE_SHIFT == np.uint64(0):
                count = counts[c]
                windows[c, count] = window
                at[c, count] = j
                counts[c] = count + 1
                if count + 1 == BLOCK:
                    _flush_runs_one(runs[c], windows[c], at[c], BLOCK, found, hits[c], hit_counts, c)
                    counts[c] = 0
    for c in range(columns):
        _flush_runs_one(runs[c], windows[c], at[c], counts[c], found, hits[c], hit_counts, c)


def _flush_runs(table: Table, windows: U64, at: I64, count: int, found: I64, hits: I64, hit_counts: I64,
                column: int) -> None:
    """Look up `count` sampled windows of one column's runs and append the starts of those found to its hits."""
    _find_many_one(table, windows, count, found)
    hit_count = hit_counts[column]
    for k in range(count):
        if found[k] >= 0:
            hits[hit_count] = at[k]
            hit_count += 1
    hit_counts[column] = hit_count


_flush_runs_one: Any = _compile(_flush_runs, inline=True)
_compiled_all_runs: Any = _compile(_all_runs_kernel)


PARTIAL_WAYS = 4  # rows tracked per bucket of _partial_rows_kernel's table; the least recently touched leaves
PARTIAL_SLOTS = 4  # rare values remembered per tracked row


def _partial_rows_kernel(raw: npt.NDArray[np.uint8], stream: npt.NDArray[np.int32], stream_at: I64, value_rare: I64,
                         other_positions: I64, other_at: I64, other_rare: I64, starts: I64, rows: I64,
                         seen: npt.NDArray[np.uint8], first: I64, entry_row: I64, entry_used: I64,
                         entry_touched: I64, slot_value: I64, slot_at: I64, slot_line: I64, slot_hit: I64) -> int:
    """Rows of which PARTIAL_VALUES or more distinct rare values stand in one record; returns their count.

    The rare values found are the QI values of the stream and the other columns' values found (each sorted by
    offset), mapped to their position among the rare values (-1: not rare) and taken in offset order. Each points
    at its rows (rows[starts[v]:starts[v + 1]], at most RARE_ROWS). Values belong to one record when they stand
    within RECORD_BYTES, or on one line within LINE_BYTES, and when at least half of the rare values found from the
    first of them to the last are the row's: a dense table of statistics (means printed to the data's precision)
    hits many rare values, and three of them may point at one row by chance, but never as a run of their own. A
    table of recently pointed-at rows (`entry_*`, PARTIAL_WAYS a bucket) keeps each row's last PARTIAL_SLOTS values
    (`slot_*`: value, offset, line, number of the rare value found); a row whose remembered values of one record
    reach PARTIAL_VALUES is marked in the bitset `seen`, and the offset of that record's first value appended to
    `first`. Slots and entries are scratch: the caller fills entry_row and entry_touched with -1."""
    distinct = 0
    line = 0
    previous = -1
    buckets = entry_row.size // PARTIAL_WAYS
    i = 0
    j = 0
    hit = 0
    while i < stream.size or j < other_positions.size:
        if j >= other_positions.size or (i < stream.size and stream_at[i] < other_at[j]):
            value = value_rare[stream[i]]
            at = stream_at[i]
            i += 1
        else:
            value = other_rare[other_positions[j]]
            at = other_at[j]
            j += 1
        if value < 0:
            continue
        hit += 1
        if previous >= 0:
            if at - previous > LINE_BYTES:
                line += 1  # too far apart to share a record either way
            else:
                for b in range(previous, at):
                    if raw[b] == 10:
                        line += 1
                        break
        previous = at
        for p in range(starts[value], starts[value + 1]):
            row = rows[p]
            base = (row % buckets) * PARTIAL_WAYS
            entry = -1
            victim = base
            for way in range(base, base + PARTIAL_WAYS):
                if entry_row[way] == row:
                    entry = way
                    break
                if entry_touched[way] < entry_touched[victim]:
                    victim = way
            if entry < 0:
                entry = victim
                entry_row[entry] = row
                entry_used[entry] = 0
            entry_touched[entry] = hit
            # Keep the values of this record, this value's own earlier slot excepted, then add it as the newest.
            slot = entry * PARTIAL_SLOTS
            kept = 0
            for k in range(slot, slot + entry_used[entry]):
                distance = at - slot_at[k]
                if slot_value[k] != value and (distance <= RECORD_BYTES or (
                        slot_line[k] == line and distance <= LINE_BYTES)):
                    slot_value[slot + kept] = slot_value[k]
                    slot_at[slot + kept] = slot_at[k]
                    slot_line[slot + kept] = slot_line[k]
                    slot_hit[slot + kept] = slot_hit[k]
                    kept += 1
            if kept == PARTIAL_SLOTS:  # the oldest goes
                for k in range(slot, slot + kept - 1):
                    slot_value[k], slot_at[k], slot_line[k] = slot_value[k + 1], slot_at[k + 1], slot_line[k + 1]
                    slot_hit[k] = slot_hit[k + 1]
                kept -= 1
            slot_value[slot + kept], slot_at[slot + kept], slot_line[slot + kept] = value, at, line
            slot_hit[slot + kept] = hit
            kept += 1
            entry_used[entry] = kept
            # The row's values from the start-th kept on: enough of them, and at least half the rare values there.
            for start in range(kept - PARTIAL_VALUES + 1):
                own = kept - start
                if hit - slot_hit[slot + start] + 1 <= 2 * own:
                    bit = np.uint8(1 << (row & 7))
                    if not seen[row >> 3] & bit:
                        seen[row >> 3] |= bit
                        first[distinct] = slot_at[slot + start]
                        distinct += 1
                    break
    return distinct


_compiled_partial_rows: Any = _compile(_partial_rows_kernel)


def _member(sorted_hashes: U64, hashes: U64, directory: Directory | None = None) -> Mask:
    if not sorted_hashes.size or not hashes.size:
        return np.zeros(hashes.size, dtype=np.bool_)
    if directory is not None and _compiled_member is not None:
        positions = np.empty(hashes.size, dtype=np.int64)
        _compiled_member((sorted_hashes, directory[0], np.uint64(directory[1])), hashes, hashes.size, positions)
        return positions >= 0
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


def _run_hashes(stream: U64, width: int, keys: _Keys) -> U64:
    """Order-dependent keyed hashes of every `width` consecutive values of a hash stream."""
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
    windows ^= _run_salt(width)
    return _fmix(windows)


def _run_salt(width: int) -> np.uint64:
    return np.uint64((width * int(_C1)) & int(_ALL))


def _sampled(hashes: U64) -> Mask:
    return np.asarray((hashes >> RUN_SAMPLE_SHIFT) == 0)


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
        # Rare values and the rows each is in (format 3 on; an older index finds no partial rows). The tokens that are
        # no QI value are sought among `_others`: the distinctive values and the rare values of the other columns.
        self._rare = arrays.get("rare", np.zeros(0, np.uint64))
        self._rare_starts = arrays.get("rare_starts", np.zeros(1, np.uint64)).astype(np.int64)
        self._rare_rows = arrays.get("rare_rows", np.zeros(0, np.uint64)).astype(np.int64)
        self._others = np.union1d(self._distinctive, np.setdiff1d(self._rare, self._values))
        self._others_distinctive = np.isin(self._others, self._distinctive)
        self._value_rare = _positions_in(self._rare, self._values)
        self._others_rare = _positions_in(self._rare, self._others)
        self._rare_values_in_stream = bool((self._value_rare >= 0).any())
        self._runs = {column: arrays[f"runs:{column}"] for column in header["run_widths"]}
        # Which QI values each run column holds (format 2 on): a window with a value outside a column's domain
        # cannot be one of its runs. A format-1 index has no domains, so every value counts for every column.
        self._in_domain = {column: np.isin(self._values, arrays[f"domain:{column}"])
                           if f"domain:{column}" in arrays else np.ones(self._values.size, dtype=np.bool_)
                           for column in self._runs}
        self._row_weights = _fmix(self._values ^ self._keys.row)
        self._run_weights = _fmix(self._values ^ self._keys.run)
        self._directories = {"ids": _directory(self._ids), "values": _directory(self._values),
                             "others": _directory(self._others), "rows": _directory(self._rows),
                             **{f"runs:{column}": _directory(runs) for column, runs in self._runs.items()}}
        # The same sets with their directories as the compiled kernels take them; None without numba.
        self._tables: dict[str, Table] | None = None
        if all(directory is not None for directory in self._directories.values()):
            sets = {"ids": self._ids, "values": self._values, "others": self._others, "rows": self._rows,
                    **{f"runs:{column}": runs for column, runs in self._runs.items()}}
            self._tables = {name: (sets[name], directory[0], np.uint64(directory[1]))
                            for name, directory in self._directories.items() if directory is not None}
        self._bitmaps: dict[str, tuple[npt.NDArray[np.uint8], int]] = {}
        self._row_filter: U64 | None = None  # the compiled row search's Bloom filter, made on first use
        # Compile (or load from numba's cache) the kernels now, so no scan pays for it.
        _token_hashes(b"warm -1.50 2e3 x-1 7-day", self._keys)
        if self._tables is not None:
            self.scan(b"warm -1.50 2e3 x-1 7-day")
            warm = np.zeros(40 if self._values.size else 0, dtype=np.int32)
            self._find_rows(warm, np.arange(warm.size, dtype=np.int64))
            self._find_runs(warm, np.arange(warm.size, dtype=np.int64))

    def _bitmap(self, name: str) -> tuple[npt.NDArray[np.uint8], int]:
        """The numpy path's Bloom filters, made on first use: the compiled path needs none."""
        if name not in self._bitmaps:
            members = {"tokens": [self._ids, self._values, self._others], "rows": [self._rows],
                       "runs": list(self._runs.values())}[name]
            self._bitmaps[name] = _bitmap(np.concatenate([np.zeros(0, np.uint64), *members]))
        return self._bitmaps[name]

    @property
    def outdated(self) -> bool:
        """Whether the index predates the current format (and so misses what it adds: partial rows from format 3);
        rebuild it from the version to scan for everything."""
        return bool(self.header.get("format") != INDEX_FORMAT)

    @property
    def size_bytes(self) -> int:
        arrays = [self._ids, self._values, self._others, self._rows, self._rare, self._rare_starts, self._rare_rows,
                  *self._runs.values()]
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
        domains: dict[str, U64] = {}
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
                domains[name] = np.unique(per_row[present])
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
        rare, rare_starts, rare_rows = _rare_values(table, [*quasi, *others], keys)

        header = {
            "format": INDEX_FORMAT, "key": secret.hex(), "privacy_unit": unit, "quasi_identifiers": quasi,
            "distinctive_columns": others, "row_widths": sorted({int(w) for w in np.unique(row_width[indexed])}),
            "run_widths": run_widths, "rows_indexed": int(indexed.sum()), "source_rows": table.num_rows,
            "rare_rows": RARE_ROWS,
        }
        arrays = {"ids": ids, "values": values, "distinctive": distinctive, "rows": rows, "rare": rare,
                  "rare_starts": rare_starts, "rare_rows": rare_rows,
                  **{f"runs:{name}": hashes for name, hashes in runs.items()},
                  **{f"domain:{name}": hashes for name, hashes in domains.items()}}
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
            if header.get("format") not in (1, 2, INDEX_FORMAT):
                raise ValueError(f"{path.name}: leak index format {header.get('format')!r}, expected {INDEX_FORMAT}")
            arrays = {name: np.asarray(stored[name], dtype=np.uint64) for name in stored.files if name != "header"}
        return cls(header, arrays)

    def scan(self, data: bytes) -> LeakReport:
        """Rows, ids and value runs of the indexed version found anywhere in `data`."""
        stream, offsets, ids, id_offsets, other_offsets, other_positions = self._tokens(data)
        findings: list[tuple[int, str, str]] = []  # (byte offset, kind, detail with {line})
        findings += [(int(at), "id", f"a value of privacy-unit column {self.header['privacy_unit']} "
                      "on line {line}") for at in id_offsets]
        rows, row_offsets = self._find_rows(stream, offsets, MAX_FINDINGS)
        columns = ", ".join(self.header["quasi_identifiers"])
        findings += [(int(at), "row", f"a row's values of columns {columns} on line {{line}}")
                     for at in row_offsets]
        run_offsets = self._find_runs(stream, offsets)
        for column, at in run_offsets[:MAX_FINDINGS]:
            width = self.header["run_widths"][column]
            findings.append((at, "values", f"a run of {width}+ values of column {column} in dataset order "
                                           "starting on line {line}"))
        partial, partial_offsets = self._find_partial_rows(data, stream, offsets, other_positions, other_offsets,
                                                           MAX_FINDINGS)
        findings += [(int(at), "partial_row", f"{PARTIAL_VALUES}+ rare values of one dataset row on line {{line}}")
                     for at in partial_offsets]
        distinctive_lines = self._distinctive_lines(data, other_offsets[self._others_distinctive[other_positions]])
        for line in distinctive_lines[:MAX_FINDINGS]:
            named = ", ".join(self.header["distinctive_columns"])
            findings.append((-line, "values", f"two or more distinctive values of columns {named} "
                                              "on line {line}"))
        report_findings = self._located(data, findings)
        return LeakReport(rows=rows, ids=ids, value_runs=len(run_offsets) + len(distinctive_lines),
                          findings=report_findings, partial_rows=partial)

    def _tokens(self, data: bytes) -> tuple[npt.NDArray[np.int32], I64, int, I64, I64, I64]:
        """The value stream (positions in the QI value set) with its byte offsets; the count of distinct ids found
        and the offsets of the first MAX_FINDINGS; the offsets and positions in `_others` of the other values found.
        In order of appearance."""
        if _compiled_classify is None or self._tables is None:
            return self._tokens_numpy(data)
        tables = self._tables
        keys = self._keys
        buffers = _TokenBuffers.sized(min(len(data), CHUNK_BYTES))
        capacity = buffers.starts.size
        scratch = [np.full(2 * MEMO_ENTRIES, _EMPTY, dtype=np.uint64),
                   *(np.empty(capacity, dtype=dtype) for dtype in (np.uint64, np.int64, np.int64))]
        token_cache = np.zeros(5 * TOKEN_CACHE_ENTRIES, dtype=np.uint64)
        candidate_entry = np.empty(capacity, dtype=np.int64)
        # Outputs grow by doubling, if ever: a value every 8 bytes is a dense dump already.
        stream = np.empty(len(data) // 8 + 1024, dtype=np.int32)
        offsets = np.empty(stream.size, dtype=np.int64)
        distinctive_offsets = np.empty(stream.size, dtype=np.int64)
        distinctive_positions = np.empty(stream.size, dtype=np.int64)
        id_seen = np.zeros((self._ids.size + 7) // 8, dtype=np.uint8)
        id_offsets = np.empty(MAX_FINDINGS, dtype=np.int64)
        counts = np.zeros(4, dtype=np.int64)  # see _classify_kernel
        fused = _compiled_scan is not None
        for offset, chunk in _chunks(data):
            raw = np.frombuffer(chunk, dtype=np.uint8)
            status = -1
            while fused:
                status = _compiled_scan(raw, _CLASSES, keys.token, keys.negative, keys.zero, offset, tables["values"],
                                        tables["ids"], tables["others"], stream, offsets, distinctive_offsets,
                                        distinctive_positions, id_seen, id_offsets, counts, *scratch, token_cache,
                                        buffers.flags, buffers.masks, candidate_entry)
                if status != -2:
                    break
                grown = 2 * stream.size + raw.size // 2 + 1
                stream, offsets, distinctive_offsets, distinctive_positions = (
                    np.concatenate([array, np.empty(grown - array.size, array.dtype)])
                    for array in (stream, offsets, distinctive_offsets, distinctive_positions))
            if status == 0:
                continue
            # A token in exponent notation (or no fused kernel): tokens first, then their classes.
            starts, hashes = _token_hashes(chunk, keys, buffers)
            if int(counts[:2].max()) + hashes.size > stream.size:
                grown = 2 * stream.size + hashes.size
                stream, offsets, distinctive_offsets, distinctive_positions = (
                    np.concatenate([array, np.empty(grown - array.size, array.dtype)])
                    for array in (stream, offsets, distinctive_offsets, distinctive_positions))
            _compiled_classify(starts, hashes, offset, tables["values"], tables["ids"], tables["others"], stream,
                               offsets, distinctive_offsets, distinctive_positions, id_seen, id_offsets, counts,
                               *scratch)
        streamed, distinguished, identified, distinct = counts.tolist()
        return (stream[:streamed], offsets[:streamed], distinct, id_offsets[:identified],
                distinctive_offsets[:distinguished], distinctive_positions[:distinguished])

    def _tokens_numpy(self, data: bytes) -> tuple[npt.NDArray[np.int32], I64, int, I64, I64, I64]:
        parts: dict[str, list[npt.NDArray[Any]]] = {name: [] for name in ("stream", "at", "ids", "id_at", "rare",
                                                                          "rare_positions")}
        for offset, chunk in _chunks(data):
            starts, hashes = _token_hashes(chunk, self._keys)
            maybe = np.flatnonzero(_maybe(self._bitmap("tokens"), hashes))
            if not maybe.size:
                continue
            hashes, starts = hashes[maybe], starts[maybe] + offset
            # The QI value set is small and cache-resident; only the rest is looked up among the ids.
            is_value = _member(self._values, hashes, self._directories["values"])
            rest = np.flatnonzero(~is_value)
            is_id = rest[_member(self._ids, hashes[rest], self._directories["ids"])]
            parts["ids"].append(hashes[is_id])
            parts["id_at"].append(starts[is_id])
            parts["stream"].append(np.searchsorted(self._values, hashes[is_value]).astype(np.int32))
            parts["at"].append(starts[is_value])
            other = rest[_member(self._others, hashes[rest], self._directories["others"])]
            parts["rare"].append(starts[other])
            parts["rare_positions"].append(np.searchsorted(self._others, hashes[other]).astype(np.int64))
        stream, at, ids, id_at, rare, rare_positions = (
            np.concatenate([np.zeros(0, dtype=dtype), *parts[name]]) for name, dtype in (
                ("stream", np.int32), ("at", np.int64), ("ids", np.uint64), ("id_at", np.int64), ("rare", np.int64),
                ("rare_positions", np.int64)))
        return stream, at, _distinct(ids), id_at[:MAX_FINDINGS], rare, rare_positions

    def _find_rows(self, stream: npt.NDArray[np.int32], offsets: I64,
                   limit: int | None = None) -> tuple[int, list[int]]:
        """Distinct indexed rows whose values appear as a window of the stream (at most one foreign value inside),
        and the sorted offsets of each one's first match (the first `limit` of them)."""
        if not self._rows.size or not stream.size:
            return 0, []
        if _compiled_rows is None or self._tables is None:
            return self._find_rows_numpy(stream, offsets, limit)
        widths = np.asarray(self.header["row_widths"], dtype=np.int64)
        seen = np.zeros((self._rows.size + 7) // 8, dtype=np.uint8)  # a bit a row: it stays in cache
        first = np.empty(self._rows.size, dtype=np.int64)
        if self._row_filter is None:
            self._row_filter = _row_filter(self._rows)
        distinct = _compiled_rows(stream, self._row_weights, widths, self._tables["rows"], self._row_filter, seen,
                                  first)
        return int(distinct), offsets[_smallest(first[:distinct], limit)].tolist()

    def _find_rows_numpy(self, stream: npt.NDArray[np.int32], offsets: I64,
                         limit: int | None = None) -> tuple[int, list[int]]:
        if not self._rows.size or not stream.size:
            return 0, []
        weights = self._row_weights[stream]
        prefix = np.zeros(stream.size + 1, dtype=np.uint64)
        np.cumsum(weights, out=prefix[1:])
        matched_sums: list[U64] = []
        matched_at: list[I64] = []
        for width in self.header["row_widths"]:
            if stream.size < width:
                continue
            sums = prefix[width:] - prefix[:-width]
            maybe = np.flatnonzero(_maybe(self._bitmap("rows"), sums))
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
                maybe = np.flatnonzero(_maybe(self._bitmap("rows"), trimmed))
                hit = maybe[_member(self._rows, trimmed[maybe], self._directories["rows"])]
                matched_sums.append(trimmed[hit])
                matched_at.append(positions[hit])
        sums = np.concatenate(matched_sums) if matched_sums else np.zeros(0, np.uint64)
        if not sums.size:
            return 0, []
        unique_sums, first = np.unique(sums, return_index=True)
        return int(unique_sums.size), offsets[_smallest(np.concatenate(matched_at)[first], limit)].tolist()

    def _find_partial_rows(self, data: bytes, stream: npt.NDArray[np.int32], offsets: I64, other_positions: I64,
                           other_offsets: I64, limit: int | None = None) -> tuple[int, list[int]]:
        """Distinct rows of which PARTIAL_VALUES or more rare values stand in one record (see
        _partial_rows_kernel), and the sorted offsets where the first `limit` such records start."""
        if not self._rare.size or not (stream.size or other_positions.size):
            return 0, []
        rows = int(self.header.get("source_rows", int(self._rare_rows.max(initial=0)) + 1))
        seen = np.zeros((rows + 7) // 8, dtype=np.uint8)
        first = np.empty(rows, dtype=np.int64)
        entries = 1 << 12
        scratch = (np.full(entries, -1, dtype=np.int64), np.zeros(entries, dtype=np.int64),
                   np.full(entries, -1, dtype=np.int64),
                   *(np.zeros(entries * PARTIAL_SLOTS, dtype=np.int64) for _ in range(4)))
        if not self._rare_values_in_stream:  # no QI value is rare (a large version): the stream holds no rare one
            stream, offsets = stream[:0], offsets[:0]
        kernel = _compiled_partial_rows if _compiled_partial_rows is not None else _partial_rows_kernel
        distinct = kernel(np.frombuffer(data, dtype=np.uint8), stream, offsets, self._value_rare, other_positions,
                          other_offsets, self._others_rare, self._rare_starts, self._rare_rows, seen, first, *scratch)
        return int(distinct), _smallest(first[:distinct], limit).tolist()

    def _find_runs(self, stream: npt.NDArray[np.int32], offsets: I64) -> list[tuple[str, int]]:
        """Runs of each column's values in dataset order, (column, offset of the run's start), by offset."""
        found: list[tuple[str, int]] = []
        if not stream.size:
            return found
        compiled = _compiled_runs is not None and self._tables is not None
        hashes = self._values[stream] if not compiled else np.zeros(0, np.uint64)
        # Columns by run width, as the index lists them within a width.
        ordered = sorted(self.header["run_widths"].items(), key=lambda item: item[1])
        together: dict[str, I64] = {}
        if compiled and _compiled_all_runs is not None and 0 < len(ordered) <= 8:
            assert self._tables is not None
            # Up to 8 columns in one pass (a lane each of _all_runs_kernel's word of streaks).
            lanes = np.zeros(self._values.size, dtype=np.uint64)
            for lane, (column, _) in enumerate(ordered):
                lanes[self._in_domain[column]] |= np.uint64(0xFF << (8 * lane))
            all_hits = np.empty((len(ordered), stream.size), dtype=np.int64)
            hit_counts = np.empty(len(ordered), dtype=np.int64)
            _compiled_all_runs(stream, lanes, self._run_weights, np.array([w for _, w in ordered], dtype=np.int64),
                               self._keys.run_base, self._keys.run_base_inverse,
                               np.array([_run_salt(w) for _, w in ordered], dtype=np.uint64),
                               tuple(self._tables[f"runs:{column}"] for column, _ in ordered), all_hits, hit_counts)
            together = {column: all_hits[lane, :hit_counts[lane]] for lane, (column, _) in enumerate(ordered)}
        for column, width in ordered:
            if column in together:
                hits = together[column]
            elif compiled:
                assert self._tables is not None
                hits = np.empty(stream.size, dtype=np.int64)
                hits = hits[:_compiled_runs(stream, self._in_domain[column], self._run_weights, width,
                                            self._keys.run_base, self._keys.run_base_inverse, _run_salt(width),
                                            self._tables[f"runs:{column}"], hits)]
            else:
                windows = _run_hashes(hashes, width, self._keys)
                # Windows of values all in the column's domain, sampled as the index was, that pass its filter.
                outside = np.concatenate([[0], np.cumsum(~self._in_domain[column][stream])])
                candidates = np.flatnonzero(_sampled(windows) & (outside[width:] == outside[:-width]))
                candidates = candidates[_maybe(self._bitmap("runs"), windows[candidates])]
                hits = candidates[_member(self._runs[column], windows[candidates],
                                          self._directories[f"runs:{column}"])]
            # Overlapping windows of one run count once: a new run starts past the last one's end.
            last_end = -1
            for position in hits.tolist():
                if position >= last_end:
                    found.append((column, int(offsets[position])))
                last_end = position + width
        return sorted(found, key=lambda item: item[1])

    @staticmethod
    def _distinctive_lines(data: bytes, offsets: I64) -> list[int]:
        if not offsets.size:
            return []
        lines = _line_numbers(data, offsets)
        numbers, counts = np.unique(lines, return_counts=True)
        return [int(n) for n in numbers[counts >= 2]]

    @staticmethod
    def _located(data: bytes, findings: list[tuple[int, str, str]]) -> list[LeakFinding]:
        """The first MAX_FINDINGS findings by line (then kind); a negative offset is a line already known.

        Lines only grow with offsets, so the MAX_FINDINGS smallest offsets all lie on or before the line of the
        largest of them: no finding past that line can be among the first, and lines are counted up to it only."""
        if not findings:
            return []
        offsets = np.array([at for at, _, _ in findings if at >= 0], dtype=np.int64)
        limit = 0
        if offsets.size:
            cutoff = int(_smallest(offsets, MAX_FINDINGS)[-1])
            line_end = data.find(b"\n", cutoff)
            limit = len(data) + 1 if line_end < 0 else line_end
        kept = [finding for finding in findings if finding[0] < limit]
        lines = _line_numbers(memoryview(data)[:limit], np.array([max(at, 0) for at, _, _ in kept], dtype=np.int64))
        located = [LeakFinding(kind=kind, line=-at if at < 0 else int(line), detail=detail.format(
                   line=-at if at < 0 else int(line)))
                   for (at, kind, detail), line in zip(kept, lines, strict=True)]
        located.sort(key=lambda finding: (finding.line, finding.kind))
        return located[:MAX_FINDINGS]


def _positions_in(sorted_hashes: U64, hashes: U64) -> I64:
    """Each hash's position in `sorted_hashes`, or -1 where it is not there."""
    positions = np.searchsorted(sorted_hashes, hashes).astype(np.int64)
    inside = positions < sorted_hashes.size
    found = np.zeros(hashes.size, dtype=np.bool_)
    found[inside] = sorted_hashes[positions[inside]] == hashes[inside]
    return np.where(found, positions, -1).astype(np.int64)


def _distinct(hashes: U64) -> int:
    """len(np.unique(hashes)), by a plain sort: faster than numpy's hash-based unique on millions."""
    if not hashes.size:
        return 0
    ordered = np.sort(hashes)
    return int(np.count_nonzero(ordered[1:] != ordered[:-1])) + 1


def _smallest(positions: I64, limit: int | None) -> I64:
    """The `limit` smallest positions (all without a limit), sorted."""
    if limit is not None and positions.size > limit:
        positions = np.partition(positions, limit - 1)[:limit]
    return np.sort(positions)


def _line_numbers(data: bytes | memoryview, byte_offsets: I64) -> I64:
    newlines = np.flatnonzero(np.frombuffer(data, dtype=np.uint8) == ord("\n"))
    return np.asarray(np.searchsorted(newlines, byte_offsets, side="right") + 1, dtype=np.int64)


def _rare_values(table: pa.Table, columns: list[str], keys: _Keys) -> tuple[U64, U64, U64]:
    """The rare values of `columns` (sorted hashes of those in at most RARE_ROWS cells, counted over all the
    columns, since an output does not say which column a value came from) and the rows each is in, as a CSR
    list: rows rare_rows[rare_starts[i]:rare_starts[i + 1]] hold rare[i]."""
    encoded: list[tuple[U64, Mask, I64, I64]] = []  # per column: distinct values' hashes, present, counts, per row
    for name in columns:
        column = pc.dictionary_encode(table.column(name).combine_chunks())
        hashes, present = _value_hashes(column.dictionary.to_pylist(), keys)
        valid = np.asarray(column.indices.is_valid(), dtype=np.bool_)
        indices = np.where(valid, column.indices.fill_null(0).to_numpy(zero_copy_only=False), -1).astype(np.int64)
        counts = np.bincount(indices[valid], minlength=hashes.size)
        encoded.append((hashes, present, counts, indices))
    every = np.concatenate([np.zeros(0, np.uint64), *(hashes[present] for hashes, present, _, _ in encoded)])
    weights = np.concatenate([np.zeros(0, np.int64), *(counts[present] for _, present, counts, _ in encoded)])
    distinct, inverse = np.unique(every, return_inverse=True)
    rare = distinct[np.bincount(inverse, weights=weights, minlength=distinct.size) <= RARE_ROWS]
    pair_hashes: list[U64] = [np.zeros(0, np.uint64)]
    pair_rows: list[I64] = [np.zeros(0, np.int64)]
    for hashes, present, _, indices in encoded:
        is_rare = np.append(present & np.isin(hashes, rare), False)  # index -1 (a null) reads the False
        where = np.flatnonzero(is_rare[indices])
        pair_hashes.append(hashes[indices[where]])
        pair_rows.append(where)
    hashes = np.concatenate(pair_hashes)
    rows = np.concatenate(pair_rows)
    order = np.lexsort((rows, hashes))
    hashes, rows = hashes[order], rows[order]
    keep = np.ones(hashes.size, dtype=np.bool_)  # a value in two columns of one row points at it once
    keep[1:] = (hashes[1:] != hashes[:-1]) | (rows[1:] != rows[:-1])
    hashes, rows = hashes[keep], rows[keep]
    starts = np.append(np.searchsorted(hashes, rare, side="left"), hashes.size)
    return rare, starts.astype(np.uint64), rows.astype(np.uint64)


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
    if report.partial_rows >= block_rows:
        reasons.append(f"{report.partial_rows} dataset row(s) partly found: {PARTIAL_VALUES}+ of a row's rare values "
                       f"in one record (policy blocks at {block_rows})")
    if report.value_runs >= block_rows:
        reasons.append(f"{report.value_runs} run(s) of dataset values found (policy blocks at {block_rows})")
    if report.ids >= block_ids:
        reasons.append(f"{report.ids} privacy-unit id(s) found (policy blocks at {block_ids})")
    if reasons:
        lines = sorted({finding.line for finding in report.findings})[:10]
        where = f"; first on lines {', '.join(map(str, lines))}" if lines else ""
        return "block", "; ".join(reasons) + where
    if report.rows or report.ids or report.value_runs or report.partial_rows:
        partial = f", {report.partial_rows} partial row(s)" if report.partial_rows else ""
        return "pass", (f"below policy thresholds: {report.rows} row(s), {report.ids} id(s), "
                        f"{report.value_runs} value run(s){partial}")
    return "pass", "no dataset rows, ids or runs of dataset values found"
