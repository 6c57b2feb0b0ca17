"""goqd's CSV files: listings to import and bulk stock edits.

It must never apply part of a file, read bytes it cannot decode for sure, or let a
malformed file raise anything but ``InputError`` naming the line (and the column where
one is to blame).

Listings CSV (header row required; column order free; only ``listing_key`` required)::

    listing_key,sku_code,name,quantity,allow_overdraft,lead_time_days,restock_date

Stock CSV::

    sku,quantity        (set the total)    or    sku,delta    (adjust it)

File rules: a header row naming each column once; every row as many fields as the
header (a row of only empty fields is skipped); quotes as RFC 4180 (a quote inside a
quoted field is doubled); LF, CRLF or CR line endings; no NUL characters; at most
``MAX_ROWS`` rows. Values are checked against ``goqd.limits``, the same caps and date
rule the control protocol applies.

Encodings (``decode_csv_bytes``). Mall exports come in UTF-8 and Shift_JIS (cp932).
Older systems still write EUC-JP, whose bytes are often valid cp932 as well and would
become garbage names without an error. So the bytes are read as:

1. UTF-8 (BOM or not) when valid, unless the reading is odd for a catalogue: no BOM,
   no character beyond U+07FF (Japanese in UTF-8 takes three bytes a character), and a
   character in U+0250–U+036F or U+0530–U+07FF (IPA, combining marks, Armenian, Hebrew,
   Arabic…), which is what EUC-JP kanji and some cp932 text (``ﾊア`` reads ``ʃA``) look
   like read as UTF-8. Then rules 2 and 3 decide; if neither applies, UTF-8 stands.
2. Shift_JIS (cp932) when valid, strictly: a byte cp932 leaves undefined or maps to a
   user-defined or control character refuses the file. If the bytes are also valid
   EUC-JP they hold no byte 0x80–0xA0 except 0x8E/0x8F, so the cp932 reading has no
   hiragana, no full-width katakana and no full-width punctuation. It is accepted only
   if it is plausible half-width text: every non-ASCII character half-width katakana;
   fewer than one in five of them the half-width punctuation ｡｢｣､･ (EUC-JP's
   punctuation, hiragana and katakana all start with a byte cp932 reads as one of
   those five); and the katakana follow the script (ﾞ only after a kana that takes it,
   ﾟ only after ﾊ–ﾎ, ｬｭｮ only after an i-row kana, no small kana, ｰ, ﾞ or ﾟ starting
   a word). Otherwise it is refused as EUC-JP.
3. Valid only as EUC-JP: refused as EUC-JP.
4. Anything else (UTF-16 among it): refused, naming the line and column of the first
   byte that is not Shift_JIS.

Known limits: EUC-JP text that is only kanji reads as cp932 half-width katakana (or
UTF-8 Latin letters) that can look plausible, so a tiny file whose only non-ASCII text
is a few kanji may pass (no rule over bytes can tell ``本`` from ``ﾋﾜ``). Measured on
random level-1 kanji names: about half of one-row files pass, 0.5 % of five-row files,
none of ten-row files; any kana or full-width symbol gives EUC-JP away. The other way
round, a cp932 file whose only non-ASCII text is level-2 kanji with lead bytes
0xE0–0xEA (``珈琲``) is valid EUC-JP too and is refused as EUC-JP: any kana, level-1
kanji or symbol (``①``, ``㈱``) beside them lets it through. Likewise cp932
bytes are valid UTF-8 only where every non-ASCII character pairs up as a half-width
katakana ﾂ–ﾟ followed by ｡–ｿ or by a full-width character (``ﾃｨ`` reads ``è``, ``ﾃア``
``ÃA``): a file with nothing else non-ASCII is read as UTF-8. Any full-width character
after an ASCII one, or any longer half-width word, makes the bytes invalid UTF-8.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Callable
from typing import Literal, TypeVar

from goqd import limits
from goqd.errors import InputError
from goqd.messages import ListingAttrs, MallListing

LISTING_COLUMNS = (
    "listing_key",
    "sku_code",
    "name",
    "quantity",
    "allow_overdraft",
    "lead_time_days",
    "restock_date",
)
STOCK_COLUMNS = ("sku", "quantity", "delta")
_TRUE = {"1", "true", "yes", "on", "する", "有効"}
_FALSE = {"0", "false", "no", "off", "しない", "無効", ""}
_INT = re.compile(r"[+-]?[0-9]+")
_LINE = re.compile(r"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+\Z")
MAX_ROWS = 1_000_000
SAVE_AS = "save it as CSV UTF-8 or CSV Shift_JIS (cp932) and try again"

StockMode = Literal["set", "adjust"]
T = TypeVar("T")

# ------------------------------------------------------------------ encodings

_HALF_KANA = frozenset(chr(c) for c in range(0xFF66, 0xFFA0))  # ｦ … ﾟ
_TAKES_DAKUTEN = frozenset("ｳｶｷｸｹｺｻｼｽｾｿﾀﾁﾂﾃﾄﾊﾋﾌﾍﾎ")
_TAKES_HANDAKUTEN = frozenset("ﾊﾋﾌﾍﾎ")
_BEFORE_SMALL_Y = frozenset("ｷｼﾁﾆﾋﾐﾘﾃﾌﾞﾟ")  # ｷｬ, ｼﾞｮ, ﾋﾟｭ, ﾃﾞｭ
_BEFORE_SMALL_VOWEL = frozenset("ｲｳｸｼｽﾁﾂﾃﾄﾌﾞ")  # ﾌｧ, ﾃｨ, ﾃﾞｨ, ｳｪ, ｼﾞｪ, ﾄｩ, ﾂｫ, ｸｨｰﾝ, ｽｨｰﾂ
_NEVER_FIRST = frozenset("ｧｨｩｪｫｬｭｮｯｰﾞﾟ")
_NOT_BEFORE_SOKUON = frozenset("ｯｰﾝ")  # ｯ and ｰ never follow these


def decode_csv_bytes(data: bytes, *, where: str = "CSV") -> str:
    """The text of a CSV file's bytes, by the rules in the module docstring."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise InputError(f"{where}: the file is UTF-16 (Unicode text); {SAVE_AS}")
    utf8: str | None = None
    try:
        utf8 = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        pass
    else:
        if data.startswith(b"\xef\xbb\xbf") or any(c > "\u07ff" for c in utf8):
            return utf8
        if not _odd(utf8):
            return utf8
    cp932, problem = _cp932(data, where)
    euc = _valid(data, "euc_jp")
    if cp932 is not None:
        if euc and not _plausible_half_width(cp932):
            raise _euc_jp(where)
        return cp932
    if euc:
        raise _euc_jp(where)
    if utf8 is not None:
        return utf8  # odd, but no other reading is valid at all
    raise problem


