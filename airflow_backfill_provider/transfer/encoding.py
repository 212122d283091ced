"""Name the column and row behind an encoding error, instead of storing mojibake.

Every session speaks UTF8 (``connections.py``), so PostgreSQL converts text exactly from the source's
encoding and into the destination's, and refuses what it cannot convert: a character the destination
encoding has no code for (SQLSTATE 22P05) or bytes that are not valid UTF-8, which only a ``SQL_ASCII``
source can hold (22021). The chunk then fails, permanently, with the column and the key of the first
such row: found here by reading the chunk's rows again (on the source, only after such a failure) and
checking each value's UTF-8 bytes against the destination encoding in Python.

A ``SQL_ASCII`` source is loaded byte for byte where its bytes are valid UTF-8 and refused row by row
otherwise: SQL_ASCII records no encoding, so the provider does not guess one.
"""

from __future__ import annotations

import re

from psycopg2 import sql

ENCODING_ERRORS = {"22P05", "22021"}  # untranslatable_character, character_not_in_repertoire

# PostgreSQL server encodings -> Python codecs (a destination with another one gets the column only)
_CODECS = {
    "UTF8": "utf-8",
    "SQL_ASCII": None,
    "LATIN1": "latin-1",
    "LATIN2": "iso8859_2",
    "LATIN3": "iso8859_3",
    "LATIN4": "iso8859_4",
    "LATIN5": "iso8859_9",
    "LATIN6": "iso8859_10",
    "LATIN7": "iso8859_13",
    "LATIN8": "iso8859_14",
    "LATIN9": "iso8859_15",
    "LATIN10": "iso8859_16",
    "ISO_8859_5": "iso8859_5",
    "ISO_8859_6": "iso8859_6",
    "ISO_8859_7": "iso8859_7",
    "ISO_8859_8": "iso8859_8",
    "KOI8R": "koi8_r",
    "KOI8U": "koi8_u",
    "WIN866": "cp866",
    "WIN874": "cp874",
    "WIN1250": "cp1250",
    "WIN1251": "cp1251",
    "WIN1252": "cp1252",
    "WIN1253": "cp1253",
    "WIN1254": "cp1254",
    "WIN1255": "cp1255",
    "WIN1256": "cp1256",
    "WIN1257": "cp1257",
    "WIN1258": "cp1258",
    "EUC_JP": "euc_jp",
    "EUC_KR": "euc_kr",
    "EUC_CN": "gb2312",
    "EUC_JIS_2004": "euc_jis_2004",
}

_CONTEXT_COLUMN = re.compile(r"\bcolumn (\S+?)(?::|\s|$)")


def _storable(raw: bytes, codec: str | None) -> str | None:
    """None if ``raw`` (UTF-8 bytes) can be stored in ``codec``; else why not."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        return f"bytes {raw[err.start : err.end]!r} are not valid UTF-8"
    if codec is None:
        return None
    try:
        text.encode(codec)
    except UnicodeEncodeError as err:
        return f"character {text[err.start : err.end]!r} has no equivalent in the destination encoding"
    except LookupError:
        return None
    return None


def describe(err, *, chunk_id: str, dst_encoding: str, src_conn=None, select=None, columns=(), keys=()) -> str:
    """A readable message for an encoding error of a chunk; names the key when ``src_conn`` can find it."""
    context = getattr(getattr(err, "diag", None), "context", None) or ""
    m = _CONTEXT_COLUMN.search(context)
    column = m.group(1) if m and m.group(1) in columns else None
    where = f"column {column!r}" if column else "a text value"
    found = None
    if src_conn is not None and select is not None:
        found = _first_unstorable(
            src_conn,
            select,
            list(columns),
            list(keys),
            [column] if column else list(columns),
            _CODECS.get(dst_encoding.upper(), "utf-8"),
        )
    why = ""
    if found is not None:
        column, key, reason = found
        where = f"column {column!r}, row with {', '.join(f'{k}={v!r}' for k, v in zip(keys, key))},"
        why = f" ({reason})"
    primary = str(getattr(getattr(err, "diag", None), "message_primary", "") or err).strip()
    return (
        f"chunk {chunk_id}: {where} cannot be stored exactly in the destination (encoding {dst_encoding}){why}: "
        f"{primary}. Nothing was written. Use a destination database whose encoding holds every source "
        "character (UTF8), or fix the value in the source (a SQL_ASCII source is loaded byte for byte only "
        "where its bytes are valid UTF-8)"
    )


def _first_unstorable(conn, select, columns, keys, check, codec):
    # the values' bytes as UTF-8; a SQL_ASCII source's bytes as stored (converting them would fail here too)
    raw = "SQL_ASCII" if conn.info.parameter_status("server_encoding") == "SQL_ASCII" else "UTF8"
    stmt = sql.SQL("SELECT {k}, {v} FROM ({select}) AS s ({names})").format(
        k=sql.SQL(", ").join(sql.SQL("s.{}::text").format(sql.Identifier(k)) for k in keys),
        v=sql.SQL(", ").join(
            sql.SQL("convert_to(s.{}::text, {})").format(sql.Identifier(c), sql.Literal(raw)) for c in check
        ),
        select=select,
        names=sql.SQL(", ").join(sql.Identifier(c) for c in columns),
    )
    with conn.cursor(name="backfill_encoding_scan") as cur:
        cur.itersize = 5000
        cur.execute(stmt)
        for row in cur:
            key, values = row[: len(keys)], row[len(keys) :]
            for column, raw in zip(check, values):
                why = None if raw is None else _storable(bytes(raw), codec)
                if why:
                    return column, key, why
    return None
