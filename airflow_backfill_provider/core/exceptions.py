"""Small, documented exception classes. Each says what to fix."""

from __future__ import annotations


class BackfillError(Exception):
    """Base class for every error raised by this provider."""


class SpecError(BackfillError, ValueError):
    """The backfill spec (YAML or Python) is invalid. The message names the key and the valid choices."""


class PlanError(BackfillError, ValueError):
    """A date range cannot be cut into chunks (end <= start, too many chunks, bad dates)."""


class PermanentChunkError(BackfillError):
    """A chunk cannot succeed by retrying (missing table/column, no unique key, bad cast). Not retried."""


class TransientChunkError(BackfillError):
    """A chunk failed for a reason that a retry may fix (connection lost, serialization failure, timeout)."""


class CriticalLoadError(PermanentChunkError):
    """The source is above its critical load threshold: the chunk stops at once and is not retried."""


class ValidationFailed(BackfillError):
    """Source and destination differ by more than the fail threshold."""


class ValidationTimeout(BackfillError):
    """A validation statement ran past ``statement_timeout_s``: it would again on retry. Not retried."""


class WatermarkError(BackfillError):
    """The requested range crosses the live-ingest watermark and the spec says to refuse."""