def _cp932(data: bytes, where: str) -> tuple[str | None, InputError]:
    """The strict cp932 reading, or ``None`` and the refusal naming the first bad byte."""
    try:
        text = data.decode("cp932")
    except UnicodeDecodeError as exc:
        line, column = _position(data, exc.start)
        return None, InputError(
            f"{where}: line {line}, column {column}: byte 0x{data[exc.start]:02X} is neither "
            f"UTF-8 nor Shift_JIS (cp932); {SAVE_AS}"
        )
    for index, c in enumerate(text):
        # cp932 maps a few single bytes and its user-defined area (0xF040–0xF9FC) to
        # control and private-use characters: not text any mall would show.
        if "\x80" <= c <= "\x9f" or "\ue000" <= c <= "\uf8ff":
            line, column = _text_position(text, index)
            return None, InputError(
                f"{where}: line {line}, column {column}: a byte sequence that is not a "
                f"Shift_JIS character (cp932 reads it as U+{ord(c):04X}); {SAVE_AS}"
            )
    return text, InputError("")


def _odd(text: str) -> bool:
    """Holds a script no Japanese catalogue uses (IPA, combining marks, Hebrew, Arabic…)."""
    return any("\u0250" <= c <= "\u036f" or "\u0530" <= c <= "\u07ff" for c in text)


