"""The FineTune state machine: ``plan()`` decides, ``reconcile()`` reads the cluster and acts.

Level-triggered: every call reads the FineTune and its pods fresh from the API and computes
what should happen from that alone, so it does not matter which handler called it (create,
update, timer, pod event), how often, or whether the operator restarted in between.

Idempotence rules:
- Pods have fixed names (``<name>-worker-<i>``) and are created with POST; 409 means done.
- Pods carry ``finetune.dev/attempt`` = status.restarts at creation. A restart first records
  restarts+1 in status, then deletes the pods; pods of an older attempt are deleted on sight,
  so a crash between the two steps neither loses nor double-counts the restart.
- The immutable part of the spec is stored in an annotation when the run starts; pods are
  always built from it, so a rejected spec change is never half-applied.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import json
import logging
import threading
from typing import Any, Callable, Mapping

from . import kube as kube_
from . import manifests as m
from . import metrics as metrics_
from . import scrape
from . import status as st
from . import validation

logger = logging.getLogger(__name__)

CREATE_FAILED_PREFIX = "cannot create worker pod"

EventPoster = Callable[[Mapping[str, Any], str, str, str], None]


@dataclasses.dataclass
class Event:
    type: str  # Normal or Warning
    reason: str
    message: str


@dataclasses.dataclass
class Plan:
    status: dict[str, Any]
    annotations: dict[str, str] = dataclasses.field(default_factory=dict)
    create_service: dict[str, Any] | None = None
    # Only when the operator's network policy setting is on (isolation of the run's pods).
    create_network_policy: dict[str, Any] | None = None
    create_pods: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    delete_pods: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (name, uid)
    # Running pods of a failed run: stopped via activeDeadlineSeconds so the kubelet kills the
    # containers but the pod objects (and their logs) stay.
    stop_pods: list[str] = dataclasses.field(default_factory=list)
    delete_finetune: bool = False
    events: list[Event] = dataclasses.field(default_factory=list)
    counters: list[str] = dataclasses.field(default_factory=list)
    scrape_pod: dict[str, Any] | None = None

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


def plan(
    finetune: Mapping[str, Any],
    pods: list[Mapping[str, Any]],
    service_exists: bool,
    now: dt.datetime,
    validate: Callable[[], list[str]],
    default_image: str | None = None,
    network_policy_metrics_from: list[dict[str, Any]] | None = None,
) -> Plan:
    """Decide what to do for one FineTune, given everything read from the cluster.

    ``network_policy_metrics_from`` None: no NetworkPolicy; else the peers allowed to scrape."""
    meta = finetune["metadata"]
    name, namespace, uid = meta["name"], meta["namespace"], meta["uid"]
    generation = meta.get("generation")
    spec = finetune.get("spec") or {}
    old = finetune.get("status") or {}
    p = Plan(status=copy.deepcopy(dict(old)))
    p.status["observedGeneration"] = generation
    phase = old.get("phase")
    applied_json = (meta.get("annotations") or {}).get(m.ANNOTATION_APPLIED_SPEC)
    owned = _owned(pods, uid)

    # --- Finished runs: only TTL and cleanup of leftovers ---------------------------------
    if phase in st.TERMINAL_PHASES:
        if applied_json is None and phase == st.FAILED and old.get("observedGeneration") != generation:
            # The spec that failed validation was edited: validate it again from scratch.
            p.status = {
                "observedGeneration": generation,
                "conditions": st.set_condition(old.get("conditions"), st.FAILED, False, "SpecChanged",
                                               "the spec changed; validating it again", now),
            }
            phase = None
        else:
            _finished(p, finetune, owned, now)
            return p

    # --- Start: validate and record the applied spec --------------------------------------
    if applied_json is None:
        problems = validate()
        if problems:
            message = "invalid spec: " + "; ".join(problems)
            _finish(p, st.FAILED, "ValidationFailed", message, now)
            return p
        applied = m.immutable_spec(spec)
        p.annotations[m.ANNOTATION_APPLIED_SPEC] = json.dumps(applied, sort_keys=True, separators=(",", ":"))
        workers = int(applied["workers"])
        p.status.update({
            "appliedSpecHash": m.spec_hash(spec),
            "appliedGeneration": generation,
            "restarts": 0,
            "epoch": 0,
            "epochs": int(applied["training"]["epochs"]),
            "progress": st.progress(0, int(applied["training"]["epochs"])),
        })
        message = f"created headless Service {m.service_name(name)} and {workers} worker pod(s)"
        p.status["conditions"] = st.set_condition(p.status.get("conditions"), st.CREATED, True, "Created", message, now)
        p.status = st.enter_phase(p.status, st.PENDING, "Created", f"waiting for {workers} worker pod(s) to start", now)
        p.events.append(Event("Normal", "Created", message))
        p.counters.append("created")
    else:
        applied = json.loads(applied_json)
        _check_spec_change(p, spec, applied, now)
    effective = m.with_defaults({**applied, **{k: spec[k] for k in m.MUTABLE_FIELDS if k in spec}})
    workers = int(effective["workers"])

    if not service_exists:
        p.create_service = m.build_service(name, namespace, finetune)
        if network_policy_metrics_from is not None:
            p.create_network_policy = m.build_network_policy(name, namespace, finetune,
                                                             network_policy_metrics_from)

    attempt = int(p.status.get("restarts") or 0)
    live = [pod for pod in owned if not pod["metadata"].get("deletionTimestamp")]
    terminating = [pod for pod in owned if pod["metadata"].get("deletionTimestamp")]
    stale = [pod for pod in live
             if _label(pod, m.LABEL_ATTEMPT) != str(attempt)
             or not str(_label(pod, m.LABEL_WORKER_INDEX) or "").isdigit()
             or int(_label(pod, m.LABEL_WORKER_INDEX) or 0) >= workers]
    current = {int(_label(pod, m.LABEL_WORKER_INDEX) or 0): pod for pod in live if pod not in stale}
    p.delete_pods += [_pod_ref(pod) for pod in stale]
    outcomes = {i: st.classify_pod(pod) for i, pod in sorted(current.items())}
    p.status["workers"] = _worker_counts(outcomes)

    # --- Suspend / resume -------------------------------------------------------------------
    if effective.get("suspend"):
        p.delete_pods += [_pod_ref(pod) for pod in current.values()]
        p.status["workers"] = {"active": 0, "succeeded": 0, "failed": 0}
        if phase != st.SUSPENDED:
            message = "suspended: worker pods deleted; set spec.suspend to false to resume from last.pt"
            p.status = st.enter_phase(p.status, st.SUSPENDED, "Suspended", message, now)
            # Like a Job: the active deadline counts from the (re)start, not across a suspension.
            p.status["startTime"] = None
            p.events.append(Event("Normal", "Suspended", message))
        return p
    if phase == st.SUSPENDED:
        message = f"resumed: recreating {workers} worker pod(s); the trainer continues from last.pt"
        p.status = st.enter_phase(p.status, st.PENDING, "Resumed", message, now)
        p.events.append(Event("Normal", "Resumed", message))
        phase = st.PENDING
    if not p.status.get("startTime"):
        p.status["startTime"] = st.timestamp(now)

    # --- activeDeadlineSeconds ----------------------------------------------------------------
    deadline = effective.get("activeDeadlineSeconds")
    started = st.parse_timestamp(p.status["startTime"])
    if deadline and started and now >= started + dt.timedelta(seconds=int(deadline)):
        message = f"the run was active longer than spec.activeDeadlineSeconds ({deadline}s); worker pods deleted"
        _finish(p, st.FAILED, "DeadlineExceeded", message, now)
        p.delete_pods += [_pod_ref(pod) for pod in current.values()]
        return p

    # --- Failures -------------------------------------------------------------------------------
    permanent = [o for o in outcomes.values() if o.state == "failed" and not o.retryable]
    retryable = [o for o in outcomes.values() if o.state == "failed" and o.retryable]
    missing = [i for i in range(workers) if i not in current]
    run_started = any(o.state != "pending" for o in outcomes.values())
    if missing and run_started and not stale and not terminating and not permanent and not retryable:
        # A worker of a started run vanished (deleted, node gone): the others cannot continue.
        retryable.append(st.PodOutcome(m.worker_pod_name(name, missing[0]), "failed", True,
                                       reason="Deleted", detail="the pod disappeared"))
    if permanent:
        failure = permanent[0]
        message = (f"{failure.describe()}; a permanent failure is not retried. Pods are kept for "
                   f"their logs: kubectl logs {failure.name}")
        _finish(p, st.FAILED, "WorkerFailed", message, now)
        _stop_or_delete_active(p, outcomes, current)
        return p
    if retryable:
        failure = retryable[0]
        limit = int(effective["backoffLimit"])
        if attempt >= limit:
            message = (f"{failure.describe()}; backoffLimit {limit} reached after {attempt} restart(s). "
                       f"Pods are kept for their logs: kubectl logs {failure.name}")
            _finish(p, st.FAILED, "BackoffLimitExceeded", message, now)
            _stop_or_delete_active(p, outcomes, current)
            return p
        p.status["restarts"] = attempt + 1
        message = (f"{failure.describe()}; restarting all {workers} workers from last.pt "
                   f"(restart {attempt + 1} of backoffLimit {limit})")
        p.status = st.enter_phase(p.status, st.RESTARTING, "RetryableFailure", message, now)
        p.status["workers"] = {"active": 0, "succeeded": 0, "failed": 0}
        p.delete_pods += [_pod_ref(pod) for pod in current.values()]
        p.events.append(Event("Warning", "Restarting", message))
        p.counters.append("restarts")
        return p

    # --- Create what is missing, then report --------------------------------------------------
    if stale or terminating:
        waiting = sorted({pod["metadata"]["name"] for pod in stale + terminating})
        p.status["message"] = f"waiting for old worker pod(s) to terminate: {', '.join(waiting)}"
        return p
    for index in missing:
        p.create_pods.append(m.build_worker_pod(name, namespace, effective, index, finetune, attempt, default_image))

    states = [outcomes[i].state if i in outcomes else "pending" for i in range(workers)]
    if all(s == "succeeded" for s in states):
        checkpoint = m.checkpoint_path(effective)
        p.status["checkpoint"] = checkpoint
        _finish(p, st.SUCCEEDED, "Completed", f"all {workers} worker(s) succeeded; best checkpoint {checkpoint}", now)
        return p
    if all(s in ("running", "succeeded") for s in states):
        if phase != st.RUNNING:
            message = f"all {workers} worker(s) running"
            p.status = st.enter_phase(p.status, st.RUNNING, "WorkersRunning", message, now)
            p.events.append(Event("Normal", "Running", message))
        p.scrape_pod = dict(current[0]) if 0 in current else None
        return p

    details = [f"{m.worker_pod_name(name, i)} {('(' + outcomes[i].detail + ')') if i in outcomes and outcomes[i].detail else ''}".strip()
               for i in range(workers) if states[i] == "pending"]
    message = f"waiting for worker pod(s) to start: {', '.join(details)}"
    if p.create_pods and str(old.get("message", "")).startswith(CREATE_FAILED_PREFIX):
        message = old["message"]  # keep saying why the pods do not exist until they do
    if phase in (None, st.RUNNING):
        p.status = st.enter_phase(p.status, st.PENDING, "WaitingForWorkers", message, now)
    elif phase == st.RESTARTING:
        # Keep saying why it restarts until every worker runs again.
        restarting = st.get_condition(p.status.get("conditions"), st.RESTARTING) or {}
        p.status["message"] = f"{restarting.get('message', 'restarting')}; {message}"
    else:
        p.status["message"] = message
    return p


def _check_spec_change(p: Plan, spec: Mapping[str, Any], applied: Mapping[str, Any], now: dt.datetime) -> None:
    current = m.immutable_spec(spec)
    conditions = p.status.get("conditions")
    if current != applied:
        changed = sorted(k for k in set(applied) | set(current) if applied.get(k) != current.get(k))
        fields = ", ".join(f"spec.{k}" for k in changed)
        message = (f"{fields} cannot change while the FineTune exists (only suspend, backoffLimit, "
                   f"activeDeadlineSeconds and ttlSecondsAfterFinished can); the workers keep using "
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

_locks: dict[tuple[str, str], threading.Lock] = {}
_locks_guard = threading.Lock()


def _lock_for(namespace: str, name: str) -> threading.Lock:
    """Handlers run in kopf's thread pool; one reconcile per FineTune at a time."""
    with _locks_guard:
        return _locks.setdefault((namespace, name), threading.Lock())


