"""runtime's memory of the operator's own writes (what it plans from before kopf's watch has
caught up, and which events it need not reconcile) and its work queue."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import copy
import threading
import time
from pathlib import Path

import kopf
import pytest
import yaml
from prometheus_client import CollectorRegistry

from finetune_operator import handlers, runtime
from finetune_operator import manifests as m
from finetune_operator.kube import Kube
from finetune_operator.main import Options
from finetune_operator.metrics import OperatorMetrics
from support import REPO, wait_for

KEY = ("ml", "ft")


def finetune(version: str, phase: str) -> dict:
    return {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTune",
            "metadata": {"name": "ft", "namespace": "ml", "uid": "u1", "resourceVersion": version},
            "spec": {}, "status": {"phase": phase}}


def pod(name: str, version: str) -> dict:
    return {"kind": "Pod", "metadata": {"name": name, "uid": f"uid-{name}", "resourceVersion": version},
            "spec": {}, "status": {"phase": "Pending"}}


@contextlib.contextmanager
def operator_runtime(**options):
    """A Runtime as main's startup handler builds it (no API client: these tests make no calls)."""
    rt = runtime.Runtime(kube=None, metrics=OperatorMetrics(CollectorRegistry()), options=Options(**options),
                         scrapes=runtime.ScrapePool(1, 1.0))
    try:
        yield rt
    finally:
        rt.queue.shutdown()
        rt.free_memory.cancel()


def test_a_written_copy_is_planned_from_until_the_watch_delivers_its_version():
    latest = runtime.LatestCopies()
    indexed = runtime.finetune_entry(finetune("5", "Pending"))
    assert latest.newest(KEY, lambda: indexed) is indexed
    latest.wrote(KEY, finetune("7", "Running"))
    latest.seen(KEY, "6")  # an older version reaches the index: ours is still newer
    assert latest.newest(KEY, lambda: runtime.finetune_entry(finetune("6", "Pending")))["status"]["phase"] == "Running"
    latest.seen(KEY, "7")
    caught_up = runtime.finetune_entry(finetune("7", "Running"))
    assert latest.newest(KEY, lambda: caught_up) is caught_up
    # The event of the operator's own last write needs no reconcile; any other version does.
    assert latest.is_last_known(KEY, "7") and not latest.is_last_known(KEY, "8")
    latest.forget(KEY)
    assert not latest.is_last_known(KEY, "7")


def test_a_created_pod_counts_until_seen_and_its_first_event_is_known():
    pods = runtime.RecentPods()
    pods.created(KEY, pod("ft-worker-0", "11"))
    assert [p["metadata"]["name"] for p in pods.with_indexed(KEY, list)] == ["ft-worker-0"]
    pods.seen(KEY, "ft-worker-0")
    assert pods.with_indexed(KEY, list) == []  # from now on the index alone says whether it exists
    assert pods.is_as_created(KEY, "ft-worker-0", "11")
    assert not pods.is_as_created(KEY, "ft-worker-0", "11")  # asked once: later events reconcile
    pods.created(KEY, pod("ft-worker-1", "12"))
    assert not pods.is_as_created(KEY, "ft-worker-1", "13")  # changed since (e.g. scheduled)


class Index(dict):
    """A kopf index as the runtime reads it (key -> the entries of the objects there). ``kopf``,
    if set, is run at its ``at_read``-th read (counting from 0), as if kopf stored an event's
    entries and called the event handlers in its own thread just before that read
    (``read_after``) or just after it."""

    kopf = None
    at_read = 0
    read_after = False

    def put(self, key, entry) -> None:
        self[key] = [entry]

    def get(self, key, default=None):
        value = super().get(key, default)
        self.at_read -= 1
        if self.at_read == -1 and self.kopf:
            self.kopf()
            return super().get(key, default) if self.read_after else value
        return value


INTERLEAVINGS = [(at_read, when) for at_read in (0, 1) for when in ("before", "after")]


