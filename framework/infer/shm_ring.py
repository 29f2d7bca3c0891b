"""Pipeline messages through shared memory, for the stages of one CPU host: no helper thread, no socket.

Over gloo every message between stages wakes gloo's I/O thread on both sides and, for a receive posted after
the send, pays a rendezvous round trip. With every core busy computing (one process a core, the usual CPU
layout) those wake-ups wait for the scheduler: on this project's 2-core VM the pp=2 ring sat idle 13-25% of
the time, though each step's compute was balanced. Here the sender copies its message into a ring of slots in
a shared-memory segment and bumps a counter; the receiver's own thread polls the counter when it needs the
message. vLLM's shared-memory message queue (its broadcast between the workers of a node) works the same way.

One ``Channel`` carries one direction between two ranks (single producer, single consumer):

    [write count][read count][slot 0: length, bytes][slot 1] ... [slot K-1]

The writer waits while all K slots are full, copies into slot ``written % K`` and then stores the new write
count; the reader waits for ``written > read``, copies out and stores the new read count. Each counter has one
writer, and x86's stores become visible in program order, so a reader that sees a count sees the bytes before
it (this module is used only on x86-64; elsewhere the process groups serve). The segment is unlinked as soon as
both ends have mapped it, so nothing outlives the job; a segment whose creator died before that (killed during
the connect) carries the creator's pid in its name, and the next job's connect removes it (``sweep_orphans``).

A waiting end polls briefly, then yields its core for up to 20 ms (a core that another process wants goes to
it), then sleeps in growing steps (an idle server's followers wake a thousand times a second at most), and checks
every 50 ms that its peer process is still alive: a dead stage is an error, not a hang.
"""

from __future__ import annotations

import mmap
import os
import platform
import struct
import time

import torch

PEER_CHECK_S = 0.05  # how often a long wait checks that the peer process lives (a dead stage: an error within 50 ms)
YIELD_S = 0.02  # how long a waiting end yields before it sleeps: a step's compute, so that waits inside a busy
# ring (a few ms) never sleep past their message
HEADER = 128  # two counters, each on its own cache line
SLOT_HEADER = 64


def usable() -> bool:
    """Shared memory this module can rely on: Linux's /dev/shm and x86's store order."""
    return os.path.isdir("/dev/shm") and platform.machine().lower() in ("x86_64", "amd64")


def pid_namespace() -> str:
    """This process's PID namespace: the peer check (``os.kill(pid, 0)``) means something only within one."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _namespace_id() -> str:
    """The digits of this process's PID namespace ("pid:[4026531836]" -> "4026531836"), "" where unknown."""
    return "".join(c for c in pid_namespace() if c.isdigit())


def segment_name(uid: int, token: str, kind: str, rank: int, creator_pid: int) -> str:
    """A ring segment's name in /dev/shm: this user's, this job's (token), then its creator's PID namespace and
    pid, so that ``sweep_orphans`` judges a creator only where its pid means something."""
    return f"miaotui_{uid}_{token}_{kind}_{rank}_{_namespace_id()}_{creator_pid}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):  # someone else's process, or not a pid: leave it be
        return True
    return True


def sweep_orphans(directory: str = "/dev/shm") -> list[str]:
    """Remove this user's ring segments whose creator process, in this PID namespace, no longer exists (a rank
    killed between creating its segment and the unlink after the connect). A live job's segments are left
    alone, and so are those made in another PID namespace (containers that share /dev/shm), whose pids mean
    nothing here. Returns the names removed."""
    prefix, ns = f"miaotui_{os.getuid()}_", _namespace_id()
    gone = []
    try:
        names = os.listdir(directory)
    except OSError:
        return gone
    for name in names:
        parts = name.rsplit("_", 2)
        if not name.startswith(prefix) or len(parts) != 3 or not ns or parts[1] != ns or not parts[2].isdigit():
            continue
        if not _alive(int(parts[2])):
            try:
                os.unlink(os.path.join(directory, name))
                gone.append(name)
            except OSError:
                pass
    return gone


class PeerGone(RuntimeError):
    pass


class Channel:
    def __init__(self, path: str, slot_bytes: int, slots: int, create: bool, peer_pid: int | None = None):
        self.slot_bytes, self.slots = slot_bytes, slots
        self.stride = SLOT_HEADER + -(-slot_bytes // 64) * 64
        size = HEADER + slots * self.stride
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = os.open(path, flags, 0o600)
        try:
            if create:
                # reserve the pages now: a /dev/shm too small for the ring is an OSError here (and the process
                # groups serve), not a SIGBUS at the first write of a page mid-run
                os.posix_fallocate(fd, 0, size)
            self.mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self.bytes = torch.frombuffer(self.mm, dtype=torch.uint8)
        self.peer_pid = peer_pid
        self.count = 0  # this end's own counter (writes sent, or reads done)

    # -- the two counters ----------------------------------------------------------------------------------
    def _written(self) -> int:
        return struct.unpack_from("q", self.mm, 0)[0]

    def _read(self) -> int:
        return struct.unpack_from("q", self.mm, 64)[0]

    def _wait(self, ready) -> None:
        if ready():
            return
        t0 = last_check = time.perf_counter()
        spins = 0
        while not ready():
            spins += 1
            if spins < 64:
                continue
            now = time.perf_counter()
            waited = now - t0
            if waited < YIELD_S:
                os.sched_yield()  # a core another process wants goes to it; otherwise this returns at once
            else:
                time.sleep(min(1e-3, waited / 50))
            if now - last_check > PEER_CHECK_S:
                last_check = now
                self._check_peer()

    def _check_peer(self) -> None:
        if self.peer_pid is not None and not _alive(self.peer_pid):
            raise PeerGone(f"the pipeline peer process {self.peer_pid} has exited")

    # -- one message ---------------------------------------------------------------------------------------
    def send(self, parts: list[torch.Tensor]) -> None:
        """Copy ``parts`` (contiguous CPU tensors) into the next slot as one message."""
        n = self.count
        self._wait(lambda: n - self._read() < self.slots)
        base = HEADER + (n % self.slots) * self.stride
        off = base + SLOT_HEADER
        lengths = []
        for t in parts:
            b = t.contiguous().view(torch.uint8).reshape(-1)
            if off + b.numel() > base + SLOT_HEADER + self.slot_bytes:
                raise ValueError(f"a pipeline message of more than {self.slot_bytes} bytes")
            self.bytes[off: off + b.numel()].copy_(b)
            off += b.numel()
            lengths.append(b.numel())
        struct.pack_into("q" * (1 + len(lengths)), self.mm, base, len(lengths), *lengths)
        self.count = n + 1
        struct.pack_into("q", self.mm, 0, self.count)  # published last

    def recv(self) -> list[torch.Tensor]:
        """The next message's parts, as uint8 tensors of their own (the slot is free on return)."""
        n = self.count
        self._wait(lambda: self._written() > n)
        base = HEADER + (n % self.slots) * self.stride
        k = struct.unpack_from("q", self.mm, base)[0]
        lengths = struct.unpack_from("q" * k, self.mm, base + 8)
        off, parts = base + SLOT_HEADER, []
        for length in lengths:
            parts.append(self.bytes[off: off + length].clone())
            off += length
        self.count = n + 1
        struct.pack_into("q", self.mm, 64, self.count)
        return parts

    def close(self) -> None:
        del self.bytes
        try:
            self.mm.close()
        except BufferError:  # a view still alive: the mapping goes with the process
            pass
