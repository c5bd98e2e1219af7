"""What the kopf handlers call: plain functions around ``reconcile``, and the operator's state
(API client, metrics, settings, per-FineTune locks, the scrape pool) that main's startup
handler builds once and hands to every handler through kopf's ``memo``.

Reconciles work from what kopf already watches: the FineTune, its worker pods and its Service
come from kopf indexes (``Cache``), not from API reads. API trouble is "not yet"
(``kopf.TemporaryError``), retried here after the retry delay; an invalid spec is "never": the
Failed condition says so, and a finished FineTune plans no further work.
"""

from __future__ import annotations

import concurrent.futures
import contextvars
import ctypes
import dataclasses
import datetime as dt
import functools
import gc
import heapq
import logging
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Mapping

import kopf
import urllib3.exceptions

from . import kube as kube_
from . import manifests as m
from . import metrics as metrics_
from . import reconcile
from . import scrape
from . import status as st
from . import validation

if TYPE_CHECKING:
    from .main import Options

logger = logging.getLogger(__name__)

Key = tuple[str, str]  # (namespace, FineTune name)
# A pod this operator created counts as there this long before kopf's watch delivers it (it
# usually does within a second; a pod deleted before a watch relist may never be delivered).
RECENT_POD_SECONDS = 30.0


@dataclasses.dataclass(frozen=True)
class _Item:
    due: float  # time.monotonic()
    why: str
    cache: "Cache"
    context: contextvars.Context
    urgent: bool = False


def _merged(queued: "_Item | None", item: "_Item") -> "_Item":
    """One pending entry for two asks: the earlier due time and the higher urgency (``queued``
    itself when it already has both)."""
    if queued is None:
        return item
    if queued.due <= item.due and (queued.urgent or not item.urgent):
        return queued
    first = queued if queued.due <= item.due else item
    return dataclasses.replace(first, urgent=queued.urgent or item.urgent)


