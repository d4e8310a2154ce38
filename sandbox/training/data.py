"""Rows into numbers for the platform's trainer, and free-form training rows apart from held-out rows.

Both run in the worker, beside the data. Every unit keeps at most `max_rows_per_unit` rows, chosen in
an order keyed by the job (not by the rows' content or position), as DP queries bound a unit's rows.
The split is by privacy unit: all of a patient's rows fall on the same side.

On a file collection a row is one file of the manifest: its pixels are decoded here (DICOM with pydicom, PNG and
JPEG with Pillow), scaled to [0, 1], and resized to the plan's (channels, height, width). A job may read several
datasets (one per hospital): their rows are concatenated, and a unit of one dataset is never merged with a unit
of another, even under the same id.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import math
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from sandbox.errors import Invalid
from sandbox.training.spec import Encoded, TrainingPlan

# The decoded images of one run are held in the worker's memory and sent to the container at once.
MAX_DECODED_BYTES = 2 * 1024**3
# A file whose pixels would take more than this many values is refused before decoding (a decompression bomb).
MAX_SOURCE_VALUES = 64 * 1024 * 1024
MAX_FILE_BYTES = 1024**3
# A NIfTI header and its extensions, on top of the voxels, when a .nii.gz is unzipped.
MAX_NIFTI_OVERHEAD = 32 * 1024 * 1024


@dataclass(frozen=True)
class TrainingArrays:
    X: np.ndarray[Any, Any]
    y: np.ndarray[Any, Any]
    unit: np.ndarray[Any, Any]
    n_units: int

    def to_npz(self) -> bytes:
        buffer = io.BytesIO()
        np.savez(buffer, X=self.X, y=self.y, unit=self.unit)
        return buffer.getvalue()


def _keyed_order(values: pa.Array, key: str) -> np.ndarray[Any, Any]:
    """A per-`key` pseudo-random rank of each value: the same value ranks the same within one key."""
    digests = [hashlib.blake2b(str(v).encode(), key=key.encode()[:64], digest_size=8).digest()
               for v in values.to_pylist()]
    return np.frombuffer(b"".join(digests), dtype=">u8").astype(np.uint64)


def unit_codes(table: pa.Table, unit: str) -> tuple[np.ndarray[Any, Any], int]:
    """Each row's unit as 0..n-1 (first seen first), and n."""
    encoded = pc.dictionary_encode(table.column(unit).combine_chunks())
    return np.asarray(encoded.indices.to_numpy(zero_copy_only=False), dtype=np.int64), len(encoded.dictionary)


def bounded_rows(table: pa.Table, unit: str, max_rows_per_unit: int, key: str) -> pa.Table:
    """At most `max_rows_per_unit` rows of each unit, the first ones in an order keyed by `key`."""
    codes, _ = unit_codes(table, unit)
    rank = _keyed_order(pa.array(np.arange(table.num_rows)), key)
    order = np.lexsort((rank, codes))
    sorted_codes = codes[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_codes)) + 1]
    position = np.arange(len(order)) - np.repeat(starts, np.diff(np.r_[starts, len(order)]))
    keep = np.sort(order[position < max_rows_per_unit])
    return table.take(pa.array(keep))


def _encode(column: pa.ChunkedArray, encoded: Encoded) -> np.ndarray[Any, Any]:
    if encoded.kind == "number":
        assert encoded.bounds is not None
        low, high = encoded.bounds
        values = np.asarray(pc.fill_null(pc.cast(column, pa.float64()), low).to_numpy(), dtype=np.float64)
        return np.clip((values - low) / (high - low), 0.0, 1.0)[:, None]
    values = column.to_pylist()
    index = {category: number for number, category in enumerate(encoded.categories)}
    onehot = np.zeros((len(values), len(encoded.categories)), dtype=np.float64)
    for row, value in enumerate(values):
        number = index.get(value)
        if number is not None:
            onehot[row, number] = 1.0  # a value outside the card's categories encodes as all zeros
    return onehot


