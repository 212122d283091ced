"""The COPY pipe: ``COPY (SELECT ...) TO STDOUT`` on the source streamed into ``COPY ... FROM STDIN`` on the
destination through an OS pipe, a writer thread on the source side.

Memory is flat whatever the row count: rows are never in Python lists, only in the pipe's buffers.
"""

from __future__ import annotations

import os
import select
import threading

from airflow_backfill_provider.core.exceptions import TransientChunkError
from airflow_backfill_provider.core.interrupts import (
    InterruptCatchingReader,
    is_interrupt,
    leave_signals_to_main_thread,
)

_PIPE_BUFFER = 1 << 20  # 1 MiB user-space buffer on each side of the pipe: few syscalls, flat memory
_WAKE_MS = 200  # longest the main thread blocks on the pipe before it looks at pending signals again


class _PipeReader:
    """The pipe's read end for ``copy_expert``: waits for rows in slices of at most ``_WAKE_MS``.

    Python runs a signal's handler (SIGTERM, execution_timeout's SIGALRM) in the main thread, when a system
    call returns EINTR or at its next bytecode check. A signal that lands in the instant between that check and
    a blocking ``read()`` would wait until rows arrive, i.e. as long as the source stalls (seen: a SIGTERM
    ignored for the 120 s of a sleeping source). Waiting in bounded slices handles it within ``_WAKE_MS``.
    """

    def __init__(self, fd: int, gate=None) -> None:
        self.fd = fd
        self.gate = gate
        self._poll = select.poll()
        self._poll.register(fd, select.POLLIN)

    def read(self, size: int = -1) -> bytes:
        if self.gate is not None:
            # paused: the pipe is not drained, so the writer blocks on it and the source backend on its socket
            self.gate.hold(_WAKE_MS / 1000)
        while not self._poll.poll(_WAKE_MS):  # data, end of stream (POLLHUP) or an error: readable
            pass  # back in the interpreter: a pending signal's handler runs here (the loop's bytecode check)
        return os.read(self.fd, size if size > 0 else _PIPE_BUFFER)

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)


def _widen(fd: int) -> None:
    """Grow the pipe to the buffer size (Linux), so one read takes up to 1 MiB of COPY data, not 64 KiB."""
    try:
        import fcntl

        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, _PIPE_BUFFER)
    except (ImportError, AttributeError, OSError):  # not Linux, or above /proc/sys/fs/pipe-max-size: default size
        pass


class _Writer(threading.Thread):
    """Runs the source COPY TO into the pipe; stores its error for the main thread to raise."""

    def __init__(self, cursor, statement, fd: int):
        super().__init__(daemon=True, name="backfill-copy-out")
        self.cursor, self.statement, self.fd = cursor, statement, fd
        self.error: BaseException | None = None
        self.rows = -1

    def run(self):
        leave_signals_to_main_thread()  # the main thread, blocked reading the pipe, must see SIGTERM/SIGALRM
        out = os.fdopen(self.fd, "wb", buffering=_PIPE_BUFFER)
        try:
            self.cursor.copy_expert(self.statement, out, size=_PIPE_BUFFER)
            self.rows = self.cursor.rowcount
        except BaseException as err:  # noqa: BLE001 - re-raised by the main thread
            self.error = err  # recorded BEFORE the pipe closes: the reader's EOF never outruns the error
        finally:
            try:
                out.close()
            except BaseException as err:  # noqa: BLE001 - e.g. EPIPE when the reader is gone
                self.error = self.error or err


def stream_copy(src_conn, dst_cur, copy_out_sql, copy_in_sql, *, gate=None) -> tuple[int, int]:
    """Pipe the source COPY into the destination COPY; returns (rows read, rows written).

    ``gate``: an object whose ``hold(slice_s)`` returns when the read may go on (throttle.ReadWatch): it is
    called before each read of the pipe, and while it holds nothing drains the pipe, so the source's COPY
    stops at its socket (backpressure). It waits in slices of at most ``slice_s`` (a pending signal's handler
    runs between two), and is started before the stream and stopped after it, on every path."""
    if gate is not None:
        gate.start()
    try:
        r, w = os.pipe()
        _widen(w)
        writer = _Writer(src_conn.cursor(), copy_out_sql, w)
        return _stream(writer, r, dst_cur, src_conn, copy_in_sql, gate)
    finally:
        if gate is not None:
            gate.stop()


def _stream(writer, r, dst_cur, src_conn, copy_in_sql, gate) -> tuple[int, int]:
    writer.start()
    reader = InterruptCatchingReader(_PipeReader(r, gate))
    try:
        dst_cur.copy_expert(copy_in_sql, reader, size=_PIPE_BUFFER)
        reader.close()
        writer.join()
    except BaseException as err:
        # If the source failed first (e.g. statement_timeout before the first row), the destination only
        # saw a cut stream ("COPY file signature not recognized"): the source's error is the real one.
        source_error = writer.error
        reader.close()  # writer then fails with EPIPE instead of blocking forever
        try:
            src_conn.cancel()
        except Exception:  # noqa: BLE001 - best effort; the connection is closed by the caller
            pass
        writer.join(timeout=30)
        # an interrupt (execution_timeout, SIGTERM) inside read() reaches us as QueryCanceled: raise the interrupt
        interrupt = reader.interrupt or (err if is_interrupt(err) else None)
        if interrupt is not None:
            raise interrupt from None  # the driver error that wraps it is noise
        if source_error is not None:
            raise source_error from err
        raise
    if writer.error is not None:
        # A source that died mid-stream can look like a clean EOF to the destination COPY: never commit then.
        raise writer.error
    written = dst_cur.rowcount
    if writer.rows >= 0 and written >= 0 and writer.rows != written:
        raise TransientChunkError(f"source sent {writer.rows} rows but staging received {written}; not committed")
    return writer.rows, written