class WorkQueue:
    """FineTunes waiting for a reconcile, worked off by threads of the operator's own, like
    client-go's workqueue: a FineTune is queued at most once however many events ask for it (a
    burst of pod events is one reconcile), never reconciled by two threads at once (asked for
    while it runs, it is queued again for after), and may be asked for after a delay (pod events
    wait a moment for their siblings; API trouble waits the retry delay). Urgent work (a new or
    changed FineTune: someone waits for its pods) goes before the rest that is due (status
    refreshes after pod events, clocks), and the rest waits while urgent work runs, for at most
    ``yield_seconds`` past its due time: in a burst of new FineTunes every thread creates pods
    and the status writes come after (the apiserver is the shared bottleneck, so a status write
    beside a creation slows it down). kopf's handlers only enqueue, so none of kopf's threads
    ever waits on the API. Each reconcile runs in the context of the handler that queued it
    (contextvars: kopf's event poster lives there)."""

    def __init__(self, process: "Callable[[Key, str, Cache, bool], None]", workers: int,
                 depth: "Callable[[int], None] | None" = None, yield_seconds: float = 5.0,
                 drained: "Callable[[int], None] | None" = None):
        self._process = process
        self._depth = depth or (lambda _: None)
        # Called (outside the lock) when the queue has nothing left, with how many reconciles ran since it last had.
        self._drained = drained or (lambda _: None)
        self._done_since_drained = 0
        self._yield_seconds = yield_seconds
        self._active_urgent = 0
        self._cond = threading.Condition()
        self._pending: dict[Key, _Item] = {}
        # (due, order, key, item) by urgency; entries whose item is no longer pending are skipped.
        self._heaps: dict[bool, list[tuple[float, int, Key, _Item]]] = {True: [], False: []}
        self._active: set[Key] = set()
        self._again: dict[Key, _Item] = {}  # asked for while active
        self._order = 0
        self._stopping = False
        self._threads = [threading.Thread(target=self._work, name=f"reconcile-{i}", daemon=True)
                         for i in range(max(1, workers))]
        for thread in self._threads:
            thread.start()

    def add(self, key: Key, why: str, cache: "Cache", delay: float = 0.0, urgent: bool = False) -> None:
        item = _Item(time.monotonic() + delay, why, cache, contextvars.copy_context(), urgent)
        with self._cond:
            if key in self._active:
                self._again[key] = _merged(self._again.get(key), item)
                return
            self._push(key, item)

    def _push(self, key: Key, item: "_Item") -> None:
        queued = self._pending.get(key)
        merged = _merged(queued, item)
        if merged is queued:
            return  # already due as soon or sooner, as urgently
        self._pending[key] = merged
        self._order += 1
        heapq.heappush(self._heaps[merged.urgent], (merged.due, self._order, key, merged))
        self._depth(len(self._pending))
        self._cond.notify()

    def _next(self) -> tuple[Key, "_Item"] | None:
        with self._cond:
            while not self._stopping:
                for heap in self._heaps.values():
                    while heap and self._pending.get(heap[0][2]) is not heap[0][3]:
                        heapq.heappop(heap)  # superseded
                now = time.monotonic()
                # When each heap's first entry may start: other work waits while urgent work
                # runs, for at most yield_seconds past its due time. Urgent work goes first.
                starts = [(self._heaps[urgent], self._heaps[urgent][0][0] + delay)
                          for urgent, delay in ((True, 0.0), (False, self._yield_seconds if self._active_urgent else 0.0))
                          if self._heaps[urgent]]
                for heap, start in starts:
                    if start <= now:
                        _, _, key, item = heapq.heappop(heap)
                        del self._pending[key]
                        self._active.add(key)
                        self._active_urgent += item.urgent
                        self._depth(len(self._pending))
                        return key, item
                # (An urgent reconcile's end notifies too: other work may start then.)
                self._cond.wait(min(start for _, start in starts) - now if starts else None)
            return None

    def _work(self) -> None:
        while (next_item := self._next()) is not None:
            key, item = next_item
            try:
                item.context.run(self._process, key, item.why, item.cache, item.urgent)
            except Exception:  # noqa: BLE001 - one FineTune's bug must not stop the queue
                logger.exception("reconciling %s/%s failed", *key)
            finally:
                with self._cond:
                    self._active.discard(key)
                    if item.urgent:
                        self._active_urgent -= 1
                        self._cond.notify_all()  # other work may go now
                    again = self._again.pop(key, None)
                    if again is not None:
                        self._push(key, again)
                    self._done_since_drained += 1
                    done = self._done_since_drained if not self._pending and not self._active else 0
                    if done:
                        self._done_since_drained = 0
                if done:
                    self._drained(done)

    def idle(self) -> bool:
        with self._cond:
            return not self._pending and not self._active

    def shutdown(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()


# The status fields a scrape writes (see status.apply_trainer_metrics).
SCRAPED_FIELDS = ("epoch", "epochs", "progress", "metrics", "gpuMemory", "bestMetrics", "featureCache", "freeze")


class ScrapePool:
    """Scrapes rank 0 in a few threads of its own, never under a FineTune's lock and never in
    kopf's handler threads: a slow or hostile endpoint costs at most one of these threads for
    at most one scrape timeout, and only for its own FineTune (one scrape in flight each)."""

    def __init__(self, workers: int, timeout: float):
        self.timeout = timeout
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="scrape")
        self._in_flight: set[Key] = set()
        # What this operator last wrote, newer than a cached status that has not caught up.
        self._written: dict[Key, dict[str, Any]] = {}
        self._guard = threading.Lock()

    def submit(self, rt: "Runtime", key: Key, url: str, status: Mapping[str, Any]) -> bool:
        with self._guard:
            if key in self._in_flight:
                return False
            self._in_flight.add(key)
        self._pool.submit(self._scrape, rt, key, url, dict(status))
        return True

    def _scrape(self, rt: "Runtime", key: Key, url: str, status: dict[str, Any]) -> None:
        namespace, name = key
        try:
            scraped = scrape.scrape(url, name, self.timeout)
            with self._guard:
                status.update(self._written.get(key, {}))
            updated = reconcile.record_scrape(rt.kube, namespace, name, status, scraped, rt.metrics,
                                              on_write=lambda written: rt.wrote(key, written))
            with self._guard:
                self._written[key] = {k: updated[k] for k in SCRAPED_FIELDS if k in updated}
        except Exception as e:  # noqa: BLE001 - a failed scrape only means no fresh metrics this time
            logger.warning("scraping %s/%s at %s failed: %s", namespace, name, url, e)
        finally:
            with self._guard:
                self._in_flight.discard(key)

    def forget(self, key: Key) -> None:
        with self._guard:
            self._written.pop(key, None)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _not_older(version: str | None, than: str | None) -> bool:
    """``version`` is ``than`` or later. resourceVersions are opaque, but etcd's are increasing
    integers; anything else only compares equal."""
    if version is None or than is None:
        return False
    if version.isdigit() and than.isdigit():
        return int(version) >= int(than)
    return version == than


