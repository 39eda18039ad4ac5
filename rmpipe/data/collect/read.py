"""Collect, reading: a batch file -> chunks of rows, so a batch of any size costs the memory of a chunk.

A `Chunk` holds up to `chunk_rows` consecutive rows with their line (JSONL) or record (CSV,
Parquet, dataset folder) numbers. Rows that a column reader could parse come as an Arrow
table (the candidates for `collect.fast`); every row can also be had as a record (a dict, or
the `Bad` that says why it cannot be read) for the per-row path, with its raw form for the
quarantine. Chunk boundaries change nothing: a chunk is cut at whole lines / records.

  JSONL    blocks of lines; pyarrow.json parses the lines orjson reads as objects (a chat-message prompt
           as its JSON text; a block it refuses goes row by row through orjson). A BOM is taken only as
           the file's first bytes.
  CSV      pyarrow's streaming CSV reader; from the first record it refuses, the csv module reads
           the rest record by record so each bad record gets its own reason
  Parquet  row groups via ParquetFile.iter_batches
  folders  rmpipe.data.collect.hf_batches rows (datasets), row by row
"""

from __future__ import annotations

import bisect
import csv
import io
import itertools
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from rmpipe.data.collect import hf_batches
from rmpipe.data.collect.fields import BOM, RAW_MAX_CHARS, Bad, type_name

UNREADABLE = (OSError, pa.ArrowException, ValueError, UnicodeError)  # hf_batches.UnreadableDataset is a ValueError


@dataclass
class Chunk:
    lines: list[int]  # line / record number of each row
    record: Callable[[int], tuple[Any, Any]]  # row i -> (record or Bad, raw), for the per-row path
    table: pa.Table | None = None  # some rows as columns, for the fast path
    table_rows: list[int] = field(default_factory=list)  # which rows of the chunk `table` holds, in order
    nulls_may_be_absent: bool = False  # JSONL: a null in `table` may stand for a key the line lacks


# ---------------------------------------------------------------------------------------------- JSONL


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value (write null, or the number as a string)")


