"""What a collection's PNG, JPEG and NIfTI files say about a patient outside their pixels.

A DICOM header is checked against the PS3.15 profile (`sandbox.catalog.dicom_deid`). The other formats a
steward may allow carry text too, and a file exported from a PACS or a fundus camera often keeps it:

- **PNG and JPEG** (read by Pillow): every PNG text chunk (tEXt, zTXt, iTXt, wherever it lies in the file)
  but `Software`, a JPEG comment, XMP and IPTC blocks are `free_text`; a JPEG application segment of a
  kind not read here (a vendor's own) is `extensions`; EXIF fields that name a person are
  `names` (Artist, XPAuthor, CameraOwnerName), serial numbers and unique ids are `ids`, the EXIF dates
  follow the card's `dates` rule, a GPS block is `location`, and a maker note is `private_tags`.
- **NIfTI-1 and NIfTI-2** (read by nibabel): the header's `descrip`, `aux_file` and `db_name` text is
  `free_text` (dcm2niix writes acquisition times there; other converters write names). A DICOM extension
  (code 2) is a whole DICOM header, checked against the profile like any DICOM file; every other extension
  is `extensions`: the platform cannot tell what it holds.

A finding's value is only ever shown masked (`dicom_deid.mask`). The steward fixes the files or overrides,
as the policy's `registration.dicom` rule says.
"""

from __future__ import annotations

import gzip
import io
from typing import Any, BinaryIO

from pydicom.dataset import Dataset, FileDataset, FileMetaDataset

from sandbox.catalog.dicom_deid import Finding, HeaderRules, PixelFilters, check_header, date_allowed

# PNG text chunk keywords that say nothing of a patient.
BENIGN_PNG_TEXT = frozenset({"Software"})
# EXIF tags (IFD0 and the Exif IFD) by what they give away: (tag, name, profile class).
EXIF_TAGS: tuple[tuple[int, str, str], ...] = (
    (0x013B, "Artist", "names"), (0x9C9D, "XPAuthor", "names"), (0xA430, "CameraOwnerName", "names"),
    (0xA431, "BodySerialNumber", "ids"), (0xA435, "LensSerialNumber", "ids"), (0xA420, "ImageUniqueID", "ids"),
    (0x010E, "ImageDescription", "free_text"), (0x9286, "UserComment", "free_text"),
    (0x9C9C, "XPComment", "free_text"), (0x9C9B, "XPTitle", "free_text"), (0x9C9F, "XPSubject", "free_text"),
    (0x9C9E, "XPKeywords", "free_text"), (0x010D, "DocumentName", "free_text"),
    (0x013C, "HostComputer", "free_text"), (0x927C, "MakerNote", "private_tags"),
)
EXIF_DATES: tuple[tuple[int, str], ...] = ((0x0132, "DateTime"), (0x9003, "DateTimeOriginal"),
                                           (0x9004, "DateTimeDigitized"))
_EXIF_IFD, _GPS_IFD = 0x8769, 0x8825
# JPEG application segments the checks above read, or that hold no text: JFIF, EXIF, XMP, ICC, MPF, IPTC,
# Adobe. Any other (a vendor's own segment) is reported as an extension the platform cannot read.
KNOWN_JPEG_SEGMENTS = (("APP0", b"JFIF\0"), ("APP0", b"JFXX\0"), ("APP1", b"Exif\0"),
                       ("APP1", b"http://ns.adobe.com/xap/1.0/\0"), ("APP2", b"ICC_PROFILE\0"), ("APP2", b"MPF\0"),
                       ("APP13", b"Photoshop 3.0\0"), ("APP14", b"Adobe"))
# Text blocks Pillow keeps in `info`, by the name the report gives them.
_INFO_TEXT = {"comment": "JPEG comment", "xmp": "XMP", "photoshop": "IPTC (Photoshop)"}
NIFTI_TEXT_FIELDS = ("descrip", "aux_file", "db_name")
NIFTI_DICOM_EXTENSION = 2
NIFTI_HEADER_SIZES = {348: 1, 540: 2}  # sizeof_hdr, either byte order, to the NIfTI version
MAX_NIFTI_EXTENSION_BYTES = 16 * 1024 * 1024


def picture_findings(picture: Any, rules: HeaderRules) -> list[Finding]:
    """The identifying text a PNG or JPEG opened by Pillow carries: text chunks, comments, EXIF, XMP, IPTC.

    Reading a PNG's text chunks reads the whole file: a chunk may follow the pixel data.
    """
    findings: list[Finding] = []
    if picture.format == "PNG":
        for keyword, value in dict(picture.text).items():
            if keyword not in BENIGN_PNG_TEXT and _clean(value):
                findings.append(Finding("free_text", "(PNG text)", str(keyword)[:80], _clean(value)))
    for marker, segment in getattr(picture, "applist", []):
        if marker.startswith("APP") and not any(marker == known and segment.startswith(prefix)
                                                for known, prefix in KNOWN_JPEG_SEGMENTS):
            findings.append(Finding("extensions", f"(JPEG {marker})", f"{marker} segment",
                                    f"{len(segment)} bytes"))
    for key, label in _INFO_TEXT.items():
        value = picture.info.get(key)
        if value and _clean(value):
            findings.append(Finding("free_text", f"({label})", label, _clean(value)))
    exif = picture.getexif()
    fields: dict[int, Any] = {**dict(exif), **dict(exif.get_ifd(_EXIF_IFD))}
    for tag, name, profile_class in EXIF_TAGS:
        value = _exif_text(tag, fields.get(tag))
        if value:
            findings.append(Finding(profile_class, f"(EXIF {tag:04X})", name, value))
    for tag, name in EXIF_DATES:
        value = _clean(fields.get(tag))
        # EXIF writes "YYYY:MM:DD HH:MM:SS"; the card's rule reads it as a DICOM date-time would be.
        if value and not date_allowed("DT", value.replace(":", "").replace(" ", ""), rules.dates):
            findings.append(Finding("dates", f"(EXIF {tag:04X})", name, value))
    if exif.get_ifd(_GPS_IFD):
        findings.append(Finding("location", f"(EXIF {_GPS_IFD:04X})", "GPSInfo", "a GPS position"))
    return findings


