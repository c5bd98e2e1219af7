"""`python -m finetune.launch` = torchrun, with the workers' exit status passed through.

torchrun exits 1 whenever any worker fails, whatever the cause, so a pod running it
directly cannot tell an OOM kill (retryable) from a bad data.yaml (permanent). This thin
wrapper runs torchrun's own launcher and exits with the first failed worker's code:
128+N for a worker killed by signal N, the worker's exit code otherwise (2 = a user error
the trainer already explained). The operator classifies pods by that code.
"""

from __future__ import annotations

import signal
import sys

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import parse_args, run


def exit_code_of(error: ChildFailedError) -> int:
    """The exit code of the worker that failed first, mapping death by signal N to 128+N.

    Once one worker fails the agent SIGTERMs the rest, so SIGTERM deaths are only the
    answer when nothing else failed (e.g. the pod itself was being stopped)."""
    failures = sorted(error.failures.items(), key=lambda kv: (kv[1].exitcode == -signal.SIGTERM,
                                                                kv[1].timestamp, kv[0]))
    code = failures[0][1].exitcode
    return 128 - code if code < 0 else code or 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv if argv is not None else sys.argv[1:])
    try:
        run(args)
    except ChildFailedError as exc:
        code = exit_code_of(exc)
        print(f"finetune.launch: a worker failed with exit code {code}", file=sys.stderr)
        return code
    except SignalException as exc:
        return 128 + int(exc.sigval)
    except KeyboardInterrupt:
        return 128 + signal.SIGINT
    return 0


if __name__ == "__main__":
    sys.exit(main())
