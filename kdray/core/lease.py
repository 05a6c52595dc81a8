"""A lease in storage: one builder at a time for something shared by key (a teacher cache), on file:// and s3://.

    with Lease(store, "teacher cache", log=log).hold(ready=lambda: finished(store)) as mine:
        if mine:
            build(store)      # this process holds the lease (renewed in the background while it builds)
        # else: another run built it while this one waited

The lease is one small JSON object, ``<folder>/lease.json``: its holder (a random id, host and pid) and a
renewal count the holder bumps every ``renew_s``. Storage offers no compare-and-swap that works on
both a disk and every S3 server, so taking a lease is write, wait ``settle_s``, read back: of several
writers the last one wins and every other one sees that it lost. A waiter judges a lease by its own
clock: one whose content has not changed for ``expire_s`` belongs to a holder that crashed (or lost its
storage) and is taken over, so a crash never blocks the next run for longer than that. A waiter gives
up after ``wait_s`` with an error naming the lease; it logs where it stands every ``report_s``.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from typing import Any, Callable, Iterator

from kdray.core.errors import KdrayError, StorageError
from kdray.core.storage import Storage

LEASE = "lease.json"


class Lease:
    expire_s = 60.0  # a lease not renewed for this long (by the waiter's clock) is a crashed holder's
    renew_s = 10.0
    settle_s = 1.0  # between writing a lease and reading it back: longer than any writer's read-to-write gap
    wait_s = 3 * 3600.0  # the longest a run waits for another's build
    report_s = 10.0
    poll_s = 1.0

    def __init__(self, store: Storage, what: str, log: Callable[[str], None] = print):
        self.store, self.what, self.log = store, what, log
        self.holder = {"id": uuid.uuid4().hex[:12], "host": socket.gethostname(), "pid": os.getpid()}

    @contextlib.contextmanager
    def hold(self, ready: Callable[[], bool]) -> Iterator[bool]:
        """Yield True holding the lease (renewed until the block ends, then released), or False as soon as
        ``ready()`` says another holder finished the work. Raises KdrayError after ``wait_s``."""
        if not self._acquire(ready):
            yield False
            return
        stop = threading.Event()
        renewer = threading.Thread(target=self._renew, args=(stop,), name="kdray-lease", daemon=True)
        renewer.start()
        try:
            yield True
        finally:
            stop.set()
            renewer.join(timeout=self.renew_s + 30)
            self._release()

    # ------------------------------------------------------------------ taking it

    def _acquire(self, ready: Callable[[], bool]) -> bool:
        t0 = time.monotonic()
        seen: tuple[bytes | None, float] = (None, t0)  # the lease's content and when it last changed (our clock)
        reported: float | None = None
        while True:
            if ready():
                return False
            raw = self._read()
            now = time.monotonic()
            if raw is not None and raw != seen[0]:
                seen = (raw, now)
            other = self._holder(raw)
            if raw is None or other is None or now - seen[1] >= self.expire_s:
                if raw is not None and other is not None:
                    self.log(
                        f"{self.what} at {self.store.uri()}: the lease of {_who(other)} was not renewed for "
                        f"{now - seen[1]:.0f}s (a crashed run?): taking it over"
                    )
                if self._take():
                    if ready():  # finished by the holder that released the lease just before we read it
                        self._release()
                        return False
                    return True
                continue
            if now - t0 >= self.wait_s:
                raise KdrayError(
                    f"{self.what} at {self.store.uri()}: gave up after waiting {now - t0:.0f}s for {_who(other)}, "
                    "which is building it and still renews its lease",
                    hint=f"Let that run finish and rerun; if no run is building it, delete {self.store.uri(LEASE)}.",
                )
            if reported is None or now - reported >= self.report_s:
                self.log(
                    f"{self.what} at {self.store.uri()}: waiting for {_who(other)}, which is building it "
                    f"(lease renewed {now - seen[1]:.0f}s ago; waited {now - t0:.0f}s of at most {self.wait_s:.0f}s)"
                )
                reported = now
            time.sleep(self.poll_s)

    def _take(self) -> bool:
        mine = self._doc(0)
        self.store.write_bytes(LEASE, mine)
        time.sleep(self.settle_s)
        return self._holder(self._read()) == self.holder

    # ------------------------------------------------------------------ holding it

    def _renew(self, stop: threading.Event) -> None:
        count = 0
        while not stop.wait(self.renew_s):
            count += 1
            try:
                if self._holder(self._read()) != self.holder:
                    self.log(f"{self.what} at {self.store.uri()}: another run took the lease over; building on")
                    return
                self.store.write_bytes(LEASE, self._doc(count))
            except StorageError as e:  # the build itself will meet the same storage and say so
                self.log(f"{self.what} at {self.store.uri()}: could not renew the lease ({e})")

    def _release(self) -> None:
        with contextlib.suppress(StorageError, OSError):
            if self._holder(self._read()) == self.holder:
                self.store.fs.delete_file(self.store.path(LEASE))

    # ------------------------------------------------------------------ the object

    def _doc(self, renewals: int) -> bytes:
        return json.dumps({"holder": self.holder, "renewals": renewals, "what": self.what}).encode()

    def _read(self) -> bytes | None:
        try:
            return self.store.read_bytes(LEASE) if self.store.exists(LEASE) else None
        except StorageError:
            if not self.store.exists(LEASE):  # released between the two calls
                return None
            raise

    @staticmethod
    def _holder(raw: bytes | None) -> dict[str, Any] | None:
        """The holder a lease names; None for no lease or one that is not ours to read (it is then replaced)."""
        if raw is None:
            return None
        try:
            doc = json.loads(raw)
        except ValueError:
            return None
        holder = doc.get("holder") if isinstance(doc, dict) else None
        return holder if isinstance(holder, dict) else None


def _who(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "another run"
    return f"another run (host {holder.get('host')}, pid {holder.get('pid')})"
