"""The pieces of the engine's CUDA rules that run anywhere: the window and row buckets a compiled CUDA decode step
captures at load, and the polled wait that turns a dead stage into an exception instead of a hang."""

import pytest

from framework.infer.worker import row_buckets, window_buckets, window_from_buckets
from framework.parallel.distributed import wait_polled


def test_window_buckets_are_powers_of_two_up_to_the_cache():
    assert window_buckets(128) == [16, 32, 64, 128]
    assert window_buckets(200) == [16, 32, 64, 128, 200]
    assert window_buckets(8) == [8]
    buckets = window_buckets(4096)
    assert window_from_buckets([0], buckets) == 16
    assert window_from_buckets([5, 16], buckets) == 32  # position 16 is the 17th key
    assert window_from_buckets([4095], buckets) == 4096
    for need in range(1, 4097, 37):  # never more than twice the live context (or the smallest bucket)
        assert window_from_buckets([need - 1], buckets) <= max(16, 2 * need)


def test_row_buckets_cover_every_batch_size():
    assert row_buckets(1) == [1]
    assert row_buckets(8) == [1, 2, 4, 8]
    assert row_buckets(9) == [1, 2, 4, 8, 16]
    for n in range(1, 40):
        padded = 1 << (n - 1).bit_length()
        assert padded in row_buckets(39)


class FakeWork:
    def __init__(self, done_after: int | None):
        self.polls, self.done_after, self.waited = 0, done_after, False

    def is_completed(self) -> bool:
        self.polls += 1
        return self.done_after is not None and self.polls > self.done_after

    def wait(self) -> None:
        self.waited = True


def test_polled_wait_returns_once_complete_and_raises_at_the_deadline():
    w = FakeWork(done_after=3)
    wait_polled(w, 5.0, "x")
    assert w.waited and w.polls == 4
    dead = FakeWork(done_after=None)
    with pytest.raises(TimeoutError, match="the last stage: no answer within 0.05 s"):
        wait_polled(dead, 0.05, "the last stage")
    assert not dead.waited