class LatestCopies:
    """What the apiserver answered to this operator's last write of each FineTune, kept until
    kopf's watch has delivered that version (a watch delivers versions in order, so until then
    the index holds an older copy). Planning from it spares the write refused for a stale copy
    and the read after it."""

    def __init__(self) -> None:
        self._written: dict[Key, dict[str, Any]] = {}
        # Kept after the watch caught up: its event for this version needs no reconcile.
        self._last_version: dict[Key, str] = {}
        self._guard = threading.Lock()

    def wrote(self, key: Key, body: Mapping[str, Any]) -> None:
        entry = finetune_entry(body)
        with self._guard:
            self._written[key] = entry
            self._last_version[key] = entry["metadata"]["resourceVersion"]

    def is_last_known(self, key: Key, resource_version: str | None) -> bool:
        """This version is the one the operator last planned from and wrote (or read)."""
        with self._guard:
            return resource_version is not None and self._last_version.get(key) == resource_version

    def seen(self, key: Key, resource_version: str | None) -> None:
        """kopf's index holds this version (called from the event handler, which kopf calls
        after storing it): it has caught up if it is the one written or a later one (kopf
        batches a burst of events and hands over only the last, so the version written may
        never be delivered on its own; keeping the written copy then would hide a user's later
        change, e.g. a resume)."""
        with self._guard:
            written = self._written.get(key)
            if written is not None and _not_older(resource_version, written["metadata"]["resourceVersion"]):
                del self._written[key]

    def newest(self, key: Key, read_index: Callable[[], dict[str, Any] | None]) -> dict[str, Any] | None:
        """The newer of this operator's copy and the index's. The copy is read first: seen()
        drops it only after kopf has stored that version or a later one, so a reader that finds
        no copy finds the index caught up (read the other way round, the index could still be
        the older one and the copy gone by the time it is looked for)."""
        with self._guard:
            written = self._written.get(key)
        indexed = read_index()
        if written is None:
            return indexed
        if indexed is not None and _not_older(indexed["metadata"].get("resourceVersion"),
                                              written["metadata"]["resourceVersion"]):
            with self._guard:  # the watch caught up before seen() ran (or after a relist)
                if self._written.get(key) is written:
                    del self._written[key]
            return indexed
        return written

    def forget(self, key: Key) -> None:
        with self._guard:
            self._written.pop(key, None)
            self._last_version.pop(key, None)