def _valid(data: bytes, encoding: str) -> bool:
    try:
        data.decode(encoding)
    except UnicodeDecodeError:
        return False
    return True


def _euc_jp(where: str) -> InputError:
    return InputError(
        f"{where}: the file looks like EUC-JP, which goqd does not read (as Shift_JIS it "
        f"would be garbage); {SAVE_AS}"
    )


def _plausible_half_width(text: str) -> bool:
    non_ascii = [c for c in text if c > "\x7f"]
    if not all("\uff61" <= c <= "\uff9f" for c in non_ascii):
        return False
    punctuation = sum(1 for c in non_ascii if c <= "\uff65")
    if punctuation * 5 >= len(non_ascii):
        return False
    prev = ""
    for c in text:
        if c in _HALF_KANA and (
            (c == "ﾞ" and prev not in _TAKES_DAKUTEN)
            or (c == "ﾟ" and prev not in _TAKES_HANDAKUTEN)
            or (c in "ｬｭｮ" and prev not in _BEFORE_SMALL_Y)
            or (c in "ｧｨｩｪｫ" and prev not in _BEFORE_SMALL_VOWEL)
            or (c in "ｯｰ" and prev in _NOT_BEFORE_SOKUON)
            or (c in _NEVER_FIRST and prev not in _HALF_KANA)
        ):
            return False
        prev = c
    return True


def _position(data: bytes, offset: int) -> tuple[int, int]:
    """1-based line and byte column of ``offset`` (CR, LF and CRLF end a line)."""
    head = data[:offset]
    line_start = max(head.rfind(b"\n"), head.rfind(b"\r")) + 1
    lines = head.count(b"\n") + head.count(b"\r") - head.count(b"\r\n")
    return lines + 1, offset - line_start + 1


def _text_position(text: str, index: int) -> tuple[int, int]:
    head = text[:index]
    line_start = max(head.rfind("\n"), head.rfind("\r")) + 1
    lines = head.count("\n") + head.count("\r") - head.count("\r\n")
    return lines + 1, index - line_start + 1


# ------------------------------------------------------------------ structure


def _show(value: str) -> str:
    """A value for an error message: quoted, and cut short (a field can be huge)."""
    return repr(value if len(value) <= 40 else value[:40] + "…")


_CSV_PROBLEMS = (
    ("field larger than field limit", "a field is longer than {limit} characters"),
    ("unexpected end of data", "a quoted field is never closed"),
    ("expected after", 'a quote inside a quoted field must be doubled ("")'),
)