def forget(namespace: str, name: str) -> None:
    with _locks_guard:
        _locks.pop((namespace, name), None)


def validate_in_cluster(
    kube: kube_.Kube,
    finetune: Mapping[str, Any],
    allowed_volume_types: tuple[str, ...] = validation.DEFAULT_ALLOWED_VOLUME_TYPES,
) -> list[str]:
    meta, spec = finetune["metadata"], finetune.get("spec") or {}
    model_cfg, model_error = None, None
    ref = (spec.get("model") or {}).get("config")
    if ref:
        configmap = kube.get_or_none(kube.core_path(meta["namespace"], "configmaps", ref["configMapName"]))
        model_cfg, model_error = validation.parse_model_configmap(configmap, spec, meta["namespace"])
    return validation.validate_spec(meta["name"], spec, model_cfg, model_error, allowed_volume_types)


def reconcile(
    kube: kube_.Kube,
    namespace: str,
    name: str,
    *,
    post_event: EventPoster | None = None,
    operator_metrics: metrics_.OperatorMetrics | None = None,
    default_image: str | None = None,
    scrape_timeout: float = 2.0,
    now: dt.datetime | None = None,
    allowed_volume_types: tuple[str, ...] = validation.DEFAULT_ALLOWED_VOLUME_TYPES,
    network_policy_metrics_from: list[dict[str, Any]] | None = None,
) -> Plan | None:
    """Bring one FineTune's pods and status in line with its spec; None if it is gone."""
    with _lock_for(namespace, name):
        finetune = kube.get_finetune(namespace, name)
        if finetune is None or finetune["metadata"].get("deletionTimestamp"):
            return None
        pods = kube.list_pods(namespace, f"{m.LABEL_FINETUNE}={name}")
        service = kube.get_or_none(kube.core_path(namespace, "services", m.service_name(name)))
        current_time = now or dt.datetime.now(dt.timezone.utc)
        result = plan(finetune, pods, service is not None, current_time,
                      lambda: validate_in_cluster(kube, finetune, allowed_volume_types), default_image,
                      network_policy_metrics_from)
        _execute(kube, finetune, result, post_event, operator_metrics, scrape_timeout)
        return result