def training_arrays(parquet: Path, plan: TrainingPlan, *, max_rows_per_unit: int, key: str) -> TrainingArrays:
    """The version's rows as the trainer's X, y and unit, each unit bounded to `max_rows_per_unit` rows.

    Rows whose label is missing or outside the card's categories are dropped (they carry no target).
    """
    columns = sorted({plan.unit, plan.label.column, *(f.column for f in plan.features)})
    table = bounded_rows(pq.read_table(parquet, columns=columns), plan.unit, max_rows_per_unit, key)
    label = table.column(plan.label.column)
    if plan.task == "classification":
        index = {category: number for number, category in enumerate(plan.label.categories)}
        y_list = [index.get(value, -1) for value in label.to_pylist()]
        y: np.ndarray[Any, Any] = np.asarray(y_list, dtype=np.int64)
        keep = y >= 0
    else:
        scaled = _encode(label, plan.label)[:, 0]
        keep = ~np.asarray(pc.is_null(label).to_numpy(zero_copy_only=False), dtype=bool)
        y = scaled.astype(np.float32)
    table, y = table.filter(pa.array(keep)), y[keep]
    X = np.hstack([_encode(table.column(f.column), f) for f in plan.features]).astype(np.float32)
    codes, n_units = unit_codes(table, plan.unit)
    return TrainingArrays(X=X, y=y, unit=codes, n_units=n_units)


def split_by_unit(parquet: Path, unit: str, *, holdout_fraction: float, key: str,
                  train_to: Path, holdout_to: Path) -> tuple[int, int]:
    """Write the version's training rows and held-out rows, split by unit; the rows on each side."""
    table = pq.read_table(parquet)
    codes, _ = unit_codes(table, unit)
    units = pc.dictionary_encode(table.column(unit).combine_chunks()).dictionary
    scale = float(np.iinfo(np.uint64).max)
    held_units = (_keyed_order(units, key).astype(np.float64) / scale) < holdout_fraction
    held = held_units[codes]
    for rows, target in ((~held, train_to), (held, holdout_to)):
        target.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table.filter(pa.array(rows)), target)
    return int((~held).sum()), int(held.sum())


# Several datasets, and file collections ---------------------------------------------------------------

@dataclass(frozen=True)
class RowSource:
    """One dataset version a dp_training run reads: its table (a collection's manifest) and, for a collection,
    the folder its files are read from in place."""

    parquet: Path
    files: Path | None = None


def concatenated(parts: Sequence[TrainingArrays]) -> TrainingArrays:
    """The rows of every part, each part's units numbered after the previous parts' (never merged)."""
    if len(parts) == 1:
        return parts[0]
    offsets = np.cumsum([0, *(part.n_units for part in parts)])
    return TrainingArrays(X=np.concatenate([part.X for part in parts]), y=np.concatenate([part.y for part in parts]),
                          unit=np.concatenate([part.unit + offsets[index] for index, part in enumerate(parts)]),
                          n_units=int(offsets[-1]))


def run_arrays(sources: Sequence[RowSource], plan: TrainingPlan, *, max_rows_per_unit: int, key: str,
               max_decoded_bytes: int = MAX_DECODED_BYTES) -> TrainingArrays:
    """The trainer's X, y and unit over every dataset of the run, units kept apart per dataset.

    The plan was fixed from the first dataset's card; every other dataset must hold the same columns."""
    needed = {plan.unit, plan.label.column, *(f.column for f in plan.features)}
    if plan.image is not None:
        needed |= {"path", "sha256", "format"}
    for source in sources:
        missing = needed - set(pq.read_schema(source.parquet).names)
        if missing:
            raise Invalid(f"a dataset of the job lacks the column(s) {', '.join(sorted(missing))} the training "
                          "plan reads; every dataset of a training job must share the first one's columns")
    if plan.image is None:
        return concatenated([training_arrays(source.parquet, plan, max_rows_per_unit=max_rows_per_unit, key=key)
                             for source in sources])
    chosen = []
    for source in sources:
        if source.files is None:
            raise Invalid(f"{source.parquet.name} is not a file collection, but the plan trains on images")
        chosen.append(_image_rows(source.parquet, plan, max_rows_per_unit=max_rows_per_unit, key=key))
    channels, height, width = plan.image
    total = sum(table.num_rows for table, _ in chosen) * channels * height * width * 4
    if total > max_decoded_bytes:
        raise Invalid(f"the collection's images decode to {total / 1024**3:.2f} GiB at {channels}x{height}x{width}, "
                      f"above the {max_decoded_bytes / 1024**3:.2f} GiB the platform trainer holds in memory; "
                      "ask the steward for a smaller collection.image size")
    return concatenated([_decoded(table, y, source.files, plan.image, plan.unit)
                         for (table, y), source in zip(chosen, sources, strict=True) if source.files is not None])


