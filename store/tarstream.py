"""A reader of tar streams (ustar, pax, GNU long names) that yields one entry at a time.

The reader parses headers itself instead of using tarfile, so names, link names and pax
values stay bytes: xattr values such as security.capability are binary. File data is handed
out as memoryviews of the decompressed chunks, so the extractor copies each byte once.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation

from lstore.errors import IntegrityError, UnsupportedError

BLOCK_SIZE = 512
_ZERO_BLOCK = bytes(BLOCK_SIZE)

# ustar header layout (POSIX.1-2017, pax "ustar Interchange Format"), 500 bytes of fields.
_HEADER = struct.Struct("100s8s8s8s12s12s8sc100s6s2s32s32s8s8s155s")
_CHECKSUM_START = 148
_CHECKSUM_END = 156
_POSIX_MAGIC = b"ustar\x00"

# Type flags of the ustar, pax and GNU formats.
REGULAR = b"0"
LINK = b"1"
SYMLINK = b"2"
CHAR_DEVICE = b"3"
BLOCK_DEVICE = b"4"
DIRECTORY = b"5"
FIFO = b"6"
_OLD_REGULAR = b"\x00"
_CONTIGUOUS = b"7"
_PAX_HEADER = b"x"
_PAX_GLOBAL = b"g"
_GNU_LONG_NAME = b"L"
_GNU_LONG_LINK = b"K"
_GNU_DUMPDIR = b"D"
_GNU_VOLUME = b"V"

# Types whose size field does not announce data (Go's archive/tar and tarfile agree).
_HEADER_ONLY = frozenset({LINK, SYMLINK, CHAR_DEVICE, BLOCK_DEVICE, DIRECTORY, FIFO})

# Largest pax or GNU long-name payload held in memory. Real ones are a few KiB: names, and
# xattrs, which ext4 limits to one block.
_MAX_METADATA_SIZE = 8 << 20

_XATTR_PREFIX = b"SCHILY.xattr."


@dataclass(slots=True)
class TarEntry:
    """One member of the archive, after pax and GNU long-name records were applied."""

    name: bytes
    type: bytes
    mode: int
    uid: int
    gid: int
    size: int
    mtime_ns: int
    linkname: bytes
    devmajor: int
    devminor: int
    offset: int
    xattrs: dict[str, bytes] = field(default_factory=dict)

    @property
    def display_name(self) -> str:
        return self.name.decode("utf-8", "backslashreplace")


class TarFormatError(IntegrityError):
    """A tar stream that is truncated or has a malformed header."""


class _Chunks:
    """Sequential reads over an iterator of byte chunks; raises EOFError on a short read."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._buffer = b""
        self._position = 0
        self.offset = 0

    def _refill(self) -> bool:
        for chunk in self._chunks:
            if chunk:
                self._buffer = chunk
                self._position = 0
                return True
        return False

    def read(self, size: int) -> bytes:
        """Return the next `size` bytes, or b"" at a clean end of the stream."""
        end = self._position + size
        if end <= len(self._buffer):
            data = self._buffer[self._position : end]
            self._position = end
            self.offset += size
            return data
        parts = [view.tobytes() for view in self.views(size, allow_empty=True)]
        return b"".join(parts)

    def views(self, size: int, allow_empty: bool = False) -> Iterator[memoryview]:
        """Yield memoryviews covering the next `size` bytes."""
        started = self.offset
        while size:
            if self._position == len(self._buffer) and not self._refill():
                if allow_empty and self.offset == started:
                    return
                raise EOFError
            end = min(len(self._buffer), self._position + size)
            view = memoryview(self._buffer)[self._position : end]
            size -= end - self._position
            self.offset += end - self._position
            self._position = end
            yield view

    def span(self, size: int) -> memoryview | None:
        """Return the next `size` bytes as one view if the current chunk contains them."""
        end = self._position + size
        if end > len(self._buffer):
            return None
        view = memoryview(self._buffer)[self._position : end]
        self._position = end
        self.offset += size
        return view

    def skip(self, size: int) -> None:
        if self.span(size) is None:
            for _ in self.views(size):
                pass

    def drain(self) -> int:
        """Consume everything left and return how many bytes that was."""
        left = len(self._buffer) - self._position
        for chunk in self._chunks:
            left += len(chunk)
        self._buffer = b""
        self._position = 0
        self.offset += left
        return left


