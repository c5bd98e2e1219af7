"""kopf wiring only: each handler forwards to a plain function in ``runtime``."""

from __future__ import annotations

import os
from typing import Any

import kopf

from . import manifests as m
from . import runtime

# How often every FineTune is reconciled even without events (TTL, deadlines, metrics scrape).
RECONCILE_INTERVAL_SECONDS = float(os.environ.get("FINETUNE_OPERATOR_RECONCILE_INTERVAL", "10"))

WORKER_POD_LABELS = {m.LABEL_MANAGED_BY: m.MANAGED_BY, m.LABEL_FINETUNE: kopf.PRESENT}


@kopf.on.create(m.GROUP, m.VERSION, m.PLURAL)
def finetune_created(namespace: str, name: str, **_: Any) -> None:
    runtime.reconcile_change("create", namespace, name)


@kopf.on.resume(m.GROUP, m.VERSION, m.PLURAL)
def finetune_resumed(namespace: str, name: str, **_: Any) -> None:
    runtime.reconcile_change("resume", namespace, name)


@kopf.on.update(m.GROUP, m.VERSION, m.PLURAL, field="spec")
def finetune_spec_changed(namespace: str, name: str, **_: Any) -> None:
    runtime.reconcile_change("update", namespace, name)


@kopf.timer(m.GROUP, m.VERSION, m.PLURAL, interval=RECONCILE_INTERVAL_SECONDS)
def finetune_timer(namespace: str, name: str, **_: Any) -> None:
    runtime.reconcile_periodically(namespace, name)


@kopf.on.event("", "v1", "pods", labels=WORKER_POD_LABELS)
def worker_pod_event(namespace: str, labels: dict[str, str], **_: Any) -> None:
    runtime.reconcile_owner_of_pod(namespace, labels[m.LABEL_FINETUNE])


@kopf.on.delete(m.GROUP, m.VERSION, m.PLURAL)
def finetune_deleted(namespace: str, name: str, **_: Any) -> None:
    runtime.forget_finetune(namespace, name)