@pytest.mark.parametrize(("at_read", "when"), INTERLEAVINGS)
def test_a_running_finetune_keeps_its_clock_however_kopf_and_a_reconcile_interleave(at_read, when):
    """The reconcile that writes Running arms the clock while kopf handles the watch event of
    that very write: kopf runs the index functions, stores their entries, then calls the event
    handlers, in its own thread. Wherever that falls in the reconcile thread's reads, it must
    see Running (and the pod it created), or no clock is armed and the FineTune's status stops
    following the trainer (the 1-in-4 hostile-scrape stall of 2026-12-02)."""
    with operator_runtime(poll_interval=60) as rt:
        finetunes, pods = Index(), Index()
        cache = runtime.Cache(finetunes, pods)
        finetunes.put(KEY, runtime.finetune_entry(finetune("6", "Pending")))
        rt.wrote(KEY, finetune("7", "Running"))
        rt.wrote(KEY, pod("ft-worker-0", "8"))
        memo = kopf.Memo(runtime=rt)

        def kopf_handles_the_events() -> None:
            body = finetune("7", "Running")
            entry = asyncio.run(handlers.finetunes_by_name(namespace="ml", name="ft", body=body, memo=memo))
            finetunes.put(KEY, entry[KEY])
            runtime.finetune_changed(rt, KEY, cache, body)
            body = pod("ft-worker-0", "8")
            labels = {m.LABEL_FINETUNE: "ft"}
            entry = asyncio.run(handlers.worker_pods_by_finetune(namespace="ml", name="ft-worker-0", body=body,
                                                                 labels=labels, memo=memo))
            pods.put(KEY, entry[KEY])
            runtime.worker_pod_changed(rt, KEY, body, cache)

        finetunes.kopf, finetunes.at_read, finetunes.read_after = kopf_handles_the_events, at_read, when == "before"
        runtime.arm_clock(rt, KEY, cache)
        assert rt.queue._pending[KEY].why == "clock"
        assert finetunes.at_read < 0  # kopf did run in between
        finetune_seen, pods_seen, _ = runtime.observe(rt, KEY, cache)
        assert finetune_seen["status"]["phase"] == "Running" and finetune_seen is finetunes[KEY][0]
        assert [p["metadata"]["name"] for p in pods_seen] == ["ft-worker-0"]
        # Once the index holds both, the operator's own copies are gone (memory: 1000s of FineTunes).
        assert rt.latest._written == {} and rt.recent_pods._created == {}


@pytest.mark.parametrize("when", ["before", "after"])
def test_a_created_pod_is_never_missing_however_kopf_and_a_reconcile_interleave(when):
    with operator_runtime() as rt:
        pods = Index()
        rt.wrote(KEY, pod("ft-worker-0", "8"))

        def kopf_handles_the_event() -> None:
            pods.put(KEY, runtime.pod_entry(pod("ft-worker-0", "8")))
            rt.recent_pods.seen(KEY, "ft-worker-0")  # what worker_pod_changed does first

        pods.kopf, pods.read_after = kopf_handles_the_event, when == "before"
        seen = rt.recent_pods.with_indexed(KEY, lambda: list(pods.get(KEY, ())))
        assert [p["metadata"]["name"] for p in seen] == ["ft-worker-0"]


def test_a_reconcile_that_raises_is_retried_so_the_finetune_keeps_its_clock():
    with operator_runtime(retry_delay=60) as rt:
        finetunes = Index()
        finetunes.put(KEY, {"metadata": {"resourceVersion": "1"}})  # no spec: plan() fails on it
        runtime.reconcile_queued(rt, KEY, "clock", runtime.Cache(finetunes, {}))
        assert rt.queue._pending[KEY].why == "retry"
        assert rt.queue._pending[KEY].due > time.monotonic() + 50


# --- the work queue -----------------------------------------------------------------------------------

class Recorder:
    """A queue's process function that records calls and can hold one until released."""

    def __init__(self) -> None:
        self.calls: list[tuple[tuple[str, str], str]] = []
        self.running = threading.Event()
        self.release = threading.Event()
        self.release.set()
        self.concurrent = 0
        self.most_concurrent = 0
        self._guard = threading.Lock()

    def __call__(self, key, why, cache, urgent) -> None:
        with self._guard:
            self.calls.append((key, why))
            self.concurrent += 1
            self.most_concurrent = max(self.most_concurrent, self.concurrent)
        self.running.set()
        self.release.wait(10)
        with self._guard:
            self.concurrent -= 1


