"""Serve the operator's real metrics (finetune_operator.metrics) without a cluster.

    python tests/e2e/prom_operator_metrics.py --port P --state STATE.json

STATE.json: {"finetunes": [{"namespace": ..., "name": ..., "status": {...FineTune status...}}],
             "transitions": {"created": 2, "failed": 1, ...}, "handlers": {"create": 3, ...}}
Each status goes through ``OperatorMetrics.observe`` (as the operator's handlers do), each
transition through ``count_transition``, each handler count through ``time_handler``; then
prometheus_client serves the default registry on 127.0.0.1:P, as ``finetune-operator`` does
on its --metrics-port. Prints ``ready`` and runs until stdin closes or SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading

import prometheus_client
from finetune_operator import metrics as metrics_


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--address", default="127.0.0.1")
    parser.add_argument("--state", required=True, help="JSON file (see the module docstring)")
    args = parser.parse_args()
    with open(args.state) as f:
        state = json.load(f)

    m = metrics_.OperatorMetrics()
    for handler, count in (state.get("handlers") or {}).items():
        for _ in range(int(count)):
            with m.time_handler(handler):
                pass
    for ft in state.get("finetunes") or []:
        with m.time_handler("status"):
            m.observe(ft["namespace"], ft["name"], ft["status"])
    for kind, count in (state.get("transitions") or {}).items():
        for _ in range(int(count)):
            m.count_transition(kind)

    prometheus_client.start_http_server(args.port, addr=args.address)
    print("ready", flush=True)

    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
    done.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