class TarReader:
    """Iterates the entries of a tar stream; `data()` yields the current entry's file data.

    Data left unread is skipped before the next header. Iteration stops at the first zero
    block (the end-of-archive marker) or at a clean end of the stream after a member.
    """

    def __init__(self, chunks: Iterator[bytes], layer_digest: str) -> None:
        self._chunks = _Chunks(chunks)
        self._layer_digest = layer_digest
        self._data_left = 0
        self._padding = 0

    def entries(self) -> Iterator[TarEntry]:
        while True:
            self._skip_rest()
            entry = self._next_entry()
            if entry is None:
                return
            yield entry

    def data(self) -> Iterable[memoryview]:
        """Return the current entry's file data in pieces, each valid until the next."""
        size = self._data_left
        self._data_left = 0
        view = self._chunks.span(size)
        if view is not None:  # most files lie within one decompressed chunk
            return (view,)
        return self._data_pieces(size)

    def _data_pieces(self, size: int) -> Iterator[memoryview]:
        try:
            yield from self._chunks.views(size)
        except EOFError:
            raise self._error("the stream ends inside file data") from None

    def drain(self) -> int:
        """Consume the bytes after the end-of-archive marker; returns their count."""
        self._data_left = 0
        self._padding = 0
        return self._chunks.drain()

    def _skip_rest(self) -> None:
        if not self._data_left and not self._padding:
            return
        try:
            self._chunks.skip(self._data_left + self._padding)
        except EOFError:
            raise self._error("the stream ends inside file data") from None
        self._data_left = 0
        self._padding = 0

    def _next_entry(self) -> TarEntry | None:
        overrides: dict[bytes, bytes] = {}
        while True:
            offset = self._chunks.offset
            header = self._read_header(has_pending=bool(overrides))
            if header is None:
                return None

            entry = self._parse_header(header, offset)
            data_size = 0 if entry.type in _HEADER_ONLY else entry.size
            if entry.type in (_PAX_HEADER, _PAX_GLOBAL, _GNU_LONG_NAME, _GNU_LONG_LINK):
                payload = self._read_metadata(entry, data_size)
                self._merge_metadata(entry, payload, overrides)
                continue
            if entry.type == _GNU_VOLUME:
                self._data_left, self._padding = 0, _padded(data_size)
                self._skip_rest()
                continue

            self._apply_overrides(entry, overrides)
            self._data_left = 0 if entry.type in _HEADER_ONLY else entry.size
            self._padding = _padded(self._data_left) - self._data_left
            if entry.type == _GNU_DUMPDIR:  # a directory whose data lists its members
                entry.type = DIRECTORY
            return entry

    def _read_header(self, has_pending: bool) -> bytes | None:
        try:
            block = self._chunks.read(BLOCK_SIZE)
        except EOFError:
            raise self._error("the stream ends inside a header") from None
        if block and block != _ZERO_BLOCK:
            return block
        if has_pending:
            raise self._error("the archive ends after a pax or long-name header")
        return None

    def _parse_header(self, header: bytes, offset: int) -> TarEntry:
        fields = _HEADER.unpack_from(header)
        try:
            self._check_checksum(header, _octal(fields[6]))
            entry = TarEntry(
                name=_text(fields[0]),
                type=fields[7],
                mode=_number(fields[1]),
                uid=_number(fields[2]),
                gid=_number(fields[3]),
                size=_number(fields[4]),
                mtime_ns=_number(fields[5]) * 1_000_000_000,
                linkname=_text(fields[8]),
                devmajor=0,
                devminor=0,
                offset=offset,
            )
            if entry.size < 0:
                raise ValueError(f"negative size {entry.size}")
            if entry.type in (CHAR_DEVICE, BLOCK_DEVICE):
                entry.devmajor = _number(fields[13])
                entry.devminor = _number(fields[14])
        except ValueError as error:
            raise self._error(f"invalid header at offset {offset}: {error}") from None

        prefix = _text(fields[15])
        if fields[9] == _POSIX_MAGIC and prefix:  # GNU headers use this area for other fields
            entry.name = prefix + b"/" + entry.name
        if entry.type in (_OLD_REGULAR, _CONTIGUOUS):
            entry.type = DIRECTORY if entry.name.endswith(b"/") else REGULAR
        return entry

    def _check_checksum(self, header: bytes, stored: int) -> None:
        unsigned = sum(header) - sum(header[_CHECKSUM_START:_CHECKSUM_END]) + 8 * 0x20
        if stored == unsigned:
            return
        # Some old writers summed the bytes as signed chars.
        signed = sum(struct.unpack("512b", header))
        signed -= sum(struct.unpack("8b", header[_CHECKSUM_START:_CHECKSUM_END])) - 8 * 0x20
        if stored != signed:
            raise ValueError(f"checksum {stored} does not match the computed {unsigned}")

    def _read_metadata(self, entry: TarEntry, size: int) -> bytes:
        if size > _MAX_METADATA_SIZE:
            raise self._error(
                f"pax or long-name header at offset {entry.offset} is {size} bytes, "
                f"more than the {_MAX_METADATA_SIZE} allowed"
            )
        try:
            payload = self._chunks.read(size)
            self._chunks.skip(_padded(size) - size)
        except EOFError:
            raise self._error("the stream ends inside a pax or long-name header") from None
        if len(payload) < size:
            raise self._error("the stream ends inside a pax or long-name header")
        return payload

    def _merge_metadata(
        self, entry: TarEntry, payload: bytes, overrides: dict[bytes, bytes]
    ) -> None:
        if entry.type == _GNU_LONG_NAME:
            overrides[b"path"] = payload.split(b"\x00", 1)[0]
        elif entry.type == _GNU_LONG_LINK:
            overrides[b"linkpath"] = payload.split(b"\x00", 1)[0]
        elif entry.type == _PAX_HEADER:
            overrides.update(self._parse_pax(payload, entry.offset))
        # Global pax headers (type g) are ignored, as containerd and Docker ignore them.

    def _parse_pax(self, payload: bytes, offset: int) -> dict[bytes, bytes]:
        """Parse pax records, each "<length> <key>=<value>\\n"; values stay raw bytes."""
        records: dict[bytes, bytes] = {}
        position = 0
        while position < len(payload) and payload[position] != 0:
            space = payload.find(b" ", position)
            try:
                length = int(payload[position:space])
            except ValueError:
                length = 0
            end = position + length
            key, equals, value = payload[space + 1 : end].partition(b"=")
            complete = 0 < length and end <= len(payload) and value.endswith(b"\n")
            if space < 0 or not equals or not complete:
                raise self._error(f"malformed pax record in the header at offset {offset}")
            records[key] = value[:-1]
            position += length
        return records

    def _apply_overrides(self, entry: TarEntry, overrides: dict[bytes, bytes]) -> None:
        if not overrides:
            return
        try:
            for key, value in overrides.items():
                _apply_record(entry, key, value)
        except (ValueError, InvalidOperation) as error:
            raise self._error(
                f"invalid pax value in the header of {entry.display_name!r}: {error}"
            ) from None
        if any(key.startswith(b"GNU.sparse.") for key in overrides):
            raise UnsupportedError(
                f"layer {self._layer_digest}: entry {entry.display_name!r} is a GNU sparse "
                "file, which lstore does not extract",
                digest=self._layer_digest,
            )

    def _error(self, detail: str) -> TarFormatError:
        return TarFormatError(
            f"layer {self._layer_digest}: invalid tar stream: {detail}; "
            "the layer is corrupt, pull it again or rebuild the image",
            digest=self._layer_digest,
        )


