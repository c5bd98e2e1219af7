"""The FineTune state machine: ``plan()`` decides, ``reconcile()`` reads the cluster and acts.

Level-triggered: every call takes the FineTune and its pods as last seen and computes
what should happen from that alone, so it does not matter which handler called it (create,
update, timer, pod event), how often, or whether the operator restarted in between.

Idempotence rules:
- Pods have fixed names (``<name>-worker-<i>``) and are created with POST; 409 means done.
- Pods carry ``finetune.dev/attempt`` = status.attempt at creation; every new set of workers
  (a restart, a disruption, a resume) is a new attempt. A restart first records restarts+1
  and attempt+1 in status, then deletes the pods; pods of an older attempt are deleted on
  sight, so a crash between the two steps neither loses nor double-counts the restart.
- So a worker of the current attempt that is deleted while the run is active was deleted by
  someone else (preemption, eviction, a drain, its node's removal): a disruption, counted in
  status.disruptions (spec.maxDisruptions), not against spec.backoffLimit.
- The immutable part of the spec is recorded in status.appliedSpec when the run starts; pods
  are always built from it, so a rejected spec change is never half-applied. In the status
  (not an annotation, as before 0.2) because a FineTune's author may edit its metadata but
  not its status: an edited copy of the spec would skip validation.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import json
import logging
from typing import Any, Callable, Mapping

from . import kube as kube_
from . import manifests as m
from . import metrics as metrics_
from . import scrape
from . import status as st
from . import validation

logger = logging.getLogger(__name__)

CREATE_FAILED_PREFIX = "cannot create worker pod"
# Condition: a ResourceQuota refused a worker pod; the run waits (and retries) instead of failing.
QUOTA_EXCEEDED = "QuotaExceeded"

EventPoster = Callable[[Mapping[str, Any], str, str, str], None]
# Told each body the apiserver answered with: the FineTune's (writes, and the read after a
# refused one) and each worker pod created.
WriteListener = Callable[[Mapping[str, Any]], None]


@dataclasses.dataclass
class Event:
    type: str  # Normal or Warning
    reason: str
    message: str


@dataclasses.dataclass
class Plan:
    status: dict[str, Any]
    create_service: dict[str, Any] | None = None
    # Only when the operator's network policy setting is on (isolation of the run's pods).
    create_network_policy: dict[str, Any] | None = None
    # PodGroup (gang policy Coscheduling/Volcano), PodDisruptionBudget: created with the Service.
    create_objects: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    # Gang policy Kueue, the run failed for good: pods to mark not retriable in the group.
    release_pods: list[str] = dataclasses.field(default_factory=list)
    create_pods: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    delete_pods: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (name, uid)
    # Running pods of a failed run: stopped via activeDeadlineSeconds so the kubelet kills the
    # containers but the pod objects (and their logs) stay.
    stop_pods: list[str] = dataclasses.field(default_factory=list)
    delete_finetune: bool = False
    events: list[Event] = dataclasses.field(default_factory=list)
    counters: list[str] = dataclasses.field(default_factory=list)
    scrape_pod: dict[str, Any] | None = None
    # Plan again as soon as this one is written: it started a new attempt, whose pods may be
    # created at once if none of the old ones is left to wait for (no pod event would come).
    again: bool = False

    @property
    def validation_failed(self) -> bool:
        condition = st.get_condition(self.status.get("conditions"), st.FAILED)
        return bool(condition and condition.get("status") == "True" and condition.get("reason") == "ValidationFailed")


def _owned(pods: list[Mapping[str, Any]], uid: str) -> list[Mapping[str, Any]]:
    return [p for p in pods if any(ref.get("uid") == uid for ref in p["metadata"].get("ownerReferences") or [])]


def _pod_ref(pod: Mapping[str, Any]) -> tuple[str, str]:
    return pod["metadata"]["name"], pod["metadata"].get("uid", "")


def _label(pod: Mapping[str, Any], key: str) -> str | None:
    return (pod["metadata"].get("labels") or {}).get(key)


def _worker_counts(outcomes: Mapping[int, st.PodOutcome]) -> dict[str, int]:
    states = [o.state for o in outcomes.values()]
    return {
        "active": sum(s in ("pending", "running") for s in states),
        "succeeded": states.count("succeeded"),
        "failed": states.count("failed"),
    }


def _finish(plan: Plan, phase: str, reason: str, message: str, now: dt.datetime) -> None:
    plan.status = st.enter_phase(plan.status, phase, reason, message, now)
    plan.status["completionTime"] = st.timestamp(now)
    plan.events.append(Event("Normal" if phase == st.SUCCEEDED else "Warning", reason, message))
    plan.counters.append("succeeded" if phase == st.SUCCEEDED else "failed")


def _stop_or_delete_active(plan: Plan, outcomes: Mapping[int, st.PodOutcome], pods: Mapping[int, Mapping[str, Any]]) -> None:
    """After a failure: running pods are stopped but kept (logs), pending ones are deleted."""
    for index, outcome in outcomes.items():
        pod = pods[index]
        if outcome.state == "running" and not (pod.get("spec") or {}).get("activeDeadlineSeconds"):
            plan.stop_pods.append(pod["metadata"]["name"])
        elif outcome.state == "pending":
            plan.delete_pods.append(_pod_ref(pod))


@dataclasses.dataclass
class _Run:
    """What every step of ``plan`` reads: the FineTune, its effective spec and its pods, sorted."""

    finetune: Mapping[str, Any]
    now: dt.datetime
    phase: str | None
    effective: dict[str, Any]
    attempt: int
    current: dict[int, Mapping[str, Any]]  # live pods of this attempt, by worker index
    outcomes: dict[int, st.PodOutcome]
    stale: list[Mapping[str, Any]]  # live pods of another attempt or index
    terminating: list[Mapping[str, Any]]
    # Pods of this attempt being deleted, not by the operator (it deletes pods only with a new
    # attempt or the end of the run): disruptions.
    deleted: list[st.PodOutcome] = dataclasses.field(default_factory=list)

    @property
    def name(self) -> str:
        return self.finetune["metadata"]["name"]

    @property
    def workers(self) -> int:
        return int(self.effective["workers"])

    @property
    def missing(self) -> list[int]:
        return [i for i in range(self.workers) if i not in self.current]


def plan(
    finetune: Mapping[str, Any],
    pods: list[Mapping[str, Any]],
    service_exists: bool,
    now: dt.datetime,
    validate: Callable[[], list[str]],
    default_image: str | None = None,
    network_policy_metrics_from: list[dict[str, Any]] | None = None,
    settings: m.PlatformSettings | None = None,
) -> Plan:
    """Decide what to do for one FineTune, given everything known about it: one step per
    situation, each returns True when the plan is complete.

    ``network_policy_metrics_from`` None: no NetworkPolicy; else the peers allowed to scrape."""
    meta = finetune["metadata"]
    old = finetune.get("status") or {}
    p = Plan(status=copy.deepcopy(dict(old)))
    p.status["observedGeneration"] = meta.get("generation")
    owned = _owned(pods, meta["uid"])
    phase = old.get("phase")
    if phase in st.TERMINAL_PHASES:
        if _finished_spec_was_edited(p, finetune, now):
            phase = None
        else:
            _finished(p, finetune, owned, now)
            return p
    applied = _start_or_check_spec(p, finetune, now, validate)
    if applied is None:
        return p
    run = _sort_pods(finetune, owned, applied, p, now, phase)
    if not service_exists:
        p.create_service = m.build_service(run.name, meta["namespace"], finetune)
        if network_policy_metrics_from is not None:
            p.create_network_policy = m.build_network_policy(run.name, meta["namespace"], finetune,
                                                             network_policy_metrics_from)
        p.create_objects = m.build_run_objects(run.name, meta["namespace"], run.effective, finetune)
    if _suspended(p, run) or _deadline_exceeded(p, run) or _failed(p, run):
        _release_gang(p, run)
        return p
    _progress(p, run, default_image, settings)
    return p


def _release_gang(p: Plan, run: _Run) -> None:
    """Gang policy Kueue and the run failed for good: Kueue finishes the group's Workload (and
    frees its quota) once a pod of the group says it is not retriable and all have terminated."""
    if p.status.get("phase") == st.FAILED and run.phase != st.FAILED and m.gang_policy(run.effective) == m.GANG_KUEUE:
        p.release_pods = sorted(pod["metadata"]["name"] for pod in run.current.values())


def applied_spec(finetune: Mapping[str, Any]) -> dict[str, Any] | None:
    """The immutable spec the run was started with, None before it started. A run started by
    an operator before 0.2 has it in an annotation, trusted only once the status says the run
    started (which the FineTune's author cannot write)."""
    status = finetune.get("status") or {}
    if status.get("appliedSpec") is not None:
        return dict(status["appliedSpec"])
    legacy = (finetune["metadata"].get("annotations") or {}).get(m.ANNOTATION_APPLIED_SPEC)
    if legacy is not None and status.get("appliedGeneration") is not None:
        return json.loads(legacy)
    return None


def _finished_spec_was_edited(p: Plan, finetune: Mapping[str, Any], now: dt.datetime) -> bool:
    """A spec that failed validation was edited: validate it again from scratch."""
    meta, old = finetune["metadata"], finetune.get("status") or {}
    if applied_spec(finetune) is not None or old.get("phase") != st.FAILED or old.get("observedGeneration") == meta.get("generation"):
        return False
    p.status = {
        "observedGeneration": meta.get("generation"),
        "conditions": st.set_condition(old.get("conditions"), st.FAILED, False, "SpecChanged",
                                       "the spec changed; validating it again", now),
    }
    return True


def _start_or_check_spec(p: Plan, finetune: Mapping[str, Any], now: dt.datetime,
                         validate: Callable[[], list[str]]) -> dict[str, Any] | None:
    """The applied spec: recorded now when the run starts (None if the spec is invalid)."""
    meta, spec = finetune["metadata"], finetune.get("spec") or {}
    applied = applied_spec(finetune)
    if applied is not None:
        p.status["appliedSpec"] = applied  # (moved from a legacy annotation on the next write)
        _check_spec_change(p, spec, applied, now)
        return applied
    problems = validate()
    if problems:
        _finish(p, st.FAILED, "ValidationFailed", "invalid spec: " + "; ".join(problems), now)
        return None
    applied = m.immutable_spec(spec)
    workers = int(applied["workers"])
    p.status.update({
        "appliedSpec": applied,
        "appliedSpecHash": m.spec_hash(spec),
        "appliedGeneration": meta.get("generation"),
        "restarts": 0,
        "disruptions": 0,
        "attempt": 0,
        "epoch": 0,
        "epochs": int(applied["training"]["epochs"]),
        "progress": st.progress(0, int(applied["training"]["epochs"])),
    })
    message = f"created headless Service {m.service_name(meta['name'])} and {workers} worker pod(s)"
    p.status["conditions"] = st.set_condition(p.status.get("conditions"), st.CREATED, True, "Created", message, now)
    p.status = st.enter_phase(p.status, st.PENDING, "Created", f"waiting for {workers} worker pod(s) to start", now)
    p.events.append(Event("Normal", "Created", message))
    p.counters.append("created")
    return applied


def _sort_pods(finetune: Mapping[str, Any], owned: list[Mapping[str, Any]], applied: Mapping[str, Any],
               p: Plan, now: dt.datetime, phase: str | None) -> _Run:
    """The effective spec (applied + mutable fields, defaults once) and the pods sorted by it;
    pods of another attempt are deleted on sight."""
    spec = finetune.get("spec") or {}
    effective = m.with_defaults({**applied, **{k: spec[k] for k in m.MUTABLE_FIELDS if k in spec}})
    workers = int(effective["workers"])
    attempt = current_attempt(p.status)
    live = [pod for pod in owned if not pod["metadata"].get("deletionTimestamp")]
    terminating = [pod for pod in owned if pod["metadata"].get("deletionTimestamp")]

    def of_this_attempt(pod: Mapping[str, Any]) -> bool:
        index = str(_label(pod, m.LABEL_WORKER_INDEX) or "")
        return _label(pod, m.LABEL_ATTEMPT) == str(attempt) and index.isdigit() and int(index) < workers

    stale = [pod for pod in live if not of_this_attempt(pod)]
    current = {int(_label(pod, m.LABEL_WORKER_INDEX) or 0): pod for pod in live if pod not in stale}
    p.delete_pods += [_pod_ref(pod) for pod in stale]
    policy = effective.get("failurePolicy")
    outcomes = {i: st.classify_pod(pod, policy) for i, pod in sorted(current.items())}
    p.status["workers"] = _worker_counts(outcomes)
    deleted = [st.deleted_by_others(pod) for pod in terminating if of_this_attempt(pod)]
    return _Run(finetune, now, phase, effective, attempt, current, outcomes, stale, terminating, deleted)


def current_attempt(status: Mapping[str, Any]) -> int:
    """status.attempt; before 0.2 the attempt was status.restarts."""
    return int(status["attempt"] if status.get("attempt") is not None else status.get("restarts") or 0)


def _new_attempt(p: Plan, run: _Run) -> None:
    """Every worker starts again (from last.pt): the next attempt's pods replace these."""
    p.status["attempt"] = run.attempt + 1
    p.status["workers"] = {"active": 0, "succeeded": 0, "failed": 0}
    p.delete_pods += [_pod_ref(pod) for pod in run.current.values()]
    p.again = True


def _suspended(p: Plan, run: _Run) -> bool:
    """spec.suspend: delete the workers; on resume, start them again (a new startTime)."""
    if run.effective.get("suspend"):
        p.delete_pods += [_pod_ref(pod) for pod in run.current.values()]
        p.status["workers"] = {"active": 0, "succeeded": 0, "failed": 0}
        if run.phase != st.SUSPENDED:
            message = "suspended: worker pods deleted; set spec.suspend to false to resume from last.pt"
            p.status = st.enter_phase(p.status, st.SUSPENDED, "Suspended", message, run.now)
            # Like a Job: the active deadline counts from the (re)start, not across a suspension.
            p.status["startTime"] = None
            p.events.append(Event("Normal", "Suspended", message))
        return True
    if run.phase == st.SUSPENDED:
        message = f"resumed: recreating {run.workers} worker pod(s); the trainer continues from last.pt"
        p.status = st.enter_phase(p.status, st.PENDING, "Resumed", message, run.now)
        p.events.append(Event("Normal", "Resumed", message))
        run.phase = st.PENDING
        # A new attempt: the suspended pods (perhaps still terminating) are the old one's, and
        # the new pods wait for them to go.
        _new_attempt(p, run)
        run.stale += list(run.current.values())
        run.deleted = []
        run.attempt += 1
        run.current, run.outcomes = {}, {}
    if not p.status.get("startTime"):
        p.status["startTime"] = st.timestamp(run.now)
    return False


def _deadline_exceeded(p: Plan, run: _Run) -> bool:
    deadline = run.effective.get("activeDeadlineSeconds")
    started = st.parse_timestamp(p.status["startTime"])
    if not (deadline and started and run.now >= started + dt.timedelta(seconds=int(deadline))):
        return False
    message = f"the run was active longer than spec.activeDeadlineSeconds ({deadline}s); worker pods deleted"
    _finish(p, st.FAILED, "DeadlineExceeded", message, run.now)
    p.delete_pods += [_pod_ref(pod) for pod in run.current.values()]
    return True


# How failures of one attempt rank when they happened in the same second (finishedAt and
# deletionTimestamp have 1 s resolution): the cluster's doing first, then retryable causes, so
# a worker that exits 1 because its peer was preempted or OOM-killed does not end the run.
_CAUSE_RANK = {"disruption": 0, "retryable": 1, "permanent": 2}
_UNKNOWN_TIME = dt.datetime.min.replace(tzinfo=dt.timezone.utc)


def _first_failure(failures: list[st.PodOutcome]) -> st.PodOutcome:
    """The failure that came first decides how the attempt counts. One without a time (a pod
    gone without a trace) went first: its peers fail because it went."""
    return min(failures, key=lambda o: (o.at or _UNKNOWN_TIME, _CAUSE_RANK[o.cause]))


def _failed(p: Plan, run: _Run) -> bool:
    """The attempt failed: by its first failure, a permanent one fails the run, a retryable one
    restarts every worker (spec.backoffLimit) and a disruption does too (spec.maxDisruptions)."""
    failures = [o for o in run.outcomes.values() if o.state == "failed"] + run.deleted
    # A worker vanished only if the whole set ran in this attempt (the phase became Running). A
    # partly created set (a quota or webhook refused a pod, or the operator stopped between two
    # POSTs) is completed instead, without counting anything.
    if run.missing and run.phase == st.RUNNING:
        failures.append(st.PodOutcome(m.worker_pod_name(run.name, run.missing[0]), "failed", True, reason="Deleted",
                                      detail="the pod disappeared (deleted, or its node removed)", disruption=True))
    if not failures:
        return False
    failure = _first_failure(failures)
    logs = f"Pods are kept for their logs: kubectl logs {failure.name}"
    if failure.cause == "permanent":
        _finish(p, st.FAILED, "WorkerFailed", f"{failure.describe()}; a permanent failure is not retried. {logs}", run.now)
        _stop_or_delete_active(p, run.outcomes, run.current)
        return True
    if failure.cause == "disruption":
        return _disrupted(p, run, failure)
    restarts = int(p.status.get("restarts") or 0)
    limit = int(run.effective["backoffLimit"])
    if restarts >= limit:
        _finish(p, st.FAILED, "BackoffLimitExceeded",
                f"{failure.describe()}; backoffLimit {limit} reached after {restarts} restart(s). {logs}", run.now)
        _stop_or_delete_active(p, run.outcomes, run.current)
        return True
    p.status["restarts"] = restarts + 1
    message = (f"{failure.describe()}; restarting all {run.workers} workers from last.pt "
               f"(restart {restarts + 1} of backoffLimit {limit})")
    p.status = st.enter_phase(p.status, st.RESTARTING, "RetryableFailure", message, run.now)
    _new_attempt(p, run)
    p.events.append(Event("Warning", "Restarting", message))
    p.counters.append("restarts")
    return True


def _disrupted(p: Plan, run: _Run, failure: st.PodOutcome) -> bool:
    """The cluster took a worker away: a new attempt from last.pt, not counted against
    backoffLimit (the trainer saved its place on SIGTERM, so this costs seconds, not epochs)."""
    disruptions = int(p.status.get("disruptions") or 0)
    limit = int(run.effective["maxDisruptions"])
    what = f"worker pod {failure.name} was disrupted ({failure.reason or 'Deleted'}: {failure.detail})" \
        if failure.exit_code is None else f"{failure.describe()} (a disruption)"
    if disruptions >= limit:
        _finish(p, st.FAILED, "DisruptionLimitExceeded",
                f"{what}; maxDisruptions {limit} reached after {disruptions} disruption(s). "
                "Raise spec.maxDisruptions if the cluster preempts this often", run.now)
        _stop_or_delete_active(p, run.outcomes, run.current)
        return True
    p.status["disruptions"] = disruptions + 1
    output = run.effective.get("output") or {}
    where = "from last.pt" if output.get("volume") else "from the start (no spec.output volume keeps last.pt)"
    message = (f"{what}; restarting all {run.workers} workers {where} "
               f"(disruption {disruptions + 1} of maxDisruptions {limit}; not counted against backoffLimit)")
    p.status = st.enter_phase(p.status, st.RESTARTING, "Disrupted", message, run.now)
    _new_attempt(p, run)
    p.events.append(Event("Warning", "Disrupted", message))
    p.counters.append("disruptions")
    return True


def _progress(p: Plan, run: _Run, default_image: str | None, settings: m.PlatformSettings | None = None) -> None:
    """Create the missing workers, then report: waiting, running or succeeded."""
    old = run.finetune.get("status") or {}
    name, namespace = run.name, run.finetune["metadata"]["namespace"]
    if run.stale or run.terminating:
        waiting = sorted({pod["metadata"]["name"] for pod in run.stale + run.terminating})
        p.status["message"] = _restart_reason(p, run, f"waiting for old worker pod(s) to terminate: {', '.join(waiting)}")
        return
    for index in run.missing:
        p.create_pods.append(m.build_worker_pod(name, namespace, run.effective, index, run.finetune,
                                                run.attempt, default_image, settings))
    # Counted as the pending pods they will be, so their creation needs no second status write.
    p.status["workers"] = {**p.status["workers"], "active": p.status["workers"]["active"] + len(p.create_pods)}
    if not run.missing and st.condition_is_true(p.status.get("conditions"), QUOTA_EXCEEDED):
        p.status["conditions"] = st.set_condition(p.status["conditions"], QUOTA_EXCEEDED, False, "WorkersCreated",
                                                  f"all {run.workers} worker pod(s) exist", run.now)
    states = [run.outcomes[i].state if i in run.outcomes else "pending" for i in range(run.workers)]
    if all(s == "succeeded" for s in states):
        checkpoint = m.checkpoint_path(run.effective)
        p.status["checkpoint"] = checkpoint
        _finish(p, st.SUCCEEDED, "Completed", f"all {run.workers} worker(s) succeeded; best checkpoint {checkpoint}",
                run.now)
        return
    if all(s in ("running", "succeeded") for s in states):
        if run.phase != st.RUNNING:
            message = f"all {run.workers} worker(s) running"
            p.status = st.enter_phase(p.status, st.RUNNING, "WorkersRunning", message, run.now)
            p.events.append(Event("Normal", "Running", message))
        p.scrape_pod = dict(run.current[0]) if 0 in run.current else None
        return
    details = [f"{m.worker_pod_name(name, i)} {('(' + run.outcomes[i].detail + ')') if i in run.outcomes and run.outcomes[i].detail else ''}".strip()
               for i in range(run.workers) if states[i] == "pending"]
    message = f"waiting for worker pod(s) to start: {', '.join(details)}"
    if p.create_pods and str(old.get("message", "")).startswith(CREATE_FAILED_PREFIX):
        message = old["message"]  # keep saying why the pods do not exist until they do
    if run.phase in (None, st.RUNNING):
        p.status = st.enter_phase(p.status, st.PENDING, "WaitingForWorkers", message, run.now)
    elif run.phase == st.RESTARTING:
        p.status["message"] = _restart_reason(p, run, message)
    else:
        p.status["message"] = message


def _restart_reason(p: Plan, run: _Run, message: str) -> str:
    """While restarting, keep saying why until every worker runs again."""
    if run.phase != st.RESTARTING:
        return message
    restarting = st.get_condition(p.status.get("conditions"), st.RESTARTING) or {}
    return f"{restarting.get('message', 'restarting')}; {message}"


def _check_spec_change(p: Plan, spec: Mapping[str, Any], applied: Mapping[str, Any], now: dt.datetime) -> None:
    current = m.immutable_spec(spec)
    conditions = p.status.get("conditions")
    if current != applied:
        changed = sorted(k for k in set(applied) | set(current) if applied.get(k) != current.get(k))
        fields = ", ".join(f"spec.{k}" for k in changed)
        message = (f"{fields} cannot change while the FineTune exists (only suspend, backoffLimit, "
                   f"maxDisruptions, activeDeadlineSeconds and ttlSecondsAfterFinished can); the workers keep using "
                   f"generation {p.status.get('appliedGeneration')}. Revert the change or create a new FineTune")
        previous = st.get_condition(conditions, st.SPEC_CHANGE_REJECTED)
        if not previous or previous.get("status") != "True" or previous.get("message") != message:
            p.events.append(Event("Warning", st.SPEC_CHANGE_REJECTED, message))
        p.status["conditions"] = st.set_condition(conditions, st.SPEC_CHANGE_REJECTED, True,
                                                  "ImmutableFieldChanged", message, now)
    elif st.condition_is_true(conditions, st.SPEC_CHANGE_REJECTED):
        p.status["conditions"] = st.set_condition(conditions, st.SPEC_CHANGE_REJECTED, False, "SpecReverted",
                                                  "the spec matches the applied spec again", now)


def _finished(p: Plan, finetune: Mapping[str, Any], owned: list[Mapping[str, Any]], now: dt.datetime) -> None:
    spec = finetune.get("spec") or {}
    old = finetune.get("status") or {}
    # A crash right after the transition may have left this undone; repeat it.
    failed = st.get_condition(old.get("conditions"), st.FAILED)
    reason = failed.get("reason") if failed and old.get("phase") == st.FAILED else None
    live = {i: pod for i, pod in enumerate(pod for pod in owned if not pod["metadata"].get("deletionTimestamp"))}
    if reason == "DeadlineExceeded":
        p.delete_pods += [_pod_ref(pod) for pod in live.values()]
    elif reason in ("WorkerFailed", "BackoffLimitExceeded"):
        _stop_or_delete_active(p, {i: st.classify_pod(pod) for i, pod in live.items()}, live)
    ttl = spec.get("ttlSecondsAfterFinished")
    completed = st.parse_timestamp(old.get("completionTime"))
    if ttl is not None and completed and now >= completed + dt.timedelta(seconds=int(ttl)):
        p.delete_finetune = True
        p.events.append(Event("Normal", "Expired", f"deleting the FineTune {ttl}s after it finished (ttlSecondsAfterFinished)"))


def status_patch(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """JSON merge patch from ``old`` to ``new`` status (top-level keys; None deletes)."""
    patch: dict[str, Any] = {}
    for key, value in new.items():
        if value is None:
            if key in old:
                patch[key] = None
        elif old.get(key) != value:
            patch[key] = value
    for key in old:
        if key not in new:
            patch[key] = None
    return patch


# --- Acting on the cluster -----------------------------------------------------------------------

def validate_in_cluster(
    kube: kube_.Kube,
    finetune: Mapping[str, Any],
    allowed_volume_types: tuple[str, ...] = validation.DEFAULT_ALLOWED_VOLUME_TYPES,
    settings: m.PlatformSettings | None = None,
) -> list[str]:
    meta, spec = finetune["metadata"], finetune.get("spec") or {}
    model_cfg, model_error = None, None
    ref = (spec.get("model") or {}).get("config")
    if ref:
        configmap = kube.get_or_none(kube.core_path(meta["namespace"], "configmaps", ref["configMapName"]))
        model_cfg, model_error = validation.parse_model_configmap(configmap, spec, meta["namespace"])
    problems = validation.validate_spec(meta["name"], spec, model_cfg, model_error, allowed_volume_types, settings)
    pod_group_api = m.POD_GROUP_API_VERSIONS.get(m.gang_policy(spec))
    if pod_group_api and not problems and kube.get_or_none(f"/apis/{pod_group_api}") is None:  # (discovery)
        problems.append(validation.pod_group_api_missing(spec))
    return problems


def reconcile(
    kube: kube_.Kube,
    finetune: Mapping[str, Any],
    pods: list[Mapping[str, Any]],
    service_exists: bool,
    *,
    post_event: EventPoster | None = None,
    operator_metrics: metrics_.OperatorMetrics | None = None,
    default_image: str | None = None,
    now: dt.datetime | None = None,
    allowed_volume_types: tuple[str, ...] = validation.DEFAULT_ALLOWED_VOLUME_TYPES,
    network_policy_metrics_from: list[dict[str, Any]] | None = None,
    on_write: WriteListener | None = None,
    settings: m.PlatformSettings | None = None,
) -> Plan | None:
    """Bring one FineTune's pods and status in line with its spec, from what the caller knows
    (kopf's bodies and indexes: no reads). None if it is being deleted.

    The caller's copy of the FineTune may lag behind the operator's own writes. Every write to
    it is conditional on the resourceVersion it was planned from, so a plan made from a stale copy (which could count a restart
    twice) is refused by the apiserver; then the FineTune is read once and planned again. What
    the apiserver answers to each write (and that read) goes to ``on_write``, so the caller can
    plan from it before its watch has caught up. One reconcile per FineTune at a time is the
    caller's job.
    """
    current_time = now or dt.datetime.now(dt.timezone.utc)
    for attempt in range(2):
        if finetune is None or finetune["metadata"].get("deletionTimestamp"):
            return None
        body = finetune
        result = plan(body, pods, service_exists, current_time,
                      lambda: validate_in_cluster(kube, body, allowed_volume_types, settings), default_image,
                      network_policy_metrics_from, settings)
        try:
            _execute(kube, finetune, result, post_event, operator_metrics, on_write)
            return result
        except kube_.StaleObject:
            if attempt:
                raise
            logger.debug("%s/%s changed since it was read; reading it again", finetune["metadata"]["namespace"],
                         finetune["metadata"]["name"])
            finetune = kube.get_finetune(finetune["metadata"]["namespace"], finetune["metadata"]["name"])
            if finetune is not None and on_write:
                on_write(finetune)
    return None  # pragma: no cover - the loop returns or raises


def _is_quota_refusal(error: kube_.KubeError) -> bool:
    return error.status == 403 and "exceeded quota" in (error.message or "")


def _write_status(kube: kube_.Kube, current: Mapping[str, Any], patch: Mapping[str, Any],
                  on_write: WriteListener | None) -> dict[str, Any]:
    """Patch the status only if the FineTune is still the version ``current`` (the copy planned
    from) is; an empty patch only checks that. Returns the FineTune as written.

    A resourceVersion precondition, not a JSON-patch ``test`` of the status: the apiserver
    compares a test's numbers by their JSON text, and Go writes 9.1e-05 as 0.000091, so a
    status holding a small float never passed its own test (a restart then never got written)."""
    meta = current["metadata"]
    written = kube.patch_finetune(meta["namespace"], meta["name"], {"status": dict(patch)}, status=True,
                                  resource_version=meta.get("resourceVersion"))
    if on_write:
        on_write(written)
    return written


def _execute(
    kube: kube_.Kube,
    finetune: Mapping[str, Any],
    p: Plan,
    post_event: EventPoster | None,
    operator_metrics: metrics_.OperatorMetrics | None,
    on_write: WriteListener | None = None,
) -> None:
    meta = finetune["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    current: Mapping[str, Any] = finetune  # the FineTune as the last write left it
    # Order matters for crash safety: record decisions (status) before acting on them.
    patch = status_patch(current.get("status") or {}, p.status)
    acts = p.delete_pods or p.stop_pods or p.create_pods or p.delete_finetune
    if patch or acts:
        # Even with nothing to record, acting on pods checks first that the plan's copy is current.
        current = _write_status(kube, current, patch, on_write)
    for pod_name in p.release_pods:  # before deletions: Kueue reads it from the group's pods
        kube.patch_pod(namespace, pod_name, {"metadata": {"annotations": {m.ANNOTATION_KUEUE_RETRIABLE: "false"}}})
    for pod_name, uid in p.delete_pods:
        kube.delete(namespace, "pods", pod_name, uid or None)
    for pod_name in p.stop_pods:
        kube.patch_pod(namespace, pod_name, {"spec": {"activeDeadlineSeconds": 1}})
    # Before the Service: a Service implies its NetworkPolicy, even across an operator crash.
    if p.create_network_policy:
        kube.create(namespace, "networkpolicies", p.create_network_policy)
    for obj in p.create_objects:  # and its PodGroup before the first pod asks for it
        kube.create_object(namespace, obj)
    if p.create_service:
        kube.create(namespace, "services", p.create_service)
    for created, pod in enumerate(p.create_pods):
        try:
            created_pod = kube.create(namespace, "pods", pod)
            if created_pod:
                logger.info("created pod %s/%s", namespace, pod["metadata"]["name"])
                if on_write:
                    on_write(created_pod)
        except kube_.KubeError as e:
            if e.status >= 500 or e.status == 429:
                raise
            # Rejected by the apiserver (quota, missing PriorityClass, admission policy): the
            # user has to act, so say so where they look; the caller retries later. A partly
            # created worker set is completed then, without counting a restart (see _failed).
            message = f"{CREATE_FAILED_PREFIX} {pod['metadata']['name']}: {e.message or e}"
            recorded = current.get("status") or {}
            refused: dict[str, Any] = {}
            if recorded.get("message") != message:
                refused["message"] = message
            if _is_quota_refusal(e) and not st.condition_is_true(recorded.get("conditions"), QUOTA_EXCEEDED):
                refused["conditions"] = st.set_condition(recorded.get("conditions"), QUOTA_EXCEEDED, True,
                                                         "ExceededQuota", message, dt.datetime.now(dt.timezone.utc))
            news = bool(refused)
            workers = recorded.get("workers") or {}
            if workers:  # the plan counted every pod it meant to create as active
                uncreated = len(p.create_pods) - created
                refused["workers"] = {**workers, "active": max(0, int(workers.get("active") or 0) - uncreated)}
            refused_patch = status_patch(recorded, {**recorded, **refused})
            if refused_patch:
                _write_status(kube, current, refused_patch, on_write)
            if news and post_event:
                post_event(finetune, "Warning", QUOTA_EXCEEDED if _is_quota_refusal(e) else "FailedCreate", message)
            raise
    for event in p.events:
        logger.info("%s %s/%s: %s", event.reason, namespace, name, event.message)
        if post_event:
            post_event(finetune, event.type, event.reason, event.message)
    if operator_metrics:
        for counter in p.counters:
            operator_metrics.count_transition(counter)
        operator_metrics.observe(namespace, name, {k: v for k, v in p.status.items() if v is not None})
    if p.delete_finetune:
        kube.delete_finetune(namespace, name, meta["uid"])


def record_scrape(
    kube: kube_.Kube,
    namespace: str,
    name: str,
    status: Mapping[str, Any],
    scraped: scrape.TrainerMetrics | None,
    operator_metrics: metrics_.OperatorMetrics | None,
    on_write: WriteListener | None = None,
) -> Mapping[str, Any]:
    """Write what rank 0's metrics say into the status (only the metric fields, so it needs no
    precondition: nothing else writes them); returns the status with them."""
    if not (scraped and scraped.values):
        return status
    updated = st.apply_trainer_metrics(status, scraped.as_status())
    patch = status_patch(status, updated)
    if patch:
        written = kube.patch_finetune(namespace, name, {"status": patch}, status=True)
        if on_write:
            on_write(written)
    if operator_metrics:
        operator_metrics.observe(namespace, name, {k: v for k, v in updated.items() if v is not None})
    return updated
