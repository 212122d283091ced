"""Any number of chunks from one trigger: batches of chunks per mapped task instance when they do not fit.

Airflow caps a mapped task at ``[core] max_map_length`` (1024) instances, and a grid of thousands of
instances is slow to draw and to scan. Up to ``max_mapped_chunks`` chunks (default 1024) the design
card's shape holds: one mapped task instance per chunk. Above it, the plan maps over at most
``max_batches`` (default 256) *batches*: consecutive chunks, labelled by their range
(``2023-01-01T00:00+00:00 .. 2023-01-03T20:00+00:00 (69)``). A batch runs its chunks in order, each in its
own destination transaction with its own ledger row, exactly as a mapped chunk would. So:

- a failure mid-batch keeps the chunks already committed; the batch fails (after trying the rest of
  its chunks when the failure was permanent, e.g. a bad value in one hour) and names the failed chunks;
- clearing (or retrying) the batch reruns only the chunks the ledger does not hold: a failed hour is
  retried alone, without reloading its 68 neighbours;
- every chunk stays visible: in the ledger (one row each), and in the batch's log (one line each).

A batch descriptor carries every chunk's exact edges, so :func:`expand` returns exactly the chunks the
plan made (historical splits, key ranges, chunks skipped as done all included), and stays small: the
distinct time edges as epoch seconds, delta- and run-length-encoded (``[t0, [3600, 68]]`` for 69 hours);
the chunks as indexes into them (runs of consecutive time chunks as ``[i, n]``, key chunks as
``[i, j, key_lo, key_hi]``); chunk ids only where they differ from the label the edges give.
A single chunk's descriptor decodes through the same :func:`expand` (a batch of one).
"""

from __future__ import annotations

import math
from collections import Counter

import pendulum

from airflow_backfill_provider.plan import keyranges, sizing
from airflow_backfill_provider.core.chunks import GRANULARITIES, Chunk, iter_chunks, parse_datetime, utc
from airflow_backfill_provider.core.exceptions import PlanError
from airflow_backfill_provider.core.spec import BackfillSpec


def batch_size(spec: BackfillSpec, n: int) -> int:
    return max(1, math.ceil(n / spec.max_batches))


def descriptors(spec: BackfillSpec, chunks: list[Chunk], *, granularity: str, reprocess: bool = False) -> list[dict]:
    """What the plan maps over: one descriptor per chunk when they fit, else one per batch."""
    if len(chunks) <= spec.max_mapped_chunks:
        return [c.to_descriptor() for c in chunks]
    size = batch_size(spec, len(chunks))
    out = []
    for i in range(0, len(chunks), size):
        part = chunks[i : i + size]
        body = encode(part, granularity, spec.timezone)
        body["reprocess"] = bool(reprocess)
        out.append({"chunk_id": f"{part[0].chunk_id} .. {part[-1].chunk_id} ({len(part)})", "batch": body})
    return out


def is_batch(descriptor: dict) -> bool:
    return isinstance(descriptor, dict) and "batch" in descriptor


def encode(chunks: list[Chunk], granularity: str, tz: str) -> dict:
    """The batch body of ``chunks`` (see the module docstring); ``decode`` gives them back exactly."""
    keyed = {c.key_column for c in chunks}
    if len(keyed) != 1:
        raise PlanError("a batch holds either time chunks or key chunks of one key column")
    col = keyed.pop()
    instants = sorted({utc(e) for c in chunks for e in (c.start, c.end)})
    index = {e: i for i, e in enumerate(instants)}
    body: dict = {"g": granularity}
    if all(e.microsecond == 0 for e in instants):
        seconds = [int(e.timestamp()) for e in instants]
        body["t"] = [seconds[0], *_rle([b - a for a, b in zip(seconds, seconds[1:])])]
    else:  # sub-second edges (a user's range): exact ISO text
        body["ts"] = [e.isoformat() for e in instants]
    spans = [(index[utc(c.start)], index[utc(c.end)], c.key_lo, c.key_hi) for c in chunks]
    if col is None:
        runs: list[list[int]] = []
        for i, j, _, _ in spans:
            if j != i + 1:  # time chunks of one batch never overlap: no edge falls inside one
                raise PlanError(f"overlapping time chunks in one batch: {chunks!r}")
            if runs and runs[-1][0] + runs[-1][1] == i:
                runs[-1][1] += 1
            else:
                runs.append([i, 1])
        body["c"] = runs
    else:
        body["key"] = col
        body["c"] = [list(s) for s in spans]
    # ids only where the edges do not give them (e.g. a historical split, a key plan's first range)
    plain = _labels(decode_edges(body, tz), body, tz)
    ids = {str(k): c.chunk_id for k, (c, label) in enumerate(zip(chunks, plain)) if c.chunk_id != label}
    if ids:
        body["ids"] = ids
    return body


