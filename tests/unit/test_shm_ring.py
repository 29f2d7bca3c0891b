"""The shared-memory ring between pipeline stages (framework/infer/shm_ring.py): messages of several parts arrive
whole and in order across wrap-arounds, a full ring makes the writer wait for the reader, an oversize message is
refused, and a reader whose peer process has exited gets an error instead of a hang."""

import os
import subprocess
import sys
import threading
import time
import uuid

import pytest
import torch

from framework.infer import shm_ring

pytestmark = pytest.mark.skipif(not shm_ring.usable(), reason="needs /dev/shm on x86-64")


@pytest.fixture
def pair():
    path = f"/dev/shm/miaotui_test_{uuid.uuid4().hex}"
    writer = shm_ring.Channel(path, slot_bytes=4096, slots=3, create=True)
    reader = shm_ring.Channel(path, slot_bytes=4096, slots=3, create=False)
    os.unlink(path)  # as the engine does once both ends are mapped
    yield writer, reader
    writer.close()
    reader.close()


def test_messages_arrive_whole_and_in_order(pair):
    writer, reader = pair
    for i in range(10):  # more messages than slots: the ring wraps around
        plan = torch.arange(i, i + 5, dtype=torch.int64)
        hidden = torch.randn(i + 1, 7, dtype=torch.bfloat16)
        writer.send([plan, hidden] if i % 2 else [plan])
        parts = reader.recv()
        assert torch.equal(parts[0].view(torch.int64), plan)
        if i % 2:
            assert torch.equal(parts[1].view(torch.bfloat16).view(i + 1, 7), hidden)
        else:
            assert len(parts) == 1


def test_a_full_ring_waits_for_its_reader(pair):
    writer, reader = pair
    for i in range(3):
        writer.send([torch.tensor([i])])
    got = []

    def read_later():
        time.sleep(0.2)
        got.extend(int(reader.recv()[0].view(torch.int64)) for _ in range(4))

    t = threading.Thread(target=read_later)
    t.start()
    t0 = time.perf_counter()
    writer.send([torch.tensor([3])])  # every slot is full until the reader takes one
    assert time.perf_counter() - t0 >= 0.15
    t.join()
    assert got == [0, 1, 2, 3]


def test_an_oversize_message_is_refused(pair):
    writer, _ = pair
    with pytest.raises(ValueError, match="more than 4096 bytes"):
        writer.send([torch.zeros(1025, dtype=torch.float32)])


def test_a_dead_peer_is_an_error_not_a_hang(pair):
    _, reader = pair
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    reader.peer_pid = gone.pid
    t0 = time.perf_counter()
    with pytest.raises(shm_ring.PeerGone, match=str(gone.pid)):
        reader.recv()
    assert time.perf_counter() - t0 < 2


def test_segments_of_a_dead_creator_are_swept(tmp_path):
    """A rank killed between creating its segment and the unlink after the connect leaves a name in /dev/shm;
    the next connect removes it, and only it (a live creator's, one from another PID namespace, another user's
    and foreign files stay)."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    uid = os.getuid()
    orphan = shm_ring.segment_name(uid, "t1", "fwd", 1, dead.pid)
    kept = [shm_ring.segment_name(uid, "t2", "fwd", 1, os.getpid()),
            f"miaotui_{uid}_t4_fwd_1_12345_{dead.pid}",  # made in another PID namespace
            shm_ring.segment_name(uid + 1, "t3", "ret", 0, dead.pid),
            f"miaotui_{uid}_t5_fwd_1_{shm_ring._namespace_id()}_99999999999999999999",  # no pid
            "something_else_1"]
    for name in [orphan, *kept]:
        (tmp_path / name).write_bytes(b"x")
    if not shm_ring._namespace_id():
        pytest.skip("no PID namespace to read here: nothing is swept")
    assert shm_ring.sweep_orphans(str(tmp_path)) == [orphan]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept)