def test_a_burst_of_events_for_one_finetune_is_one_reconcile():
    recorder = Recorder()
    queue = runtime.WorkQueue(recorder, workers=4)
    try:
        for _ in range(50):
            queue.add(KEY, "pod-event", None, delay=0.2)
        queue.add(("ml", "other"), "finetune-event", None)
        assert wait_for(queue.idle, "the queue to drain", timeout=5)
        assert sorted(recorder.calls) == [(KEY, "pod-event"), (("ml", "other"), "finetune-event")]
        # The undelayed one ran first: a delay orders the queue.
        assert recorder.calls[0] == (("ml", "other"), "finetune-event")
        # An earlier ask wins over a later one for the same FineTune.
        recorder.calls.clear()
        queue.add(KEY, "pod-event", None, delay=5)
        queue.add(KEY, "finetune-event", None)
        assert wait_for(lambda: recorder.calls, "a reconcile", timeout=2) and recorder.calls == [(KEY, "finetune-event")]
    finally:
        queue.shutdown()


def test_a_finetune_is_never_reconciled_twice_at_once_and_an_ask_while_it_runs_is_kept():
    recorder = Recorder()
    queue = runtime.WorkQueue(recorder, workers=4)
    try:
        recorder.release.clear()
        queue.add(KEY, "finetune-event", None)
        assert recorder.running.wait(5)
        queue.add(KEY, "pod-event", None)  # while the first runs: queued for after it
        queue.add(KEY, "pod-event", None)
        time.sleep(0.2)
        assert recorder.calls == [(KEY, "finetune-event")]  # not started alongside
        recorder.release.set()
        assert wait_for(lambda: len(recorder.calls) == 2 and queue.idle(), "the second reconcile", timeout=5)
        assert recorder.most_concurrent == 1 and recorder.calls[1] == (KEY, "pod-event")
    finally:
        queue.shutdown()


def test_a_failing_reconcile_does_not_stop_the_queue():
    calls = []

    def process(key, why, cache, urgent):
        calls.append(key)
        if key == KEY:
            raise RuntimeError("a bug in one FineTune's reconcile")

    queue = runtime.WorkQueue(process, workers=1)
    try:
        queue.add(KEY, "finetune-event", None)
        queue.add(("ml", "next"), "finetune-event", None, delay=0.05)
        assert wait_for(lambda: len(calls) == 2, "the next FineTune", timeout=5)
    finally:
        queue.shutdown()


def test_a_reconcile_runs_in_the_context_of_the_handler_that_queued_it():
    # kopf's event poster is found through a contextvar of its event loop; a plain thread has
    # none, and the FineTune's Events would be dropped.
    poster = contextvars.ContextVar("poster")
    seen = []
    queue = runtime.WorkQueue(lambda key, why, cache, urgent: seen.append(poster.get(None)), workers=1)
    try:
        poster.set("kopf's queue")
        queue.add(KEY, "finetune-event", None)
        assert wait_for(lambda: seen, "the reconcile", timeout=5) == ["kopf's queue"]
    finally:
        queue.shutdown()


def test_a_new_finetune_goes_before_status_refreshes_that_are_due():
    recorder = Recorder()
    queue = runtime.WorkQueue(recorder, workers=1)
    try:
        recorder.release.clear()
        queue.add(("ml", "busy"), "finetune-event", None)  # holds the one thread
        assert recorder.running.wait(5)
        queue.add(("ml", "refresh"), "pod-event", None)
        queue.add(("ml", "also-new"), "pod-event", None)
        queue.add(("ml", "also-new"), "finetune-event", None, urgent=True)  # the same key, now urgent
        queue.add(("ml", "new"), "finetune-event", None, urgent=True)
        recorder.release.set()
        assert wait_for(lambda: len(recorder.calls) == 4 and queue.idle(), "the queue to drain", timeout=5)
        assert [key[1] for key, _ in recorder.calls] == ["busy", "also-new", "new", "refresh"]
    finally:
        queue.shutdown()