def expand(descriptor: dict, spec: BackfillSpec) -> list[Chunk]:
    """The chunks of a descriptor, in the plan's order: a batch's, or a single chunk's (a batch of one)."""
    if not is_batch(descriptor):
        return [Chunk.from_descriptor(descriptor, spec.timezone)]
    try:
        body = descriptor["batch"]
        spans = decode_edges(body, spec.timezone)
        labels = _labels(spans, body, spec.timezone)
        ids = body.get("ids") or {}
        col = body.get("key")
        return [
            Chunk(str(ids.get(str(k), label)), a, b, col, lo, hi)
            for k, ((a, b, lo, hi), label) in enumerate(zip(spans, labels))
        ]
    except (KeyError, TypeError, ValueError, IndexError) as err:
        raise PlanError(f"bad batch descriptor {descriptor!r}: {err}") from err


def decode_edges(body: dict, tz: str) -> list[tuple]:
    """(start, end, key_lo, key_hi) of each chunk of a batch body, in order."""
    if "t" in body:
        t0, *deltas = body["t"]
        seconds = [int(t0)]
        for d in deltas:
            step, n = (d, 1) if isinstance(d, int) else d
            seconds += [seconds[-1] + int(step) * (k + 1) for k in range(int(n))]
        edges = [pendulum.from_timestamp(s, tz=tz) for s in seconds]
    else:
        edges = [parse_datetime(e).in_timezone(tz) for e in body["ts"]]
    if "key" in body:
        return [(edges[i], edges[j], lo, hi) for i, j, lo, hi in body["c"]]
    return [(edges[i + k], edges[i + k + 1], None, None) for i, n in body["c"] for k in range(n)]


def _rle(deltas: list[int]) -> list:
    """[3600, 3600, 3600, 7200] -> [[3600, 3], 7200]."""
    out: list = []
    for d in deltas:
        if out and isinstance(out[-1], list) and out[-1][0] == d:
            out[-1][1] += 1
        elif out and out[-1] == d:
            out[-1] = [d, 2]
        else:
            out.append(d)
    return out


def _labels(spans: list[tuple], body: dict, tz: str) -> list[str]:
    """The label each chunk's edges give: a key range's (with ``@start`` when the batch holds it split in
    time, as chunks.split_at names it), a calendar period's or piece's, or an auto-sized range's."""
    col = body.get("key")
    if col is not None:
        split = Counter((lo, hi) for _, _, lo, hi in spans)
        return [
            keyranges.label(col, lo, hi) + (f"@{a.format('YYYY-MM-DDTHH:mm')}" if split[(lo, hi)] > 1 else "")
            for a, _, lo, hi in spans
        ]
    g = body.get("g")
    if not spans:
        return []
    lo, hi = min((a for a, *_ in spans), key=utc), max((b for _, b, *_ in spans), key=utc)
    # one cut of the batch's whole span labels its calendar chunks (a cut per chunk costs 30x more)
    whole = {
        (utc(c.start), utc(c.end)): c.chunk_id for c in iter_chunks(lo, hi, g if g in GRANULARITIES else "day", tz)
    }
    out = []
    for a, b, _, _ in spans:
        label = whole.get((utc(a), utc(b)))
        if label is None:  # a piece of a period (a user's range edge); with auto: an hour of a busy day
            piece = next(iter_chunks(a, b, g if g in GRANULARITIES else "hour", tz))
            label = piece.chunk_id if utc(piece.end) == utc(b) else sizing._label(a, b)
        out.append(label)
    return out


def loggable(chunks: list[Chunk], head: int = 50) -> list[Chunk]:
    """Every chunk when few; else the first and last ``head`` (the ledger and batch logs have them all)."""
    return chunks if len(chunks) <= 2 * head else [*chunks[:head], *chunks[-head:]]