class _Table:
    """The header and rows of one CSV text, read a row at a time (see module docstring).

    Holds the text and one row: a worker thread can read a large file in chunks without
    ever holding all of its rows.
    """

    def __init__(
        self, text: str, required: tuple[str, ...], allowed: tuple[str, ...], where: str
    ) -> None:
        self.where = where
        self.rows_read = 0
        self._nul = "\x00" in text
        # Lines sliced lazily, each with its ending (CR, LF or CRLF): the csv module then
        # handles newlines inside quoted fields itself. Not io.StringIO, which copies the
        # text at four bytes a character. A BOM decoded as text is skipped. strict: a
        # stray quote is an error, not a guess.
        lines = (m.group() for m in _LINE.finditer(text, 1 if text[:1] == "\ufeff" else 0))
        self._reader = csv.reader(lines, strict=True)
        first = self._next_row()
        if first is None:
            raise InputError(f"{where}: empty file; the first line must be a header row")
        self.header_line, cells = first
        names = [c.strip() for c in cells]
        self.columns: dict[str, int] = {}
        at = f"{where}: line {self.header_line}"
        for index, name in enumerate(names):
            if not name:
                raise InputError(f"{at}, column {index + 1}: a column with no name")
            if name not in allowed:
                raise InputError(
                    f"{at}: unknown column {_show(name)} (columns: {', '.join(allowed)})"
                )
            if name in self.columns:
                raise InputError(
                    f"{at}: column {name!r} appears twice (columns "
                    f"{self.columns[name] + 1} and {index + 1}); keep one"
                )
            self.columns[name] = index
        missing = [c for c in required if c not in self.columns]
        if missing:
            raise InputError(f"{at}: missing column {missing[0]!r}")

    def _next_row(self) -> tuple[int, list[str]] | None:
        """The next non-blank row and the line it starts on; ``None`` at the end."""
        while True:
            line = self._reader.line_num + 1
            try:
                cells = next(self._reader)
            except StopIteration:
                return None
            except csv.Error as exc:
                raise InputError(f"{self.where}: line {line}: {_csv_problem(exc)}") from None
            if self._nul:
                for index, cell in enumerate(cells):
                    if "\x00" in cell:
                        raise InputError(
                            f"{self.where}: line {line}, column {index + 1}: a NUL character "
                            f"(is the file UTF-16?); {SAVE_AS}"
                        )
            if any(c.strip() for c in cells):
                return line, cells

    def next_row(self) -> tuple[int, dict[str, str]] | None:
        """The next data row as ``(line, {column: stripped value})``."""
        got = self._next_row()
        if got is None:
            return None
        line, cells = got
        if len(cells) != len(self.columns):
            raise InputError(
                f"{self.where}: line {line}: {len(cells)} field(s), but the header has "
                f"{len(self.columns)} (a missing or extra comma, or an unquoted comma in "
                "a value?)"
            )
        self.rows_read += 1
        if self.rows_read > MAX_ROWS:
            raise InputError(f"{self.where}: more than {MAX_ROWS} rows; split the file")
        return line, {name: cells[i].strip() for name, i in self.columns.items()}


def _csv_problem(exc: csv.Error) -> str:
    text = str(exc)
    for needle, problem in _CSV_PROBLEMS:
        if needle in text:
            return problem.format(limit=csv.field_size_limit())
    return f"not valid CSV ({text})"


# ------------------------------------------------------------------ values


def _int(value: str, where: str, line: int, column: str, *, lo: int, hi: int) -> int:
    if _INT.fullmatch(value) is None:
        raise InputError(f"{where}: line {line}: {column} {_show(value)} is not a whole number")
    if len(value) > 20:  # int() of thousands of digits is slow, and out of range anyway
        raise InputError(f"{where}: line {line}: {column} {_show(value)} is outside {lo}..{hi}")
    n = int(value)
    if not lo <= n <= hi:
        raise InputError(f"{where}: line {line}: {column} {n} is outside {lo}..{hi}")
    return n


def _text(value: str, where: str, line: int, column: str, cap: int) -> str:
    if len(value) > cap:
        raise InputError(
            f"{where}: line {line}: {column} is {len(value)} characters; at most {cap}"
        )
    return value


class ListingsReader:
    """A listings CSV read in chunks; every row checked, duplicates across the file too."""

    def __init__(self, text: str, *, where: str = "CSV") -> None:
        self.where = where
        self._table = _Table(text, ("listing_key",), LISTING_COLUMNS, where)
        self._seen: dict[str, int] = {}

    def read(self, limit: int) -> list[MallListing]:
        """Up to ``limit`` listings; an empty list at the end of the file."""
        out: list[MallListing] = []
        while len(out) < limit:
            got = self._table.next_row()
            if got is None:
                break
            out.append(self._listing(*got))
        return out

    def _listing(self, line: int, row: dict[str, str]) -> MallListing:
        where = self.where
        key = _text(row["listing_key"], where, line, "listing_key", limits.MAX_LISTING_KEY)
        if not key:
            raise InputError(f"{where}: line {line}: listing_key is empty")
        if key in self._seen:
            raise InputError(
                f"{where}: line {line}: listing_key {_show(key)} already on line {self._seen[key]}"
            )
        self._seen[key] = line
        quantity = None
        if row.get("quantity"):
            quantity = _int(row["quantity"], where, line, "quantity", lo=0, hi=limits.MAX_QUANTITY)
        overdraft = None
        if "allow_overdraft" in row:
            flag = row["allow_overdraft"].lower()
            if flag not in _TRUE | _FALSE:
                raise InputError(
                    f"{where}: line {line}: allow_overdraft {_show(row['allow_overdraft'])} "
                    "is not one of 1/0, yes/no, true/false"
                )
            overdraft = flag in _TRUE if flag else None
        lead = None
        if row.get("lead_time_days"):
            lead = _int(
                row["lead_time_days"],
                where,
                line,
                "lead_time_days",
                lo=0,
                hi=limits.MAX_LEAD_TIME_DAYS,
            )
        restock = row.get("restock_date") or None
        if restock is not None and not limits.is_calendar_date(restock):
            raise InputError(
                f"{where}: line {line}: restock_date {_show(restock)} is not YYYY-MM-DD "
                "(a real calendar date)"
            )
        return MallListing(
            listing_key=key,
            link_code=_text(row.get("sku_code", ""), where, line, "sku_code", limits.MAX_SKU),
            name=_text(row.get("name", ""), where, line, "name", limits.MAX_NAME),
            quantity=quantity,
            attrs=ListingAttrs(
                allow_overdraft=overdraft, lead_time_days=lead, restock_date=restock
            ),
        )