def nifti_version(start: bytes) -> int | None:
    """1 or 2 when `start` (a file's first four bytes, unzipped) is a NIfTI-1 or NIfTI-2 sizeof_hdr in either
    byte order; None otherwise."""
    return NIFTI_HEADER_SIZES.get(int.from_bytes(start[:4], "little")) or NIFTI_HEADER_SIZES.get(
        int.from_bytes(start[:4], "big"))


def read_nifti_header(handle: BinaryIO, *, compressed: bool) -> Any:
    """The NIfTI-1 or NIfTI-2 header of a single-file image (`.nii`, `.nii.gz`), extensions included,
    read by nibabel without the voxels. Raises ValueError for a file that is neither."""
    import nibabel

    source: Any = gzip.GzipFile(fileobj=handle, mode="rb") if compressed else handle
    start = source.read(4)
    version = nifti_version(start)
    if version is None:
        raise ValueError("no NIfTI-1 or NIfTI-2 header (sizeof_hdr is neither 348 nor 540)")
    rest = source.read({1: 344, 2: 536}[version])
    header_class: Any = nibabel.Nifti1Header if version == 1 else nibabel.Nifti2Header
    first = header_class(start + rest, check=False)
    if bytes(first["magic"]).rstrip(b"\x00") not in (b"n+1", b"n+2"):
        raise ValueError("not a single-file NIfTI image (a .hdr and .img pair is refused: convert it to .nii)")
    # The extensions lie between the header and the voxels; nibabel reads them from there.
    between = int(first["vox_offset"]) - len(start) - len(rest)
    if between > MAX_NIFTI_EXTENSION_BYTES:
        raise ValueError(f"its extensions take {between} bytes, more than {MAX_NIFTI_EXTENSION_BYTES}")
    blob = start + rest + (source.read(between) if between > 0 else b"")
    header = header_class.from_fileobj(io.BytesIO(blob), check=True)
    return header


def nifti_findings(header: Any, rules: HeaderRules, *,
                   pixel_filters: PixelFilters | None = None) -> tuple[list[Finding], Dataset | None]:
    """The identifying text of a NIfTI header, and the DICOM header it embeds (its first DICOM extension),
    if any: that one is checked against the PS3.15 profile like a DICOM file."""
    findings: list[Finding] = []
    for name in NIFTI_TEXT_FIELDS:
        if name in (header.structarr.dtype.names or ()):
            value = _clean(bytes(header[name]))
            if value:
                findings.append(Finding("free_text", "(NIfTI header)", name, value))
    embedded: Dataset | None = None
    for extension in header.extensions:
        code = int(extension.get_code())
        content = extension.get_content()
        if code == NIFTI_DICOM_EXTENSION and isinstance(content, Dataset):
            # deid's pixel filters take a file's dataset; the extension is one without a file of its own.
            as_file = FileDataset("nifti-extension", content, preamble=b"\0" * 128, file_meta=FileMetaDataset())
            findings.extend(Finding(f.profile_class, f"DICOM extension {f.tag}", f.keyword, f.value)
                            for f in check_header(as_file, rules, pixel_filters=pixel_filters))
            embedded = embedded or content
        else:
            label = _extension_label(code)
            findings.append(Finding("extensions", f"(NIfTI extension {code})", label,
                                    _clean(content if isinstance(content, bytes | str) else repr(content))))
    return findings, embedded


def _extension_label(code: int) -> str:
    from nibabel.nifti1 import extension_codes

    try:
        return str(extension_codes.label[code])
    except KeyError:
        return f"unknown extension {code}"


def _clean(value: Any) -> str:
    """A field's text with its padding and spacing collapsed; bytes decoded leniently."""
    if value is None:
        return ""
    if isinstance(value, bytes):
        value = value.replace(b"\x00", b"").decode("utf-8", errors="replace")
    elif isinstance(value, tuple):  # Pillow gives EXIF BYTE fields as tuples of ints
        value = "".join(chr(item) for item in value if isinstance(item, int) and 0 < item < 0x110000)
    return " ".join(str(value).split())


def _exif_text(tag: int, value: Any) -> str:
    """An EXIF field's text: XP* fields are UTF-16, UserComment starts with an 8-byte character code, and a
    maker note is a vendor's binary block (reported by its size)."""
    if isinstance(value, tuple) and all(isinstance(item, int) for item in value):
        value = bytes(item & 0xFF for item in value)
    if not isinstance(value, bytes):
        return _clean(value)
    if tag == 0x927C:
        return f"{len(value)} bytes" if value.strip(b"\x00") else ""
    if tag in (0x9C9B, 0x9C9C, 0x9C9D, 0x9C9E, 0x9C9F):
        return _clean(value.decode("utf-16-le", errors="replace"))
    if tag == 0x9286:
        code, text = value[:8], value[8:]
        return _clean(text.decode("utf-16", errors="replace") if code.startswith(b"UNICODE") else text)
    return _clean(value)
