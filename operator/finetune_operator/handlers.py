"""kopf wiring only: indexes of what the operator watches, and handlers that forward to ``runtime``.

The indexes (kopf keeps them from its watches) are all the reconciler reads: a reconcile makes
no GET or LIST, only the writes it decides on.
"""

from __future__ import annotations

from typing import Any

import kopf

from . import manifests as m
from . import runtime

# Pods and Services the operator made (also the server-side label selector of their watches,
# set in main's startup handler).
OWNED_LABELS = {m.LABEL_MANAGED_BY: m.MANAGED_BY, m.LABEL_FINETUNE: kopf.PRESENT}


@kopf.index(m.GROUP, m.VERSION, m.PLURAL)
def finetunes_by_name(namespace: str, name: str, body: kopf.Body, **_: Any) -> dict[runtime.Key, Any]:
    return {(namespace, name): runtime.finetune_entry(body)}


@kopf.index("", "v1", "pods", labels=OWNED_LABELS)
def worker_pods_by_finetune(namespace: str, labels: kopf.Labels, body: kopf.Body, **_: Any) -> dict[runtime.Key, Any]:
    return {(namespace, labels[m.LABEL_FINETUNE]): runtime.pod_entry(body)}


@kopf.index("", "v1", "services", labels=OWNED_LABELS)
def services_by_finetune(namespace: str, labels: kopf.Labels, **_: Any) -> dict[runtime.Key, bool]:
    return {(namespace, labels[m.LABEL_FINETUNE]): True}


def _cache(finetunes_by_name: kopf.Index, worker_pods_by_finetune: kopf.Index,
           services_by_finetune: kopf.Index) -> runtime.Cache:
    return runtime.Cache(finetunes_by_name, worker_pods_by_finetune, services_by_finetune)


@kopf.on.create(m.GROUP, m.VERSION, m.PLURAL)
def finetune_created(namespace: str, name: str, body: kopf.Body, memo: kopf.Memo, finetunes_by_name: kopf.Index,
                     worker_pods_by_finetune: kopf.Index, services_by_finetune: kopf.Index, **_: Any) -> None:
    cache = _cache(finetunes_by_name, worker_pods_by_finetune, services_by_finetune)
    runtime.reconcile_change(memo.runtime, "create", (namespace, name), cache, body)


@kopf.on.resume(m.GROUP, m.VERSION, m.PLURAL)
def finetune_resumed(namespace: str, name: str, body: kopf.Body, memo: kopf.Memo, finetunes_by_name: kopf.Index,
                     worker_pods_by_finetune: kopf.Index, services_by_finetune: kopf.Index, **_: Any) -> None:
    cache = _cache(finetunes_by_name, worker_pods_by_finetune, services_by_finetune)
    runtime.reconcile_change(memo.runtime, "resume", (namespace, name), cache, body)


@kopf.on.update(m.GROUP, m.VERSION, m.PLURAL, field="spec")
def finetune_spec_changed(namespace: str, name: str, body: kopf.Body, memo: kopf.Memo, finetunes_by_name: kopf.Index,
                          worker_pods_by_finetune: kopf.Index, services_by_finetune: kopf.Index, **_: Any) -> None:
    cache = _cache(finetunes_by_name, worker_pods_by_finetune, services_by_finetune)
    runtime.reconcile_change(memo.runtime, "update", (namespace, name), cache, body)


def _has_clock(body: kopf.Body, **_: Any) -> bool:
    return runtime.has_clock(body)


@kopf.daemon(m.GROUP, m.VERSION, m.PLURAL, when=_has_clock)
async def finetune_clock(namespace: str, name: str, body: kopf.Body, memo: kopf.Memo, stopped: kopf.DaemonStopped,
                         finetunes_by_name: kopf.Index, worker_pods_by_finetune: kopf.Index,
                         services_by_finetune: kopf.Index, **_: Any) -> None:
    cache = _cache(finetunes_by_name, worker_pods_by_finetune, services_by_finetune)
    await runtime.run_clock(memo.runtime, (namespace, name), body, stopped, cache)


@kopf.on.event("", "v1", "pods", labels=OWNED_LABELS)
def worker_pod_event(namespace: str, labels: kopf.Labels, memo: kopf.Memo, finetunes_by_name: kopf.Index,
                     worker_pods_by_finetune: kopf.Index, services_by_finetune: kopf.Index, **_: Any) -> None:
    cache = _cache(finetunes_by_name, worker_pods_by_finetune, services_by_finetune)
    runtime.reconcile_owner_of_pod(memo.runtime, (namespace, labels[m.LABEL_FINETUNE]), cache)


@kopf.on.delete(m.GROUP, m.VERSION, m.PLURAL)
def finetune_deleted(namespace: str, name: str, memo: kopf.Memo, **_: Any) -> None:
    runtime.forget_finetune(memo.runtime, (namespace, name))
