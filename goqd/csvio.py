"""goqd's CSV files: listings to import and bulk stock edits.

Mall exports come in Shift_JIS (cp932) as often as UTF-8, so bytes are decoded as
UTF-8 (with or without BOM) first, then cp932; anything else is refused with a clear
error. Every row is checked before anything is applied: one bad row names its line and
column and nothing of the file is applied.

Listings CSV (header row required; column order free; only ``listing_key`` required)::

    listing_key,sku_code,name,quantity,allow_overdraft,lead_time_days,restock_date

Stock CSV::

    sku,quantity        (set the total)    or    sku,delta    (adjust it)
"""

from __future__ import annotations

import csv
import io
import re
from typing import Literal

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
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_TRUE = {"1", "true", "yes", "on", "する", "有効"}
_FALSE = {"0", "false", "no", "off", "しない", "無効", ""}
MAX_ROWS = 1_000_000


def decode_csv_bytes(data: bytes, *, where: str = "CSV") -> str:
    """UTF-8 (BOM or not), else Shift_JIS/cp932; anything else is an ``InputError``."""
    for encoding in ("utf-8-sig", "cp932"):
        try:
            return data.decode(encoding)
        except UnicodeDecodeError:
            continue
    raise InputError(f"{where}: neither UTF-8 nor Shift_JIS (cp932); save it in one of those")


def _rows(
    text: str, required: tuple[str, ...], allowed: tuple[str, ...], where: str
) -> list[tuple[int, dict[str, str]]]:
    reader = csv.DictReader(io.StringIO(text))
    header = [h.strip() for h in (reader.fieldnames or [])]
    if not header:
        raise InputError(f"{where}: empty file; the first line must be a header row")
    unknown = [h for h in header if h not in allowed]
    if unknown:
        raise InputError(
            f"{where}: line 1: unknown column {unknown[0]!r} (columns: {', '.join(allowed)})"
        )
    missing = [c for c in required if c not in header]
    if missing:
        raise InputError(f"{where}: line 1: missing column {missing[0]!r}")
    reader.fieldnames = header
    rows: list[tuple[int, dict[str, str]]] = []
    for raw in reader:
        if len(rows) >= MAX_ROWS:
            raise InputError(f"{where}: more than {MAX_ROWS} rows; split the file")
        if None in raw:
            raise InputError(f"{where}: line {reader.line_num}: more fields than the header")
        rows.append((reader.line_num, {k: (v or "").strip() for k, v in raw.items()}))
    return rows


def _int(value: str, where: str, line: int, column: str, *, lo: int, hi: int) -> int:
    try:
        n = int(value)
    except ValueError:
        raise InputError(
            f"{where}: line {line}: {column} {value!r} is not a whole number"
        ) from None
    if not lo <= n <= hi:
        raise InputError(f"{where}: line {line}: {column} {n} is outside {lo}..{hi}")
    return n


def parse_listings_csv(text: str, *, where: str = "CSV") -> list[MallListing]:
    rows = _rows(text, ("listing_key",), LISTING_COLUMNS, where)
    seen: dict[str, int] = {}
    listings = []
    for line, row in rows:
        key = row["listing_key"]
        if not key:
            raise InputError(f"{where}: line {line}: listing_key is empty")
        if key in seen:
            raise InputError(
                f"{where}: line {line}: listing_key {key!r} already on line {seen[key]}"
            )
        seen[key] = line
        quantity = None
        if row.get("quantity"):
            quantity = _int(row["quantity"], where, line, "quantity", lo=0, hi=10_000_000)
        overdraft = None
        if "allow_overdraft" in row:
            flag = row["allow_overdraft"].lower()
            if flag not in _TRUE | _FALSE:
                raise InputError(
                    f"{where}: line {line}: allow_overdraft {row['allow_overdraft']!r} is "
                    "not one of 1/0, yes/no, true/false"
                )
            overdraft = flag in _TRUE if flag else None
        lead = None
        if row.get("lead_time_days"):
            lead = _int(row["lead_time_days"], where, line, "lead_time_days", lo=0, hi=365)
        restock = row.get("restock_date") or None
        if restock is not None and not _DATE.match(restock):
            raise InputError(f"{where}: line {line}: restock_date {restock!r} is not YYYY-MM-DD")
        listings.append(
            MallListing(
                listing_key=key,
                link_code=row.get("sku_code", ""),
                name=row.get("name", ""),
                quantity=quantity,
                attrs=ListingAttrs(
                    allow_overdraft=overdraft, lead_time_days=lead, restock_date=restock
                ),
            )
        )
    return listings


def parse_stock_csv(
    text: str, *, where: str = "CSV"
) -> tuple[Literal["set", "adjust"], list[tuple[str, int]]]:
    """Returns ``("set" | "adjust", [(sku, n), …])``."""
    rows = _rows(text, ("sku",), ("sku", "quantity", "delta"), where)
    header = set(rows[0][1]) if rows else set()
    if {"quantity", "delta"} <= header or not ({"quantity", "delta"} & header):
        raise InputError(f"{where}: line 1: give exactly one of the columns quantity, delta")
    mode: Literal["set", "adjust"] = "set" if "quantity" in header else "adjust"
    column = "quantity" if mode == "set" else "delta"
    items: list[tuple[str, int]] = []
    seen: dict[str, int] = {}
    for line, row in rows:
        sku = row["sku"]
        if not sku:
            raise InputError(f"{where}: line {line}: sku is empty")
        if sku in seen:
            raise InputError(f"{where}: line {line}: sku {sku!r} already on line {seen[sku]}")
        seen[sku] = line
        lo = 0 if mode == "set" else -10_000_000
        items.append((sku, _int(row[column], where, line, column, lo=lo, hi=10_000_000)))
    return mode, items
