"""Writing result objects with thousands of sequence items at the speed of their bytes, not of pydicom's walk.

pydicom writes a dataset element by element, and each item of a sequence as a dataset of its own (checking its
encoding and correcting ambiguous VRs on the way): about 60 µs per element. A binary SEG of 2,000 findings has
5,000 frames, each with its own functional groups (about 20 elements), and 2,000 segment descriptions (about 25
each): 150,000 elements, 9.5 s to write on the project's VM. Most of these items repeat: every frame on one source
slice references the same image, every segment of one label has the same codes and algorithm.

:func:`encoded_sequences` pre-encodes each large top-level sequence into the bytes pydicom itself would write
(explicit VR little endian, defined lengths, items in tag order, group lengths left out), each distinct element
encoded once by pydicom's own element writer and reused, and hands pydicom these bytes as a raw element for
the write; the dataset is given back as it was afterwards (its ambiguous VRs resolved, as pydicom's writer
resolves them). A sequence it does not handle (an ambiguous VR, a value pydicom would have to decode) is left to
pydicom. The bytes are the same as pydicom's
(``tests/test_many_findings.py`` compares whole files).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import correct_ambiguous_vr, correct_ambiguous_vr_element, write_data_element
from pydicom.tag import Tag

__all__ = ["LARGE_SEQUENCE", "encoded_sequences"]

#: a top-level sequence with more items than this (all levels counted) is pre-encoded
LARGE_SEQUENCE = 200

_ITEM = b"\xfe\xff\x00\xe0"
_ITEM_UNDEFINED_END = b"\xfe\xff\x0d\xe0\x00\x00\x00\x00"
_SEQ_END = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
_UNDEFINED = 0xFFFFFFFF
_CHARSET = Tag(0x00080005)
#: values longer than this are written, not remembered
_CACHED_UP_TO = 256


class _NotHandled(Exception):
    """A sequence the encoder leaves to pydicom."""


class _Encoder:
    def __init__(self) -> None:
        self.cache: dict[tuple[Any, ...], bytes] = {}

    def element(self, elem: DataElement, encodings: Any) -> bytes:
        if elem.is_raw or elem.is_buffered or elem.VR is None or len(elem.VR) != 2:
            raise _NotHandled(f"element {elem.tag}")
        if elem.VR == "SQ":
            body = b"".join(self.item(item, encodings) for item in elem.value)
            head = struct.pack("<HH", elem.tag.group, elem.tag.element) + b"SQ\x00\x00"
            if elem.is_undefined_length:
                return head + struct.pack("<I", _UNDEFINED) + body + _SEQ_END
            return head + struct.pack("<I", len(body)) + body
        value = elem.value
        text = repr(value)
        if len(text) > _CACHED_UP_TO:
            return self._write(elem, encodings)
        key = (elem.tag, elem.VR, text, str(encodings))
        hit = self.cache.get(key)
        if hit is None:
            hit = self.cache[key] = self._write(elem, encodings)
        return hit

    @staticmethod
    def _write(elem: DataElement, encodings: Any) -> bytes:
        buf = DicomBytesIO()
        buf.is_little_endian, buf.is_implicit_VR = True, False
        write_data_element(buf, elem, encodings)
        return buf.getvalue()

    def item(self, ds: Dataset, parent: Any) -> bytes:
        raw = ds._dict
        encodings = parent
        charset = raw.get(_CHARSET)
        if charset is not None:
            if not isinstance(charset, DataElement):
                raise _NotHandled("a raw Specific Character Set")
            encodings = charset.value or parent
        parts = []
        for tag in sorted(raw):
            if tag & 0xFFFF == 0 and tag >> 16 > 6:  # group length: pydicom does not write it either
                continue
            elem = raw[tag]
            if not isinstance(elem, DataElement):
                raise _NotHandled(f"raw element {tag:08X}")
            parts.append(self.element(elem, encodings))
        body = b"".join(parts)
        if getattr(ds, "is_undefined_length_sequence_item", False):
            return _ITEM + struct.pack("<I", _UNDEFINED) + body + _ITEM_UNDEFINED_END
        return _ITEM + struct.pack("<I", len(body)) + body


def _items(elem: DataElement) -> int:
    """Items of a sequence, all levels counted, stopping past :data:`LARGE_SEQUENCE`."""
    count, stack = 0, [elem]
    while stack and count <= LARGE_SEQUENCE:
        e = stack.pop()
        for item in e.value:
            count += 1
            stack.extend(v for v in item._dict.values() if isinstance(v, DataElement) and v.VR == "SQ")
    return count


@contextmanager
def encoded_sequences(ds: Dataset) -> Iterator[int]:
    """Within the block, ``ds``'s large top-level sequences are raw elements holding their encoded bytes, and the
    dataset is marked as explicit VR little endian (so that pydicom writes the raw bytes as they are); yields how
    many sequences were encoded. Only for writing with ``enforce_file_format=True`` in explicit VR little endian
    (the node's result objects)."""
    raw = ds._dict
    ts = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", ""))
    if ts not in ("1.2.840.10008.1.2.1", ""):
        yield 0
        return
    charset = raw.get(_CHARSET)
    encodings: Any = charset.value if isinstance(charset, DataElement) and charset.value else "iso8859"
    encoder = _Encoder()
    swapped: dict[Any, Any] = {}
    for tag, elem in list(raw.items()):
        if not (isinstance(elem, DataElement) and elem.VR == "SQ") or _items(elem) <= LARGE_SEQUENCE:
            continue
        try:
            body = b"".join(encoder.item(item, encodings) for item in elem.value)
        except _NotHandled:
            continue
        length = _UNDEFINED if elem.is_undefined_length else len(body)  # pydicom writes the delimiter itself
        swapped[tag] = elem
        raw[tag] = RawDataElement(elem.tag, "SQ", length, body, 0, False, True)
    saved = (ds._read_implicit, ds._read_little, ds._read_charset)
    if swapped:  # the original encoding equal to the file's: pydicom writes the raw elements as they are
        # and no longer resolves ambiguous VRs (a SEG's Pixel Data, "OB or OW"): resolved here as pydicom would,
        # in the elements left to it (the encoded sequences hold none: the encoder leaves those to pydicom)
        for tag, elem in list(raw.items()):
            if tag in swapped or not isinstance(elem, DataElement):
                continue
            if elem.VR == "SQ":
                for item in elem.value:
                    correct_ambiguous_vr(item, True, [item, ds])  # pydicom's ancestors: the item first
            elif elem.VR is not None and len(elem.VR) != 2:
                correct_ambiguous_vr_element(elem, ds, True, [ds])
        ds.set_original_encoding(False, True, ds._character_set)
    try:
        yield len(swapped)
    finally:
        raw.update(swapped)
        ds._read_implicit, ds._read_little, ds._read_charset = saved
