"""A signal reaches the chunk while it waits on the COPY pipe, however the kernel delivers it.

Python runs signal handlers in the main thread only, when a system call returns EINTR or at a bytecode
check. A signal that trips the handler flag without interrupting the main thread's blocking read (it
landed on another thread, or just before the read began) used to wait until the source sent more rows:
a SIGTERM was ignored for the 120 s of a sleeping source (tests/faults/test_interrupts.py, 1 run in 40).
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from airflow_backfill_provider.transfer import pipe
from airflow_backfill_provider.core.interrupts import InterruptCatchingReader

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="Linux: thread masks and /proc")


class _Stop(BaseException):
    pass


def _until_asleep(tid: int, timeout: float = 30) -> None:
    """Wait until thread ``tid`` is blocked in a system call (state S in /proc), at most ``timeout`` s."""
    deadline = time.monotonic() + timeout
    stat = f"/proc/self/task/{tid}/stat"
    while time.monotonic() < deadline:
        with open(stat) as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "S":
                return
        time.sleep(0.01)


def test_a_signal_tripped_elsewhere_interrupts_the_wait_on_an_empty_pipe():
    r, w = os.pipe()
    reader = InterruptCatchingReader(pipe._PipeReader(r))
    closed, reading, ended = threading.Event(), threading.Event(), threading.Event()
    handled: list[bool] = []  # per run of the handler: had the stream already ended?

    def _raise(signum, frame):
        handled.append(ended.is_set())
        raise _Stop

    def signal_then_end_the_stream():
        # this thread takes SIGUSR2 (the main thread blocks it): the handler's flag is tripped while the main
        # thread sits in its read, which the kernel does not interrupt
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR2})  # threads inherit the creator's mask
        reading.wait(30)
        _until_asleep(threading.main_thread().native_id)  # the main thread is inside the read now
        os.kill(os.getpid(), signal.SIGUSR2)
        closed.wait(30)  # the stream stays open and empty until the test is done, or 30 s
        ended.set()  # before the close: a handler that runs once the read returns sees it
        os.close(w)

    previous = signal.signal(signal.SIGUSR2, _raise)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR2})
    helper = threading.Thread(target=signal_then_end_the_stream)
    try:
        helper.start()
        with pytest.raises(_Stop):
            reading.set()
            data = reader.read(1 << 20)  # an empty pipe: with a plain blocking read, this waits for the 30 s
            pytest.fail(f"the read returned {data!r} before the signal's handler ran")
        assert handled == [False], "the handler ran only once the stream had ended"
        assert isinstance(reader.interrupt, _Stop)  # and the reader kept it for the chunk to re-raise
    finally:
        closed.set()
        helper.join(60)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR2})
        signal.signal(signal.SIGUSR2, previous)
        reader.close()


def test_the_pipe_reader_returns_what_is_there_and_ends_at_end_of_stream():
    r, w = os.pipe()
    reader = pipe._PipeReader(r)
    os.write(w, b"abc")
    assert reader.read(1 << 20) == b"abc"  # what the pipe holds, without waiting for the size asked
    os.close(w)
    assert reader.read(1 << 20) == b""  # end of stream: the COPY ends
    reader.close()
    reader.close()  # twice is harmless (the error path closes it again)


def test_the_helper_threads_leave_interrupt_signals_to_the_main_thread():
    seen: dict = {}

    class Cursor:
        rowcount = 0

        def copy_expert(self, statement, out, size):
            seen["mask"] = signal.pthread_sigmask(signal.SIG_BLOCK, set())

    r, w = os.pipe()
    writer = pipe._Writer(Cursor(), "COPY", w)
    writer.start()
    writer.join(30)
    os.close(r)
    assert {signal.SIGTERM, signal.SIGINT, signal.SIGALRM} <= seen["mask"]