class RecentPods:
    """Worker pods this operator created that kopf's pod watch has not delivered yet (for at
    most RECENT_POD_SECONDS): counted as there, so a reconcile between the POST and its watch
    event neither creates the pod again nor reports one worker fewer."""

    def __init__(self) -> None:
        self._created: dict[Key, dict[str, tuple[float, dict[str, Any]]]] = {}
        # The version each pod was created as, until its first event has been handled.
        self._created_version: dict[Key, dict[str, str]] = {}
        self._guard = threading.Lock()

    def created(self, key: Key, body: Mapping[str, Any]) -> None:
        name = body["metadata"]["name"]
        with self._guard:
            self._created.setdefault(key, {})[name] = (time.monotonic(), pod_entry(body))
            self._created_version.setdefault(key, {})[name] = body["metadata"].get("resourceVersion")

    def is_as_created(self, key: Key, pod_name: str, resource_version: str | None) -> bool:
        """This pod event shows the pod exactly as this operator created it (asked once per pod)."""
        with self._guard:
            versions = self._created_version.get(key) or {}
            created = versions.pop(pod_name, None)
            if not versions:
                self._created_version.pop(key, None)
            return created is not None and created == resource_version

    def seen(self, key: Key, pod_name: str) -> None:
        with self._guard:
            created = self._created.get(key)
            if created is not None:
                created.pop(pod_name, None)
                if not created:
                    del self._created[key]

    def with_indexed(self, key: Key, read_index: Callable[[], list[dict[str, Any]]]) -> list[dict[str, Any]]:
        """The index's pods and those created but not yet there. What was created is read
        first, for the reason LatestCopies.newest gives."""
        oldest = time.monotonic() - RECENT_POD_SECONDS
        with self._guard:
            created = [(name, pod) for name, (at, pod) in (self._created.get(key) or {}).items() if at >= oldest]
        indexed = read_index()
        names = {pod["metadata"]["name"] for pod in indexed}
        return indexed + [pod for name, pod in created if name not in names]

    def forget(self, key: Key) -> None:
        with self._guard:
            self._created.pop(key, None)
            self._created_version.pop(key, None)


