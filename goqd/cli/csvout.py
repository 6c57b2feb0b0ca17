"""CSV files goqctl writes for people to open in Excel: diff, products, listings, 棚卸.

Two encodings, as the operator chooses: UTF-8 with a BOM (``utf-8-sig``; Excel takes a
file for UTF-8 only when it starts with one) or Shift_JIS (``cp932``, what older Excel
and many Japanese tools read). A header row, then one row per record, CRLF line ends.

The file appears whole or not at all: rows go to a temporary file beside FILE, which
is renamed over FILE only once every row was written and synced. ``-`` is standard
output, written in one piece once every row is encoded. A character cp932 has no code
for is refused (the row, column and record are named) rather than replaced by ``?``,
which would change a product name without a word; the one exception is U+2014 EM
DASH, which JIS X 0208 and cp932 write as U+2015 (the same character, ―).

A text cell that Excel would run as a formula (starting with ``=``, ``+``, ``-`` or
``@``, and not a number) is written with a leading ``'``, Excel's own mark for text:
names come from malls, and a name must not run in the operator's spreadsheet.

This module never writes anywhere but FILE and its temporary sibling (or stdout), and
never leaves a partial FILE or a temporary file behind.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import re
import sys
import tempfile
from collections.abc import Iterable, Sequence
from types import TracebackType
from typing import IO

from goqd.errors import CsvError as CsvError

ENCODINGS = ("utf-8-sig", "cp932")
DEFAULT_ENCODING = "utf-8-sig"
_BOM = b"\xef\xbb\xbf"
_CP932_SAME = str.maketrans({"\u2014": "\u2015"})
_NUMBER = re.compile(r"[+-]?[0-9]+(\.[0-9]+)?")
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def excel_cell(text: str) -> str:
    """``text`` as Excel shows it rather than runs it (see the module docstring)."""
    if text.startswith(_FORMULA_START) and not _NUMBER.fullmatch(text):
        return "'" + text
    return text


class CsvOut:
    """One CSV written atomically: ``write`` rows, then ``commit``; leaving the ``with``
    block without a commit (an error, Ctrl-C) removes the temporary file.

    Opening it creates the temporary file at once, so a path goqctl cannot write is
    refused before any request goes to the daemon.
    """

    def __init__(self, path: str, encoding: str, header: Sequence[str]) -> None:
        if encoding not in ENCODINGS:
            raise CsvError(f"unknown encoding {encoding!r}: one of {', '.join(ENCODINGS)}")
        self.path = path
        self.encoding = encoding
        self.header = tuple(header)
        self.rows = 0
        self._codec = "utf-8" if encoding == "utf-8-sig" else "cp932"
        self._tmp: str | None = None
        self._target = ""
        self._mode = 0o644
        self._out: IO[bytes]
        if path == "-":
            self.where = "standard output"
            self._out = io.BytesIO()
        else:
            self.where = path
            self._out = self._open_temporary(path)
        if encoding == "utf-8-sig":
            self._out.write(_BOM)
        self._line = 1
        self._emit(self.header)

    def _open_temporary(self, path: str) -> IO[bytes]:
        # A symlink is followed: the file it names is the one the operator means.
        target = os.path.realpath(path)
        if os.path.isdir(target):
            raise CsvError(f"cannot write {path}: it is a directory", "give a file name")
        if os.path.exists(target) and not os.access(target, os.W_OK):
            raise CsvError(f"cannot write {path}: the file is read-only")
        directory = os.path.dirname(target) or "."
        try:
            fd, tmp = tempfile.mkstemp(
                dir=directory, prefix=f".{os.path.basename(target)}.", suffix=".part"
            )
        except OSError as exc:
            raise CsvError(
                f"cannot write {path}: {exc.strerror or exc}",
                f"choose a directory you can write in (the file is made in {directory})",
            ) from None
        try:
            existing = os.stat(target).st_mode & 0o777
        except OSError:
            umask = os.umask(0)
            os.umask(umask)
            existing = 0o666 & ~umask
        self._mode = existing
        self._tmp = tmp
        self._target = target
        return os.fdopen(fd, "wb")

    def __enter__(self) -> CsvOut:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.discard()

    def write(self, rows: Iterable[Sequence[str]]) -> None:
        for row in rows:
            self._line += 1
            self._emit(row)
            self.rows += 1

    def _emit(self, row: Sequence[str]) -> None:
        cells = [excel_cell(c) for c in row]
        text = _csv_line(cells)
        if self._codec == "cp932":
            text = text.translate(_CP932_SAME)
        try:
            data = text.encode(self._codec)
        except UnicodeEncodeError:
            raise self._unencodable(cells) from None
        self._out.write(data)

    def _unencodable(self, cells: Sequence[str]) -> CsvError:
        for name, cell in zip(self.header, cells, strict=False):
            for ch in cell.translate(_CP932_SAME):
                try:
                    ch.encode(self._codec)
                except UnicodeEncodeError:
                    record = f" ({self.header[0]} {cells[0]!r})" if cells else ""
                    return CsvError(
                        f"{self.where}: row {self._line}{record}, column {name}: "
                        f"{ch!r} (U+{ord(ch):04X}) has no Shift_JIS (cp932) code; "
                        "nothing was written",
                        "write it with --encoding utf-8-sig (Excel reads that too), or "
                        "change that text",
                    )
        return CsvError(f"{self.where}: row {self._line} cannot be written in {self._codec}")

    def commit(self) -> None:
        """Put the file in place (or the bytes on stdout). Only after every row."""
        out = self._out
        if isinstance(out, io.BytesIO):
            try:
                sys.stdout.flush()
                sys.stdout.buffer.write(out.getvalue())
                sys.stdout.buffer.flush()
            finally:
                self._out = io.BytesIO()
            return
        assert self._tmp is not None
        try:
            out.flush()
            os.fsync(out.fileno())
            os.fchmod(out.fileno(), self._mode)
            out.close()
            os.replace(self._tmp, self._target)
        except OSError as exc:
            raise CsvError(f"cannot write {self.path}: {exc.strerror or exc}") from None
        self._tmp = None
        _sync_directory(os.path.dirname(self._target) or ".")

    def discard(self) -> None:
        """Remove the temporary file, if the CSV was not committed."""
        if self._tmp is None:
            return
        tmp, self._tmp = self._tmp, None
        try:
            self._out.close()
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


class _LineBuffer:
    """A write target for ``csv.writer`` that keeps the last line written."""

    def __init__(self) -> None:
        self.text = ""

    def write(self, text: str) -> int:
        self.text = text
        return len(text)


_buffer = _LineBuffer()
# RFC 4180 as Excel reads it: quotes only where needed, CRLF line ends.
_writer = csv.writer(_buffer, lineterminator="\r\n")


def _csv_line(cells: Sequence[str]) -> str:
    _writer.writerow(cells)
    return _buffer.text


def _sync_directory(directory: str) -> None:
    # The rename is durable only once the directory is: a crash right after would
    # otherwise leave the old file (or none) with the new data lost.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
