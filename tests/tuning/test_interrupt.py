"""The first Ctrl-C of a study asks to stop at the next training step; the second stops at once."""

from __future__ import annotations

import os
import signal

import pytest

from sslflow.tasks.tuning.interrupt import StopRequest


def test_the_first_sigint_asks_the_second_interrupts_and_the_handler_is_restored():
    before = signal.getsignal(signal.SIGINT)
    stop = StopRequest()
    with stop.on_sigint():
        os.kill(os.getpid(), signal.SIGINT)  # delivered at the next bytecode boundary of this thread
        assert stop.requested
        with pytest.raises(KeyboardInterrupt):
            stop.on_step(1, {})
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before


def test_a_new_request_raises_nothing():
    stop = StopRequest()
    stop.on_step(0, {})
    stop.on_epoch_end(0, {})
    stop.check()
