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

The descriptor stays small whatever the batch size: regular calendar chunks travel as
``{start, end, granularity}`` and are re-cut at run time (the cut is pure and deterministic); irregular
chunks (auto-sized, key ranges) as their list of edges.
"""

from __future__ import annotations

import math


from airflow_backfill_provider.chunks import GRANULARITIES, Chunk, iter_chunks, parse_datetime, split_at, to_datetime
from airflow_backfill_provider.exceptions import PlanError
from airflow_backfill_provider.spec import BackfillSpec


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
        first, last = part[0], part[-1]
        body: dict = {"reprocess": bool(reprocess)}
        if granularity in GRANULARITIES and not first.keyed:
            body.update(start=first.start.isoformat(), end=last.end.isoformat(), granularity=granularity)
        elif first.keyed:
            body.update(
                start=first.start.isoformat(),
                end=first.end.isoformat(),
                key=first.key_column,
                runs=_runs(part, lambda c: c.key_lo, lambda c: c.key_hi),
            )
        else:
            body.update(runs=_runs(part, lambda c: c.start.isoformat(), lambda c: c.end.isoformat()))
        out.append({"chunk_id": f"{first.chunk_id} .. {last.chunk_id} ({len(part)})", "batch": body})
    return out


def _runs(part: list[Chunk], lo, hi) -> list[list]:
    """Contiguous runs of chunks as edge lists: [[e0, e1, ..., ek], ...] (chunks skipped as done split runs)."""
    runs: list[list] = []
    for c in part:
        if runs and runs[-1][-1] == lo(c):
            runs[-1].append(hi(c))
        else:
            runs.append([lo(c), hi(c)])
    return runs


def is_batch(descriptor: dict) -> bool:
    return isinstance(descriptor, dict) and "batch" in descriptor


def expand(descriptor: dict, spec: BackfillSpec) -> list[Chunk]:
    """The chunks of a batch descriptor, in order ."""
    from airflow_backfill_provider import keyranges, sizing

    try:
        body = descriptor["batch"]
        if "granularity" in body:
            chunks = list(iter_chunks(body["start"], body["end"], body["granularity"], spec.timezone))
            bounds = [to_datetime(h.until, spec.timezone, what="historical.until") for h in spec.historical]
            return split_at(chunks, bounds) if bounds else chunks
        if "key" in body:
            lo, hi = parse_datetime(body["start"]), parse_datetime(body["end"])
            col = str(body["key"])
            return [
                Chunk(keyranges.label(col, a, b), lo, hi, col, a, b)
                for run in body["runs"]
                for a, b in zip(run, run[1:])
            ]
        out = []
        for run in body["runs"]:
            edges = [parse_datetime(e).in_timezone(spec.timezone) for e in run]
            out += [Chunk(sizing._label(a, b), a, b) for a, b in zip(edges, edges[1:])]
        return out
    except (KeyError, TypeError, ValueError) as err:
        raise PlanError(f"bad batch descriptor {descriptor!r}: {err}") from err


def loggable(chunks: list[Chunk], head: int = 50) -> list[Chunk]:
    """Every chunk when few; else the first and last ``head`` (the ledger and batch logs have them all)."""
    return chunks if len(chunks) <= 2 * head else [*chunks[:head], *chunks[-head:]]
