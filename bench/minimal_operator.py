"""The scale benchmark's baseline: the least a kopf operator can do for a FineTune.

One create handler that creates the headless Service and the worker pods (the same bodies
the FineTune operator builds), nothing else: no status, no timers, no pod watch.

    kopf run bench/minimal_operator.py --all-namespaces --standalone
"""

from __future__ import annotations

from typing import Any

import kopf

from finetune_operator import kube as kube_
from finetune_operator import manifests as m


@kopf.on.startup()
def connect(memo: kopf.Memo, **_: Any) -> None:
    memo.kube = kube_.Kube()


@kopf.on.create(m.GROUP, m.VERSION, m.PLURAL)
def create_service_and_pods(body: kopf.Body, namespace: str, name: str, memo: kopf.Memo, **_: Any) -> None:
    spec = m.with_defaults(body["spec"])
    memo.kube.create(namespace, "services", m.build_service(name, namespace, body))
    for index in range(int(spec["workers"])):
        memo.kube.create(namespace, "pods",
                         m.build_worker_pod(name, namespace, spec, index, body, 0, m.DEFAULT_TRAINER_IMAGE))