def _apply_record(entry: TarEntry, key: bytes, value: bytes) -> None:
    if key == b"path":
        entry.name = value
    elif key == b"linkpath":
        entry.linkname = value
    elif key == b"size":
        entry.size = int(value)
        if entry.size < 0:
            raise ValueError(f"negative size {entry.size}")
    elif key == b"uid":
        entry.uid = int(value)
    elif key == b"gid":
        entry.gid = int(value)
    elif key == b"mtime":
        entry.mtime_ns = int(Decimal(value.decode("ascii")) * 1_000_000_000)
    elif key.startswith(_XATTR_PREFIX):
        name = key[len(_XATTR_PREFIX) :].decode("utf-8", "surrogateescape")
        entry.xattrs[name] = value


def _padded(size: int) -> int:
    return -(-size // BLOCK_SIZE) * BLOCK_SIZE


def _text(field: bytes) -> bytes:
    return field.split(b"\x00", 1)[0]


def _octal(field: bytes) -> int:
    digits = field.split(b"\x00", 1)[0].strip(b" ")
    return int(digits, 8) if digits else 0


def _number(field: bytes) -> int:
    """Parse a numeric field: octal text, or GNU base-256 when the first byte has bit 7 set."""
    if field[0] == 0x80:
        return int.from_bytes(field[1:], "big")
    if field[0] == 0xFF:
        return int.from_bytes(field, "big", signed=True)
    try:
        return int(field.rstrip(b"\x00 ") or b"0", 8)
    except ValueError:  # text ended by a NUL and followed by other bytes
        return _octal(field)