def test_a_run_s_service_is_taken_to_exist_while_any_of_its_pods_does():
    """Services are not watched: with no pod of the FineTune left, the plan creates the Service
    (and the run's other objects) again with the next pods; the apiserver answers "already
    exists" for those still there."""
    with operator_runtime() as rt:
        finetunes, pods = Index(), Index()
        finetunes.put(KEY, runtime.finetune_entry(finetune("6", "Pending")))
        cache = runtime.Cache(finetunes, pods)
        assert runtime.observe(rt, KEY, cache)[2] is False
        rt.wrote(KEY, pod("ft-worker-0", "8"))  # created, not yet delivered by the watch
        assert runtime.observe(rt, KEY, cache)[2] is True
        rt.recent_pods.forget(KEY)
        pods.put(KEY, runtime.pod_entry(pod("ft-worker-0", "8")))
        assert runtime.observe(rt, KEY, cache)[2] is True
        del pods[KEY]
        assert runtime.observe(rt, KEY, cache)[2] is False


@contextlib.contextmanager
def a_refresh_behind_a_running_new_finetune(yield_seconds: float):
    """Two threads: one reconciles a new FineTune (held until released), a status refresh is due."""
    recorder = Recorder()
    queue = runtime.WorkQueue(recorder, workers=2, yield_seconds=yield_seconds)
    try:
        recorder.release.clear()
        queue.add(("ml", "new"), "finetune-event", None, urgent=True)
        assert recorder.running.wait(5)
        queue.add(("ml", "refresh"), "pod-event", None)
        yield recorder
    finally:
        recorder.release.set()
        queue.shutdown()


def test_status_refreshes_wait_while_new_finetunes_are_reconciled_but_not_for_ever():
    with a_refresh_behind_a_running_new_finetune(yield_seconds=30) as recorder:
        time.sleep(0.3)
        assert recorder.calls == [(("ml", "new"), "finetune-event")]  # a thread is free, yet it waits
        recorder.release.set()
        assert wait_for(lambda: len(recorder.calls) == 2, "the refresh after the new FineTune", timeout=5)
    with a_refresh_behind_a_running_new_finetune(yield_seconds=0.3) as recorder:
        assert wait_for(lambda: len(recorder.calls) == 2, "the refresh while the new one still runs", timeout=5)


# --- Events of new FineTunes ------------------------------------------------------------------------

class ApiServer(Kube):
    """Writes answered as the apiserver answers them (the FineTune patched, a new
    resourceVersion), and recorded."""

    def __init__(self, finetune_body: dict):
        self.finetune, self.calls, self.version = copy.deepcopy(finetune_body), [], 100

    def _next_version(self) -> str:
        self.version += 1
        return str(self.version)

    def patch_finetune(self, namespace, name, patch, status=False, resource_version=None):
        self.calls.append("patch finetunes/status" if status else "patch finetunes")
        self.finetune["status"].update(patch.get("status") or {})
        self.finetune["metadata"]["resourceVersion"] = self._next_version()
        return copy.deepcopy(self.finetune)

    def create(self, namespace, plural, body):
        self.calls.append(f"create {plural}")
        return {**body, "metadata": {**body["metadata"], "resourceVersion": self._next_version()}}


def test_a_new_finetune_s_events_wait_for_its_next_reconcile_which_is_not_urgent(monkeypatch):
    """In a burst of new FineTunes the Created Event would be one more write between pod
    creations: the urgent reconcile that creates the pods holds it, and queues the FineTune's
    next reconcile as other work (after the new FineTunes' pods), which posts it."""
    posted = []
    monkeypatch.setattr(runtime, "post_event", lambda body, type_, reason, message: posted.append(reason))
    sample = yaml.safe_load((REPO / "crds" / "samples" / "finetune-cpu-smoke.yaml").read_text())
    sample["metadata"].update(namespace="ml", name="ft", uid="u1", generation=1, resourceVersion="100")
    sample["status"] = {}
    with operator_runtime() as rt:
        rt.queue.shutdown()  # its entries are looked at and run here, not by its threads
        rt.kube = ApiServer(sample)
        finetunes = Index()
        finetunes.put(KEY, runtime.finetune_entry(sample))
        cache = runtime.Cache(finetunes, {})
        runtime.reconcile_queued(rt, KEY, "finetune-event", cache, urgent=True)
        assert rt.kube.calls == ["patch finetunes/status", "create services", "create pods", "create pods"]
        assert posted == []
        queued = rt.queue._pending.pop(KEY)  # (as the queue takes it)
        assert queued.why == "held-events" and not queued.urgent
        runtime.reconcile_queued(rt, KEY, queued.why, queued.cache, queued.urgent)
        assert posted == ["Created"]
        assert len(rt.kube.calls) == 4  # nothing else to do
        assert rt.queue._pending[KEY].why == "clock"  # its active deadline; nothing more held
        # A deleted FineTune's held Events go with it.
        rt.held_events.hold(KEY, sample, "Normal", "Created", "again")
        runtime.forget_finetune(rt, KEY)
        assert not rt.held_events.holds(KEY)