def _image_rows(manifest: Path, plan: TrainingPlan, *, max_rows_per_unit: int,
                key: str) -> tuple[pa.Table, np.ndarray[Any, Any]]:
    """The manifest rows a run trains on (bounded per unit, labelled), and their class indices."""
    columns = sorted({plan.unit, plan.label.column, "path", "sha256", "format"})
    table = bounded_rows(pq.read_table(manifest, columns=columns), plan.unit, max_rows_per_unit, key)
    index = {category: number for number, category in enumerate(plan.label.categories)}
    y = np.asarray([index.get(value, -1) for value in table.column(plan.label.column).to_pylist()], dtype=np.int64)
    keep = y >= 0
    return table.filter(pa.array(keep)), y[keep]


def _decoded(table: pa.Table, y: np.ndarray[Any, Any], root: Path, shape: tuple[int, int, int],
             unit: str) -> TrainingArrays:
    X = np.empty((table.num_rows, *shape), dtype=np.float32)
    for row, (path, sha256, file_format) in enumerate(zip(table.column("path").to_pylist(),
                                                          table.column("sha256").to_pylist(),
                                                          table.column("format").to_pylist(), strict=True)):
        X[row] = decode_image(read_pinned(root, str(path), str(sha256)), str(file_format), shape)
    codes, n_units = unit_codes(table, unit)
    return TrainingArrays(X=X, y=y, unit=codes, n_units=n_units)