def _json_problem(raw: bytes, refused: orjson.JSONDecodeError) -> Bad:
    """Why orjson refused a line, in words (the stdlib parser gives the friendlier message). Numbers are
    left as text (a 5,000-digit integer would trip Python's int limit)."""
    if b"\x00" in raw:
        return Bad("nul_character", f"line contains a NUL byte at byte {raw.index(0)}")
    if "depth limit exceeded" in str(refused):
        return Bad("nested_too_deeply", "line nests lists/objects more than 1,024 deep")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Bad("invalid_utf8", f"not valid UTF-8 at byte {exc.start} of the line (0x{raw[exc.start]:02x})")
    try:
        json.loads(text, parse_int=str, parse_float=str, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        return Bad("invalid_json", f"line is not valid JSON: {exc.msg.removesuffix(' at')} at column {exc.colno}")  # msg may end in "at"
    except RecursionError:
        return Bad("nested_too_deeply", "line nests lists/objects too deeply to read")
    except ValueError as exc:  # NaN / Infinity (see _no_constant)
        return Bad("invalid_json", f"line is not valid JSON: {exc}")
    words = str(refused).split(": line ")[0]
    if "number" in words:  # e.g. thousands of digits: infinite as a 64-bit float
        return Bad("invalid_json", f"line is not valid JSON: {words} (a number out of range: send it as a string)")
    return Bad("invalid_json", f"line is not valid JSON: {words}")


def jsonl_record(raw: bytes) -> tuple[Any, bytes]:
    """One JSONL line -> (record or Bad, raw line). A byte order mark is only taken as the file's first
    bytes (`jsonl_chunks` drops it there); anywhere else it makes the line a bad row, whatever chunk it is in."""
    at = raw.find(BOM)
    if at >= 0:
        return Bad("stray_bom", f"line holds a UTF-8 byte order mark (bytes EF BB BF) at byte {at}: only a "
                                "file's very first bytes may be one; remove it"), raw
    try:
        rec = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return _json_problem(raw, exc), raw
    if not isinstance(rec, dict):
        return Bad("not_an_object", f"line is a JSON {type_name(rec)}, not an object of fields"), raw
    return rec, raw


def _json_table(raws: list[bytes]) -> pa.Table | None:
    """The lines parsed as one table by pyarrow, or None when it refuses them or reads another row count
    (every line is one JSON object here, so each reads as at least one row: equal counts, one row each)."""
    data = b"".join(raw if raw.endswith(b"\n") else raw + b"\n" for raw in raws)
    try:
        table = pa_json.read_json(io.BytesIO(data), read_options=pa_json.ReadOptions(block_size=len(data) + 1))
    except (pa.ArrowException, ValueError, UnicodeError):
        return None
    return table if table.num_rows == len(raws) else None


def _jsonl_chunk(block: list[bytes], first_line: int) -> Chunk:
    """pyarrow reads only the lines the per-row path reads as an object: it takes what orjson refuses (bytes
    that are not UTF-8 and decode later, a BOM at a block's start, two objects on a line, NaN, numbers too
    big for a double) and crashes on some (a block of `null` lines, deep nesting), so what it would make of
    them must never decide a row. The row path gives those lines their reasons."""
    lines, raws = [], []
    for offset, raw in enumerate(block):
        if not raw.isspace():  # a blank line holds no row
            lines.append(first_line + offset)
            raws.append(raw)
    with_bom = _lines_holding(raws, BOM)
    columnar, as_read = [], {}  # lines pyarrow reads; line -> what it reads (a chat prompt as JSON text)
    for i, raw in enumerate(raws):
        rec = None if i in with_bom else orjson_or_none(raw)
        if type(rec) is not dict:
            continue
        prompt = rec.get("prompt")
        if type(prompt) is list:
            if not (prompt and all(isinstance(m, dict) for m in prompt)):
                continue  # an empty list, or one holding a non-object, reads differently as text: the row path
            as_read[i] = _chat_prompt_as_text(rec, prompt)
        columnar.append(i)
    table = _json_table([as_read.get(i, raws[i]) for i in columnar]) if columnar else None
    return Chunk(lines, lambda i: jsonl_record(raws[i]), table, columnar if table is not None else [], True)


def _chat_prompt_as_text(rec: dict, prompt: list) -> bytes:
    """A line whose prompt is a list of chat messages, with the prompt as its JSON text (a column of one
    type). schema.to_messages reads that text back as the same messages, so the fast path judges it as
    the per-row path judges the list; a row it refuses (e.g. the text is over max_field_chars where the
    messages are not) goes to the per-row path as delivered."""
    return orjson.dumps({**rec, "prompt": orjson.dumps(prompt).decode()})


def _lines_holding(raws: list[bytes], mark: bytes) -> set[int]:
    """Which lines hold `mark` (a non-ASCII mark: an ASCII block is skipped at once)."""
    data = b"".join(raws)
    if data.isascii():
        return set()
    starts = list(itertools.accumulate((len(raw) for raw in raws), initial=0))
    found, at = set(), data.find(mark)
    while at >= 0:
        found.add(bisect.bisect_right(starts, at) - 1)
        at = data.find(mark, at + 1)
    return found


def orjson_or_none(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None


def jsonl_chunks(path: Path, chunk_rows: int) -> Iterator[Chunk]:
    """Blocks of `chunk_rows` lines; a UTF-8 BOM as the file's first bytes is dropped (the only place one is taken)."""
    with path.open("rb") as fh:
        first_line = 1
        while block := list(itertools.islice(fh, chunk_rows)):
            if first_line == 1 and block[0].startswith(BOM):
                block[0] = block[0][len(BOM):]
            yield _jsonl_chunk(block, first_line)
            first_line += len(block)


# ---------------------------------------------------------------------------------------------- CSV


def _bad_utf8_field(header: list[str], row: list[str]) -> Bad | None:
    """CSV is decoded with surrogateescape: a bad byte survives as a lone surrogate we can point at."""
    for name, value in zip(header, row):
        if not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as exc:
                byte = ord(value[exc.start]) - 0xDC00
                return Bad("invalid_utf8", f"field '{name}' is not valid UTF-8 (byte 0x{byte:02x} at char {exc.start})")
    return None


def _csv_records(path: Path, names: list[str], skip: int) -> Iterator[tuple[int, Any, Any]]:
    """(record number, record or Bad, raw) after the first `skip` records, read by the csv module."""
    previous_limit = csv.field_size_limit()
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # our own max_field_chars check gives the better message
    try:
        with path.open("r", encoding="utf-8-sig", errors="surrogateescape", newline="") as fh:
            reader = csv.reader(fh)
            next(reader, None)  # the header
            record = 0
            while True:
                try:
                    row = next(reader)
                except StopIteration:
                    return
                except csv.Error as exc:
                    record += 1
                    if record > skip:
                        yield record, Bad("malformed_csv", f"CSV record is malformed: {exc}"), None
                    continue
                if not row:
                    continue  # a blank line holds no record
                record += 1
                if record <= skip:
                    continue
                if len(row) != len(names):
                    yield record, Bad("malformed_csv", f"record has {len(row)} fields but the header has {len(names)}"), row
                    continue
                stray = next((_stray_bom_in(name) for name, value in zip(names, row) if "\ufeff" in value), None)
                yield record, _bad_utf8_field(names, row) or stray or dict(zip(names, row)), row
    finally:
        csv.field_size_limit(previous_limit)


def _arrow_chunks(batches: Iterable[pa.RecordBatch], names: list[str] | None, chunk_rows: int,
                  done: list[int], stray_bom: bool = False) -> Iterator[Chunk]:
    """Chunks of at most `chunk_rows` rows from record batches; `done[0]` counts the rows handed out.
    Rows holding a bad value (`_bad_values`) are left out of the chunk's table: the row path reports them."""
    for batch in batches:
        for start in range(0, batch.num_rows, chunk_rows):
            table = pa.Table.from_batches([batch.slice(start, chunk_rows)])
            if names is not None:
                table = table.rename_columns(names)
            first = done[0] + 1
            done[0] += table.num_rows
            bad = _bad_values(table, stray_bom)
            good = [i for i in range(table.num_rows) if i not in bad]
            fast_table = table if not bad else table.take(pa.array(good, pa.int64())) if good else None
            yield Chunk(list(range(first, first + table.num_rows)), _table_record(table, bad), fast_table,
                        good if fast_table is not None else [])


def _bad_values(table: pa.Table, stray_bom: bool) -> dict[int, Bad]:
    """Rows holding text that is not valid UTF-8 (a Parquet reader does not check; decoding it later would
    fail) and, with `stray_bom` (a CSV, read past its first bytes), a byte order mark."""
    bad: dict[int, Bad] = {}
    for name in table.column_names:
        column = table[name]
        try:
            column.validate(full=True)
        except pa.ArrowInvalid:
            for i in range(len(column)):
                try:
                    column.slice(i, 1).to_pylist()
                except UnicodeDecodeError as exc:
                    byte = exc.object[exc.start]
                    bad.setdefault(i, Bad("invalid_utf8", f"field '{name}' is not valid UTF-8 (byte 0x{byte:02x})"))
        if stray_bom and pa.types.is_string(column.type):
            for i in np.flatnonzero(np.asarray(pc.fill_null(pc.match_substring(column, "\ufeff"), False))).tolist():
                bad.setdefault(i, _stray_bom_in(name))
    return bad


def _stray_bom_in(name: str) -> Bad:
    return Bad("stray_bom", f"field '{name}' holds a UTF-8 byte order mark (bytes EF BB BF): only a file's very "
                            "first bytes may be one; remove it")


def _raw_row(table: pa.Table, i: int) -> dict[str, Any]:
    """Row i as delivered, for the quarantine: text that is not UTF-8 shown with \\xNN escapes."""
    row = {}
    for name in table.column_names:
        cell = table[name].slice(i, 1)
        try:
            row[name] = cell.to_pylist()[0]
        except UnicodeDecodeError:
            try:
                row[name] = cell.cast(pa.binary()).to_pylist()[0].decode("utf-8", "backslashreplace")
            except pa.ArrowException:  # nested: no single text to show
                row[name] = "<not valid UTF-8>"
    return row


RECORD_BLOCK = 256  # rows made Python records at once when read row after row (~3 us a row; one alone ~27 us)


def _table_record(table: pa.Table, bad: dict[int, Bad]) -> Callable[[int], tuple[Any, Any]]:
    """Row i as a dict, for the per-row path (a row in `bad`: its reason). Rows asked for one after another
    (a chunk the fast path left whole: another shape) are made a block at a time; a row asked for alone
    (the few a vote chunk leaves) is made alone, so a scattered handful never costs whole blocks."""
    block_start, block, following = -1, [], -1  # the block of records made; the row after the last asked for

    def record(i: int) -> tuple[Any, Any]:
        nonlocal block_start, block, following
        if bad:  # no blocks: a block holding a bad row cannot be made
            return (bad[i], _raw_row(table, i)) if i in bad else (table.slice(i, 1).to_pylist()[0],) * 2
        start = i - i % RECORD_BLOCK
        if start != block_start and i == following:
            block_start, block = start, table.slice(start, RECORD_BLOCK).to_pylist()
        following = i + 1
        rec = block[i - start] if start == block_start else table.slice(i, 1).to_pylist()[0]
        return rec, rec
    return record


def csv_chunks(path: Path, chunk_rows: int) -> Iterator[Chunk]:
    """Records numbered from 1 (header excluded); quoted fields may hold newlines, quotes and commas."""
    with path.open("r", encoding="utf-8-sig", errors="surrogateescape", newline="") as fh:
        header = next(csv.reader(fh), None)
    if not header:
        return
    names = [name.strip() for name in header]
    done = [0]
    if len(set(header)) == len(header) and len(set(names)) == len(names):
        try:
            reader = pa_csv.open_csv(
                path,
                read_options=pa_csv.ReadOptions(block_size=min(max(chunk_rows * 2048, 1 << 12), 1 << 26)),
                parse_options=pa_csv.ParseOptions(newlines_in_values=True),
                convert_options=pa_csv.ConvertOptions(column_types={name: pa.string() for name in header},
                                                      strings_can_be_null=False, quoted_strings_can_be_null=False))
            yield from _arrow_chunks(reader, names, chunk_rows, done, stray_bom=True)
            return
        except pa.ArrowInvalid:
            pass  # from the first block pyarrow refuses on, record by record
    yield from row_chunks(_csv_records(path, names, skip=done[0]), chunk_rows)


# ---------------------------------------------------------------------------------------------- Parquet, folders


def parquet_chunks(path: Path, chunk_rows: int) -> Iterator[Chunk]:
    """Row index + 1; list<struct<role, content>> prompt columns arrive as message lists (row path)."""
    yield from _arrow_chunks(pq.ParquetFile(path).iter_batches(batch_size=chunk_rows), None, chunk_rows, [0])


def row_chunks(rows: Iterator[tuple[int, Any, Any]], chunk_rows: int) -> Iterator[Chunk]:
    """Chunks from a (number, record or Bad, raw) iterator; a read error comes after the rows before it."""
    buffer: list[tuple[int, Any, Any]] = []

    def chunk(items: list[tuple[int, Any, Any]]) -> Chunk:
        return Chunk([n for n, _, _ in items], lambda i: items[i][1:])

    try:
        for item in rows:
            buffer.append(item)
            if len(buffer) == chunk_rows:
                yield chunk(buffer)
                buffer = []
    except UNREADABLE:
        if buffer:
            yield chunk(buffer)
        raise
    if buffer:
        yield chunk(buffer)


def chunks(path: Path, fmt: str, chunk_rows: int, hf_split: str) -> Iterator[Chunk]:
    if path.is_dir():
        return row_chunks(hf_batches.read_rows(path, fmt, hf_split), chunk_rows)
    return {"jsonl": jsonl_chunks, "csv": csv_chunks, "parquet": parquet_chunks}[fmt](path, chunk_rows)


def raw_text(raw: Any) -> str | None:
    """The row as delivered, for a person to fix: the JSONL line, or the CSV/Parquet record as JSON."""
    if raw is None:
        return None
    if isinstance(raw, bytes):
        text = raw.decode("utf-8", errors="backslashreplace").rstrip("\r\n")
    else:
        text = json.dumps(raw, ensure_ascii=False, default=str)
        try:  # CSV bytes that were not UTF-8 survive as lone surrogates: show them as \xNN escapes
            text = text.encode("utf-8", errors="surrogateescape").decode("utf-8", errors="backslashreplace")
        except UnicodeEncodeError:
            text = text.encode("utf-8", errors="backslashreplace").decode("utf-8")
    if len(text) > RAW_MAX_CHARS:
        return f"{text[:RAW_MAX_CHARS]}... [{len(text) - RAW_MAX_CHARS} more chars]"
    return text