def test_after_a_burst_of_work_the_freed_memory_goes_back_to_the_system():
    drained, released = [], threading.Event()
    free_memory = runtime.FreeMemory(burst=3, delay=0.5)
    release = free_memory.release  # gc.collect() and malloc_trim(0)
    free_memory.release = lambda: (release(), released.set())
    queue = runtime.WorkQueue(lambda key, why, cache, urgent: None, workers=2,
                              drained=lambda n: (drained.append(n), free_memory.drained(n)))
    try:
        queue.add(KEY, "finetune-event", None)
        assert wait_for(lambda: drained, "the queue to drain", timeout=5) == [1]
        time.sleep(0.2)
        assert not released.is_set()  # one reconcile is no burst
        for i in range(3):
            queue.add(("ml", f"new-{i}"), "finetune-event", None, delay=0.05)
        assert released.wait(5)
        assert sum(drained) == 4
        # A burst that drains the queue now and then frees memory once, after its last drain.
        released.clear()
        free_memory.delay = 1.0  # longer than a drain and a look here take
        for i in range(4):
            queue.add(("ml", f"later-{i}"), "finetune-event", None)
            assert wait_for(queue.idle, "the queue to drain", timeout=5)
            time.sleep(0.15)
            assert not released.is_set()
        assert released.wait(5)
    finally:
        queue.shutdown()
        free_memory.cancel()


def test_freeing_memory_runs_where_glibc_is_and_is_harmless():
    free_memory = runtime.FreeMemory()
    free_memory.release()  # gc.collect() and, on glibc, malloc_trim(0)
    if Path("/lib/x86_64-linux-gnu/libc.so.6").exists() or Path("/lib/aarch64-linux-gnu/libc.so.6").exists():
        assert free_memory._malloc_trim is not None


def test_the_indexes_drop_unread_fields_from_the_bodies_kopf_holds():
    """kopf holds every listed body until all indexes are complete; managedFields are nearly
    half of a pod's and nothing reads them (nor kubectl's last-applied copy of the manifest), so
    the index functions drop them from kopf's own parsed dict (kopf.Body is a view of it), not
    from a copy. The entries are as before; other annotations stay."""
    managed = [{"manager": "finetune-operator", "operation": "Update", "fieldsV1": {"f:spec": {}}}]
    raw_finetune, raw_pod = finetune("7", "Running"), pod("ft-worker-0", "8")
    for raw in (raw_finetune, raw_pod):
        raw["metadata"]["managedFields"] = copy.deepcopy(managed)
    raw_finetune["metadata"]["annotations"] = {handlers.LAST_APPLIED_ANNOTATION: "{}", "team": "vision"}
    memo = kopf.Memo()
    entry = asyncio.run(handlers.finetunes_by_name(namespace="ml", name="ft", body=kopf.Body(raw_finetune), memo=memo))
    assert "managedFields" not in raw_finetune["metadata"]
    assert raw_finetune["metadata"]["annotations"] == {"team": "vision"}
    assert entry[KEY] == runtime.finetune_entry(finetune("7", "Running"))
    entry = asyncio.run(handlers.worker_pods_by_finetune(namespace="ml", name="ft-worker-0", body=kopf.Body(raw_pod),
                                                         labels={m.LABEL_FINETUNE: "ft"}, memo=memo))
    assert "managedFields" not in raw_pod["metadata"]
    assert entry[KEY] == runtime.pod_entry(pod("ft-worker-0", "8"))