def _execute(
    kube: kube_.Kube,
    finetune: Mapping[str, Any],
    p: Plan,
    post_event: EventPoster | None,
    operator_metrics: metrics_.OperatorMetrics | None,
    scrape_timeout: float,
) -> None:
    meta = finetune["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    old_status = finetune.get("status") or {}
    # Order matters for crash safety: record decisions (annotation, status) before acting on them.
    if p.annotations:
        kube.patch_finetune(namespace, name, {"metadata": {"annotations": p.annotations}})
    patch = status_patch(old_status, p.status)
    if patch:
        kube.patch_finetune(namespace, name, {"status": patch}, status=True)
    for pod_name, uid in p.delete_pods:
        kube.delete(namespace, "pods", pod_name, uid or None)
    for pod_name in p.stop_pods:
        kube.patch_pod(namespace, pod_name, {"spec": {"activeDeadlineSeconds": 1}})
    # Before the Service: a Service implies its NetworkPolicy, even across an operator crash.
    if p.create_network_policy:
        kube.create(namespace, "networkpolicies", p.create_network_policy)
    if p.create_service:
        kube.create(namespace, "services", p.create_service)
    for pod in p.create_pods:
        try:
            if kube.create(namespace, "pods", pod):
                logger.info("created pod %s/%s", namespace, pod["metadata"]["name"])
        except kube_.KubeError as e:
            if e.status >= 500 or e.status == 429:
                raise
            # Rejected by the apiserver (quota, missing PriorityClass, admission policy): the
            # user has to act, so say so where they look; the handler retries later.
            message = f"{CREATE_FAILED_PREFIX} {pod['metadata']['name']}: {e.message or e}"
            if old_status.get("message") != message:
                kube.patch_finetune(namespace, name, {"status": {"message": message}}, status=True)
                if post_event:
                    post_event(finetune, "Warning", "FailedCreate", message)
            raise
    for event in p.events:
        logger.info("%s %s/%s: %s", event.reason, namespace, name, event.message)
        if post_event:
            post_event(finetune, event.type, event.reason, event.message)
    final_status = {k: v for k, v in p.status.items() if v is not None}
    if p.scrape_pod:
        url = scrape.metrics_url(p.scrape_pod, m.METRICS_PORT)
        scraped = scrape.scrape(url, name, scrape_timeout) if url else None
        if scraped and scraped.values:
            updated = st.apply_trainer_metrics(final_status, scraped.as_status())
            patch = status_patch(final_status, updated)
            if patch:
                kube.patch_finetune(namespace, name, {"status": patch}, status=True)
            final_status = updated
    if operator_metrics:
        for counter in p.counters:
            operator_metrics.count_transition(counter)
        operator_metrics.observe(namespace, name, final_status)
    if p.delete_finetune:
        kube.delete_finetune(namespace, name, meta["uid"])