class HeldEvents:
    """Kubernetes Events of a reconcile of a new or changed FineTune, posted at the FineTune's
    next reconcile, which is queued as other work and so waits while new FineTunes are started
    (at most the queue's yield_seconds). Someone waits for the pods, nobody for the "Created"
    Event: in a burst of new FineTunes each Event would be one more write on the apiserver
    between pod creations (measured: bench/results/README.md, 2026-12-07)."""

    def __init__(self) -> None:
        self._held: dict[Key, list[tuple[dict[str, Any], str, str, str]]] = {}
        self._guard = threading.Lock()

    def hold(self, key: Key, body: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
        with self._guard:
            self._held.setdefault(key, []).append((dict(body), type_, reason, message))

    def holds(self, key: Key) -> bool:
        with self._guard:
            return key in self._held

    def release(self, key: Key) -> list[tuple[dict[str, Any], str, str, str]]:
        with self._guard:
            return self._held.pop(key, [])


class FreeMemory:
    """After a burst of work (``burst`` reconciles or more before the queue drained), collects
    garbage and hands what the allocator holds free back to the system (glibc's malloc_trim;
    nothing where there is no such call), ``delay`` seconds after the queue drained: kopf's
    per-object workers keep each object's last watch event for 5 s after it. In a burst kopf
    holds every new object's event at once, and a Python process keeps the memory it peaked at.
    Measured with 1000 FineTunes: bench/results/README.md."""

    def __init__(self, burst: int = 100, delay: float = 10.0):
        self.burst, self.delay = burst, delay
        self._work = 0
        self._timer: threading.Timer | None = None
        self._guard = threading.Lock()
        try:
            self._malloc_trim: Callable[[int], int] | None = ctypes.CDLL(None).malloc_trim
        except (AttributeError, OSError):  # not glibc
            self._malloc_trim = None

    def drained(self, reconciles: int) -> None:
        """After ``burst`` reconciles or more, ``delay`` seconds after the queue last drained (a
        burst that drains the queue now and then, e.g. kopf's first look at every object after
        a restart, frees memory once, after its end)."""
        with self._guard:
            self._work += reconciles
            if self._work < self.burst:
                return
            if self._timer is not None:
                self._timer.cancel()
            self._timer = threading.Timer(self.delay, self.release)
            self._timer.daemon = True
            self._timer.start()

    def release(self) -> None:
        with self._guard:
            # (A timer cancelled while it was starting may still get here: it must not drop
            # the newer timer, or cancel() at shutdown would miss it.)
            if self._timer is threading.current_thread():
                self._timer = None
            self._work = 0
        gc.collect()
        if self._malloc_trim is not None:
            self._malloc_trim(0)

    def cancel(self) -> None:
        with self._guard:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None


@dataclasses.dataclass
class Runtime:
    kube: kube_.Kube
    metrics: metrics_.OperatorMetrics
    options: "Options"
    scrapes: ScrapePool
    allowed_volume_types: tuple[str, ...] = validation.DEFAULT_ALLOWED_VOLUME_TYPES
    # None: no NetworkPolicy per FineTune; else the peers that may reach the metrics port.
    network_policy_metrics_from: list[dict[str, Any]] | None = None
    # What the chart allows FineTunes to ask of their pods (references, gang schedulers, PDBs).
    settings: m.PlatformSettings = dataclasses.field(default_factory=m.PlatformSettings)
    latest: LatestCopies = dataclasses.field(default_factory=LatestCopies)
    recent_pods: RecentPods = dataclasses.field(default_factory=RecentPods)
    held_events: HeldEvents = dataclasses.field(default_factory=HeldEvents)
    free_memory: FreeMemory = dataclasses.field(default_factory=FreeMemory)
    queue: WorkQueue = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        self.queue = WorkQueue(lambda key, why, cache, urgent: reconcile_queued(self, key, why, cache, urgent),
                               self.options.max_workers, self.metrics.queue_depth.set,
                               drained=self.free_memory.drained)

    def wrote(self, key: Key, body: Mapping[str, Any]) -> None:
        """What the apiserver answered to one of this operator's writes for FineTune ``key``."""
        if body.get("kind") == "Pod":
            self.recent_pods.created(key, body)
        else:
            self.latest.wrote(key, body)


@dataclasses.dataclass
class Cache:
    """kopf's indexes of what the operator watches (see handlers.py)."""

    finetunes: Mapping[Key, Any]
    worker_pods: Mapping[Key, Any]

    def finetune(self, key: Key) -> dict[str, Any] | None:
        return next(iter(self.finetunes.get(key, ())), None)

    def pods(self, key: Key) -> list[dict[str, Any]]:
        return list(self.worker_pods.get(key, ()))


def observe(rt: Runtime, key: Key, cache: Cache) -> tuple[dict[str, Any] | None, list[dict[str, Any]], bool]:
    """The FineTune, its worker pods and whether its Service exists, as the newest of the
    indexes and this operator's own writes say (None for a FineTune gone from the index).

    The Service is taken to exist while any worker pod does: a plan creates the run's Service
    (and NetworkPolicy, PodGroup, PDB) before its pods, so with no pod left it creates them again
    with the next pods, the apiserver answering "already exists" for those still there. Not
    watching Services spares kopf an event and an object per FineTune (measured with 200 new and
    1000 idle FineTunes: bench/results/README.md)."""
    if cache.finetune(key) is None:
        return None, [], False
    finetune = rt.latest.newest(key, lambda: cache.finetune(key))
    pods = rt.recent_pods.with_indexed(key, lambda: cache.pods(key))
    return finetune, pods, bool(pods)


# --- what the indexes keep: only the fields the reconciler reads -----------------------------------------

def finetune_entry(body: Mapping[str, Any]) -> dict[str, Any]:
    meta = body["metadata"]
    annotations = meta.get("annotations") or {}
    return {
        "apiVersion": body.get("apiVersion"),
        "kind": body.get("kind"),
        "metadata": {
            "name": meta["name"], "namespace": meta["namespace"], "uid": meta["uid"],
            "generation": meta.get("generation"), "resourceVersion": meta.get("resourceVersion"),
            "deletionTimestamp": meta.get("deletionTimestamp"),
            "annotations": {k: v for k, v in annotations.items() if k == m.ANNOTATION_APPLIED_SPEC},
        },
        "spec": dict(body.get("spec") or {}),
        "status": dict(body.get("status") or {}),
    }


def pod_entry(body: Mapping[str, Any]) -> dict[str, Any]:
    meta, status = body["metadata"], body.get("status") or {}
    return {
        "metadata": {
            "name": meta["name"], "uid": meta.get("uid"), "labels": dict(meta.get("labels") or {}),
            "deletionTimestamp": meta.get("deletionTimestamp"),
            "deletionGracePeriodSeconds": meta.get("deletionGracePeriodSeconds"),
            "ownerReferences": [{"uid": ref.get("uid")} for ref in meta.get("ownerReferences") or []],
        },
        "spec": {"activeDeadlineSeconds": (body.get("spec") or {}).get("activeDeadlineSeconds")},
        "status": {
            "phase": status.get("phase"), "reason": status.get("reason"), "message": status.get("message"),
            "podIP": status.get("podIP"),
            "conditions": [c for c in status.get("conditions") or [] if c.get("type") in ("PodScheduled", st.DISRUPTION_TARGET)],
            "containerStatuses": [{"name": c.get("name"), "state": c.get("state"), "lastState": c.get("lastState")}
                                  for c in status.get("containerStatuses") or []],
        },
    }


# --- reconciling ---------------------------------------------------------------------------------------

def post_event(body: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
    """A Kubernetes Event on the FineTune (via kopf's poster, which honours posting.level)."""
    try:
        if type_ == "Warning":
            kopf.warn(dict(body), reason=reason, message=message[:1000])
        else:
            kopf.info(dict(body), reason=reason, message=message[:1000])
    except LookupError:  # outside kopf's context (unit tests): the log line is enough
        pass


def _reconcile(rt: Runtime, key: Key, cache: Cache, urgent: bool = False) -> reconcile.Plan | None:
    """One reconcile; an urgent one (a new or changed FineTune) holds its Events for the next."""
    namespace, name = key
    finetune, pods, service_exists = observe(rt, key, cache)
    if finetune is None:
        # Gone from kopf's index: deleted (or never seen). What is kept for it can go now, in
        # the queue's order, so no reconcile still running for it brings it back.
        forget_finetune(rt, key)
        return None
    for held in rt.held_events.release(key):
        post_event(*held)
    try:
        result = reconcile.reconcile(
            rt.kube, finetune, pods, service_exists,
            post_event=functools.partial(rt.held_events.hold, key) if urgent else post_event,
            operator_metrics=rt.metrics, default_image=rt.options.trainer_image,
            allowed_volume_types=rt.allowed_volume_types,
            network_policy_metrics_from=rt.network_policy_metrics_from,
            settings=rt.settings,
            on_write=lambda written: rt.wrote(key, written),
        )
    except kube_.KubeError as e:
        raise kopf.TemporaryError(f"API error while reconciling {namespace}/{name}: {e}",
                                  delay=rt.options.retry_delay) from e
    except (urllib3.exceptions.HTTPError, OSError) as e:
        raise kopf.TemporaryError(f"API unreachable while reconciling {namespace}/{name}: {e}",
                                  delay=rt.options.retry_delay) from e
    if result is not None and result.scrape_pod:
        url = scrape.metrics_url(result.scrape_pod, m.METRICS_PORT)
        if url:
            rt.scrapes.submit(rt, key, url, result.status)
    return result


def reconcile_queued(rt: Runtime, key: Key, why: str, cache: Cache, urgent: bool = False) -> None:
    """One reconcile, in a queue thread (``why``: what queued it, the metric's handler label).
    API trouble queues it again after the retry delay, until a reconcile gets through or the
    FineTune is gone (kopf does not retry event handlers); that reconcile posts the Events held."""
    try:
        with rt.metrics.time_handler(why):
            result = _reconcile(rt, key, cache, urgent)
    except kopf.TemporaryError as e:
        logger.warning("%s (retrying in %.0fs)", e, rt.options.retry_delay)
        rt.queue.add(key, "retry", cache, delay=rt.options.retry_delay)
        return
    except Exception:  # noqa: BLE001 - a bug: retried like API trouble, so the FineTune is not left without a clock
        logger.exception("reconciling %s/%s failed (retrying in %.0fs)", *key, rt.options.retry_delay)
        rt.queue.add(key, "retry", cache, delay=rt.options.retry_delay)
        return
    if result is not None and result.again:
        rt.queue.add(key, "next-step", cache)
    elif rt.held_events.holds(key):
        rt.queue.add(key, "held-events", cache)  # not urgent: after the new FineTunes' pods
    arm_clock(rt, key, cache)


def finetune_changed(rt: Runtime, key: Key, cache: Cache, body: Mapping[str, Any]) -> None:
    """Any change of the FineTune but the one this operator just made: the plan that wrote a
    version already did what that version calls for (pod events and later changes reconcile
    again), so planning it once more would only cost a thread and find nothing to do. kopf has
    stored this version in its index before calling the handler: a copy the operator wrote that
    is not newer can go now (not earlier: see handlers.py)."""
    version = (body.get("metadata") or {}).get("resourceVersion")
    rt.latest.seen(key, version)
    if rt.latest.is_last_known(key, version):
        return
    rt.queue.add(key, "finetune-event", cache, urgent=True)


def finetune_deleted(rt: Runtime, key: Key, cache: Cache) -> None:
    rt.queue.add(key, "finetune-deleted", cache)


def worker_pod_changed(rt: Runtime, key: Key, pod: Mapping[str, Any], cache: Cache) -> None:
    """A worker pod changed: its FineTune's status may have to follow, after a moment in which
    the other workers' events join it (the scheduler and kubelets change a gang's pods within
    milliseconds of each other: one status write, not one per pod). Not if the event shows the
    pod as this operator created it (the creating plan counted it already). kopf's index holds
    the pod (or has dropped a deleted one) by now, so the runtime's own record of it can go."""
    meta = pod.get("metadata") or {}
    rt.recent_pods.seen(key, meta.get("name", ""))
    if rt.recent_pods.is_as_created(key, meta.get("name", ""), meta.get("resourceVersion")):
        return
    rt.queue.add(key, "pod-event", cache, delay=rt.options.pod_event_delay)


# --- the clock: the only periodic work, and only where something is due (see arm_clock) ---------------------

def seconds_until_due(body: Mapping[str, Any], now: dt.datetime) -> float | None:
    """When the FineTune needs a reconcile without any event: 0 while it runs (metrics) or
    waits to retry a refused pod; the seconds to its active deadline or its TTL; None if never
    (Pending, Suspended, or finished without a TTL)."""
    spec, status = body.get("spec") or {}, body.get("status") or {}
    phase = status.get("phase")
    if phase == st.RUNNING or str(status.get("message") or "").startswith(reconcile.CREATE_FAILED_PREFIX):
        return 0.0
    if phase in st.TERMINAL_PHASES:
        ttl, completed = spec.get("ttlSecondsAfterFinished"), st.parse_timestamp(status.get("completionTime"))
        if ttl is None or completed is None:
            return None
        return max(0.0, (completed + dt.timedelta(seconds=int(ttl)) - now).total_seconds())
    deadline, started = spec.get("activeDeadlineSeconds"), st.parse_timestamp(status.get("startTime"))
    if phase in (st.PENDING, st.RESTARTING) and deadline and started:
        return max(0.0, (started + dt.timedelta(seconds=int(deadline)) - now).total_seconds())
    return None


def arm_clock(rt: Runtime, key: Key, cache: Cache) -> None:
    """After each reconcile: queue the next one for when the FineTune is due without any event
    (every poll interval while it runs, at its deadline or TTL), or none at all. The queue keeps
    one entry per FineTune, so an event before then simply comes first. (Not a kopf daemon or
    timer: those keep a task, a finalizer and a live copy of the body per FineTune.)"""
    finetune, _, _ = observe(rt, key, cache)
    if finetune is None:
        return
    due = seconds_until_due(finetune, dt.datetime.now(dt.timezone.utc))
    if due is not None:
        rt.queue.add(key, "clock", cache, delay=due if due > 0 else rt.options.poll_interval)


def forget_finetune(rt: Runtime, key: Key) -> None:
    """The FineTune is being deleted: its pods and Service go by garbage collection."""
    rt.metrics.forget(*key)
    rt.scrapes.forget(key)
    rt.latest.forget(key)
    rt.recent_pods.forget(key)
    rt.held_events.release(key)
