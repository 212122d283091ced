"""Interrupts are not errors: a chunk rolls back and re-raises them unchanged, so Airflow retries.

An interrupt is anything that is not an ``Exception`` (KeyboardInterrupt from the supervisor's SIGINT,
SystemExit, Airflow's ``AirflowTaskTimeout`` from ``execution_timeout`` and ``AirflowTaskTerminated``
from SIGTERM on 2.11: BaseException subclasses), plus Airflow's timeout/terminate classes by name.
Classifying one as a database error would turn worker shutdown into a failure without retry.
"""

from __future__ import annotations

import signal

#: the signals that interrupt a chunk: SIGTERM (worker shutdown), SIGINT, SIGALRM (execution_timeout)
_INTERRUPT_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGALRM}


class ChunkTerminated(BaseException):
    """The worker asked a running chunk to stop (SIGTERM on Airflow 3). Not an Exception, like Airflow's own
    interrupts, so no ``except Exception`` on the way swallows it; Airflow retries the task."""


def leave_signals_to_main_thread() -> None:
    """Block the interrupt signals in the calling helper thread, so the kernel delivers them to the main thread.

    Python runs signal handlers in the main thread only, and only once its blocking system call returns. A
    process-directed signal that the kernel hands to a helper thread instead (the COPY writer, blocked in libpq,
    which retries on EINTR) interrupts nothing: the main thread stays blocked on the pipe until the source sends
    more rows, which a slow or sleeping source may not do for minutes.
    """
    if hasattr(signal, "pthread_sigmask"):  # POSIX; elsewhere there is nothing to choose
        signal.pthread_sigmask(signal.SIG_BLOCK, _INTERRUPT_SIGNALS)


def is_interrupt(err: BaseException) -> bool:
    if not isinstance(err, Exception):
        return True
    try:  # the Airflow classes, wherever this Airflow version defines them (compat is the only version switch)
        from airflow_backfill_provider.core.compat import INTERRUPTS
    except ImportError:  # used without Airflow (scripts, benchmarks): nothing more to recognise
        return False
    return isinstance(err, INTERRUPTS)


class InterruptCatchingReader:
    """A file for ``copy_expert(COPY ... FROM STDIN)`` that remembers an interrupt raised inside ``read``.

    psycopg2 turns any exception raised by ``read()`` into ``QueryCanceled: COPY from stdin failed`` (SQLSTATE
    57014), which would hide an execution_timeout or SIGTERM behind a database error. The caller re-raises
    :attr:`interrupt` instead.
    """

    def __init__(self, raw) -> None:
        self.raw = raw
        self.interrupt: BaseException | None = None

    def read(self, size: int = -1) -> bytes:
        try:
            return self.raw.read(size)
        except BaseException as err:
            if is_interrupt(err) and self.interrupt is None:
                self.interrupt = err
            raise

    def close(self) -> None:
        self.raw.close()