class StockReader:
    """A stock CSV read in chunks of ``(line, sku, n)``.

    Duplicate SKUs are not tracked here (a million of them would be a large set): the
    caller checks them, ``parse_stock_csv`` in memory, the daemon in the ledger's
    staging table.
    """

    def __init__(self, text: str, *, where: str = "CSV") -> None:
        self.where = where
        self._table = _Table(text, ("sku",), STOCK_COLUMNS, where)
        columns = self._table.columns
        if ("quantity" in columns) == ("delta" in columns):
            raise InputError(
                f"{where}: line {self._table.header_line}: give exactly one of the columns "
                "quantity, delta"
            )
        self.mode: StockMode = "set" if "quantity" in columns else "adjust"
        self.column = "quantity" if self.mode == "set" else "delta"

    @property
    def rows_read(self) -> int:
        return self._table.rows_read

    def read(self, limit: int) -> list[tuple[int, str, int]]:
        """Up to ``limit`` rows; an empty list at the end of the file."""
        where, column = self.where, self.column
        lo, hi = (
            (0, limits.MAX_QUANTITY)
            if self.mode == "set"
            else (-limits.MAX_DELTA, limits.MAX_DELTA)
        )
        out: list[tuple[int, str, int]] = []
        while len(out) < limit:
            got = self._table.next_row()
            if got is None:
                break
            line, row = got
            sku = _text(row["sku"], where, line, "sku", limits.MAX_SKU)
            if not sku:
                raise InputError(f"{where}: line {line}: sku is empty")
            out.append((line, sku, _int(row[column], where, line, column, lo=lo, hi=hi)))
        return out


def duplicate_sku(where: str, line: int, sku: str, first: int) -> InputError:
    """The refusal for a SKU listed twice (the same words wherever it is found)."""
    return InputError(f"{where}: line {line}: sku {_show(sku)} already on line {first}")


def parse_listings_csv(text: str, *, where: str = "CSV") -> list[MallListing]:
    """Every listing of a listings CSV, or ``InputError`` naming the first bad line."""
    reader = ListingsReader(text, where=where)
    return _drain(reader.read)


def parse_stock_csv(text: str, *, where: str = "CSV") -> tuple[StockMode, list[tuple[str, int]]]:
    """Returns ``("set" | "adjust", [(sku, n), …])``, or ``InputError`` naming the line."""
    reader = StockReader(text, where=where)
    seen: dict[str, int] = {}
    items: list[tuple[str, int]] = []
    for line, sku, n in _drain(reader.read):
        if sku in seen:
            raise duplicate_sku(where, line, sku, seen[sku])
        seen[sku] = line
        items.append((sku, n))
    return reader.mode, items


def _drain(read: Callable[[int], list[T]]) -> list[T]:
    out: list[T] = []
    while chunk := read(10_000):
        out.extend(chunk)
    return out