def read_pinned(root: Path, relative: str, sha256: str) -> bytes:
    """The bytes of `root/relative`, a regular file inside `root` whose content is the one the manifest pinned.

    The folder is the hospital's, read in place: a file changed, replaced by a link or moved since the version
    was registered is refused rather than trained on.
    """
    parts = PurePosixPath(relative).parts
    if not parts or PurePosixPath(relative).is_absolute() or any(part in ("", ".", "..") for part in parts):
        raise Invalid(f"the manifest names {relative!r}, which is not a path inside the collection")
    target = root.joinpath(*parts)
    if not target.resolve().is_relative_to(root.resolve()):
        raise Invalid(f"{relative} resolves outside the collection's folder")
    try:
        descriptor = os.open(target, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise Invalid(f"{relative} cannot be read in the collection's folder ({exc.strerror})") from exc
    with os.fdopen(descriptor, "rb") as handle:
        status = os.fstat(handle.fileno())
        if not stat.S_ISREG(status.st_mode) or status.st_size > MAX_FILE_BYTES:
            raise Invalid(f"{relative} is not a regular file of at most {MAX_FILE_BYTES} bytes")
        content = handle.read(MAX_FILE_BYTES + 1)
    if hashlib.sha256(content).hexdigest() != sha256:
        raise Invalid(f"{relative} changed since the version was registered (its sha256 differs from the "
                      "manifest's); the steward registers a new version")
    return content


def decode_image(content: bytes, file_format: str, shape: tuple[int, int, int]) -> np.ndarray[Any, Any]:
    """One file's pixels as float32 (channels, height, width) in [0, 1]."""
    if file_format == "dicom":
        pixels = _dicom_pixels(content)
    elif file_format in ("png", "jpeg"):
        pixels = _picture_pixels(content)
    elif file_format == "nifti":
        pixels = _nifti_pixels(content)
    else:
        raise Invalid(f"the platform trainer decodes DICOM, PNG, JPEG and NIfTI files, not {file_format!r}")
    return _resized(_with_channels(pixels, shape[0]), shape[1], shape[2])


def _dicom_pixels(content: bytes) -> np.ndarray[Any, Any]:
    """(height, width) or (height, width, 3) in [0, 1]: scaled by the stored bit depth; the middle frame of several."""
    import pydicom  # imported here: only workers that train on collections need it

    try:
        dataset = pydicom.dcmread(io.BytesIO(content))
        frames, samples = int(dataset.get("NumberOfFrames", 1) or 1), int(dataset.get("SamplesPerPixel", 1) or 1)
        if int(dataset.Rows) * int(dataset.Columns) * frames * samples > MAX_SOURCE_VALUES:
            raise Invalid(f"a DICOM file's pixels exceed {MAX_SOURCE_VALUES} values")
        pixels = np.asarray(dataset.pixel_array)
    except Invalid:
        raise
    except Exception as exc:  # pydicom raises many kinds on a malformed file
        raise Invalid(f"a DICOM file's pixels cannot be decoded ({type(exc).__name__})") from exc
    if frames > 1:
        pixels = pixels[frames // 2]
    bits = int(dataset.get("BitsStored", pixels.dtype.itemsize * 8) or 8)
    if np.issubdtype(pixels.dtype, np.integer) and 1 <= bits <= 32:
        low = -(2.0 ** (bits - 1)) if int(dataset.get("PixelRepresentation", 0) or 0) == 1 else 0.0
        scaled = (pixels.astype(np.float64) - low) / (2.0**bits - 1)
    else:
        scaled = _min_max(pixels)
    if str(dataset.get("PhotometricInterpretation", "")) == "MONOCHROME1":
        scaled = 1.0 - scaled  # 0 is white in MONOCHROME1
    return np.clip(scaled, 0.0, 1.0)


def _nifti_pixels(content: bytes) -> np.ndarray[Any, Any]:
    """(height, width) in [0, 1], min-max scaled after the header's slope and intercept: a 2-D image, or the
    middle slice along the third axis of a volume (the first volume of a series)."""
    import nibabel  # imported here: only workers that train on NIfTI collections need it

    from sandbox.catalog.file_headers import nifti_version

    try:
        if content[:2] == b"\x1f\x8b":
            with gzip.GzipFile(fileobj=io.BytesIO(content)) as unzipped:
                content = unzipped.read(MAX_SOURCE_VALUES * 8 + MAX_NIFTI_OVERHEAD + 1)
            if len(content) > MAX_SOURCE_VALUES * 8 + MAX_NIFTI_OVERHEAD:
                raise Invalid(f"a NIfTI file's voxels exceed {MAX_SOURCE_VALUES} values")
        image: Any = (nibabel.Nifti1Image if nifti_version(content) == 1 else nibabel.Nifti2Image).from_bytes(content)
        shape = tuple(int(size) for size in image.header.get_data_shape())
        if len(shape) < 2 or math.prod(shape) > MAX_SOURCE_VALUES:
            raise Invalid(f"a NIfTI file must hold a 2-D image or a volume of at most {MAX_SOURCE_VALUES} values")
        index = tuple([slice(None), slice(None)] + ([shape[2] // 2] if len(shape) > 2 else [])
                      + [0] * max(0, len(shape) - 3))
        pixels = np.asarray(image.dataobj[index], dtype=np.float64)
    except Invalid:
        raise
    except Exception as exc:  # nibabel and gzip raise many kinds on a malformed file
        raise Invalid(f"a NIfTI file's voxels cannot be decoded ({type(exc).__name__})") from exc
    # NIfTI's first axis runs left to right (columns) and its second front to back (rows).
    return _min_max(pixels.T)


def _picture_pixels(content: bytes) -> np.ndarray[Any, Any]:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(content)) as picture:
            if picture.width * picture.height * len(picture.getbands()) > MAX_SOURCE_VALUES:
                raise Invalid(f"an image's pixels exceed {MAX_SOURCE_VALUES} values")
            pixels = np.asarray(picture if picture.mode in ("L", "I", "I;16", "F", "RGB") else picture.convert("RGB"))
    except Invalid:
        raise
    except (OSError, ValueError, UnidentifiedImageError, Image.DecompressionBombError) as exc:
        raise Invalid(f"an image file cannot be decoded ({type(exc).__name__})") from exc
    if pixels.dtype == np.uint8:
        return pixels.astype(np.float64) / 255.0
    if pixels.dtype == np.uint16 or (np.issubdtype(pixels.dtype, np.integer) and pixels.max(initial=0) > 255):
        return np.clip(pixels.astype(np.float64) / 65535.0, 0.0, 1.0)
    return _min_max(pixels)


def _min_max(pixels: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    values = np.nan_to_num(pixels.astype(np.float64))
    low, high = float(values.min(initial=0.0)), float(values.max(initial=0.0))
    return (values - low) / (high - low) if high > low else np.zeros_like(values)


LUMINANCE = np.array([0.299, 0.587, 0.114])


def _with_channels(pixels: np.ndarray[Any, Any], channels: int) -> np.ndarray[Any, Any]:
    """(channels, height, width) from a grey (h, w) or colour (h, w, 3 or 4) image."""
    if pixels.ndim == 3 and pixels.shape[-1] in (3, 4):
        colour = pixels[..., :3]
        return np.moveaxis(colour, -1, 0) if channels == 3 else (colour @ LUMINANCE)[None]
    if pixels.ndim != 2:
        raise Invalid(f"an image has pixels of shape {pixels.shape}, neither grey nor colour")
    return np.repeat(pixels[None], channels, axis=0)


def _resized(planes: np.ndarray[Any, Any], height: int, width: int) -> np.ndarray[Any, Any]:
    from PIL import Image

    if planes.shape[1:] == (height, width):
        return planes.astype(np.float32)
    return np.stack([np.asarray(Image.fromarray(plane.astype(np.float32), mode="F")
                                .resize((width, height), Image.Resampling.BILINEAR)) for plane in planes]
                    ).clip(0.0, 1.0).astype(np.float32)
