"""``--freeze auto``: the shallowest freeze depth whose measured peak memory fits the run's budget.

Freezing more modules saves memory (their activations are not kept for backward, their
parameters have no gradients and no optimizer state) but trains less of the network. Rather
than guess, rank 0 measures: for a few candidate depths it runs real optimizer steps of the
run's model, batch (per rank), image size, optimizer and precision on the run's device and
records the peak, then picks the shallowest depth whose peak fits the budget less a 10%
margin, and every rank trains at that depth (:func:`decide`, broadcast from rank 0).

How a peak is measured:

* CUDA: ``torch.cuda.max_memory_reserved`` (what the caching allocator took from the
  driver) plus what the device already held when the probe started (the CUDA context and
  anything else on the GPU), so the figure is what the device's limit sees. Probes run in
  the training process one after another; the allocator's peak is reset and its cache
  emptied between them, and a probe that runs out of memory counts as "does not fit".
* CPU: the peak resident set (``VmHWM``) of a fresh Python process that imports torch,
  builds the model and runs the steps: one subprocess per probe (``python -m
  finetune.autofreeze``), so no probe inherits another's high-water mark, and the figure
  includes what the training process itself carries (the interpreter, torch's libraries).
  A probe killed by the kernel (the container's OOM killer) counts as "does not fit".

Candidates: 0, ``backbone`` and ``all-but-detect`` (each always measured, so the log shows
all three; with ``--cache features``, which needs a frozen prefix, 1 instead of 0), then a bisection between the deepest anchor that does not fit and the shallowest
that does (at most ``FINETUNE_FREEZE_REFINE`` more probes, default 4) for a finer boundary:
peak memory falls as more modules freeze, so the bisection finds the shallowest depth that
fits. The budget: ``--memory-budget`` if given, otherwise the GPU's total memory (CUDA) or,
on CPU, the container's memory limit (cgroup v2 ``memory.max``, v1 ``memory.limit_in_bytes``;
the host's memory without one) shared by the whole pod: divided by the training processes on
this node (``LOCAL_WORLD_SIZE``), less an estimate for each of a process's loader workers
(:func:`loader_worker_estimate`). The probes measure training steps; validation (forward
only), the dataset and the loaders' queues are what the 10% margin is for.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .config import FREEZE_AUTO_MARGIN
from .errors import FinetuneError

MARGIN = FREEZE_AUTO_MARGIN  # of the budget, kept free for what the probes do not run
PROBE_STEPS = 3  # optimizer steps per probe: the first allocates optimizer state, the others show it is steady
DEFAULT_REFINE = 4  # bisection probes after the three anchors
LOADER_WORKER_BASE_BYTES = 256 << 20  # a forked loader process: interpreter pages it writes, decoded images
CGROUP_V2_MEMORY_MAX = Path("/sys/fs/cgroup/memory.max")
CGROUP_V1_MEMORY_LIMIT = Path("/sys/fs/cgroup/memory/memory.limit_in_bytes")
_NO_LIMIT = 1 << 60  # cgroup v1 writes a page-rounded 2**63 for "no limit"


def human(n: int | float | None) -> str:
    """1288490188 -> '1.2Gi' (binary units, as Kubernetes quantities and status.gpuMemory)."""
    if n is None:
        return "-"
    amount = float(n)
    for unit in ("", "Ki", "Mi", "Gi"):
        if abs(amount) < 1024:
            return f"{int(amount)}" if unit == "" else f"{amount:.1f}{unit}"
        amount /= 1024
    return f"{amount:.1f}Ti"


# --------------------------------------------------------------------------- what a probe runs
@dataclass(frozen=True)
class ProbeSpec:
    """The training step a probe runs (JSON-able: it goes to the probe subprocess)."""

    model_cfg: dict
    nc: int
    batch: int  # images per rank
    imgsz: int
    optimizer: str = "SGD"
    hyp: dict = field(default_factory=dict)
    amp: str = "auto"
    freeze_bn: bool = True
    device: str = "cpu"
    threads: int = 1
    steps: int = PROBE_STEPS
    seed: int = 0


@dataclass
class Probe:
    """One candidate depth's measured peak; ``peak_bytes`` None when it ran out of memory or failed."""

    depth: int
    peak_bytes: int | None
    seconds: float
    error: str | None = None

    def fits(self, usable_bytes: int) -> bool:
        return self.peak_bytes is not None and self.peak_bytes <= usable_bytes


def _synthetic_batch(spec: ProbeSpec, device: torch.device, generator: torch.Generator):
    """Images as the loader delivers them (float, channels-last) and three boxes per image."""
    imgs = torch.rand(spec.batch, 3, spec.imgsz, spec.imgsz, generator=generator)
    imgs = imgs.to(device, memory_format=torch.channels_last)
    per_image = 3
    n = spec.batch * per_image
    idx = torch.arange(spec.batch).repeat_interleave(per_image).float()
    cls = torch.randint(0, max(spec.nc, 1), (n,), generator=generator).float()
    xy = 0.2 + 0.6 * torch.rand(n, 2, generator=generator)
    wh = 0.05 + 0.3 * torch.rand(n, 2, generator=generator)
    return imgs, torch.cat([idx[:, None], cls[:, None], xy, wh], 1).to(device)


def run_probe_steps(spec: ProbeSpec, depth: int) -> None:
    """``spec.steps`` real optimizer steps at freeze ``depth``: the model, its EMA copy, the
    optimizer and the loss the run builds, forward under the run's autocast, backward, step."""
    from .freeze import freeze_modules
    from .loss import YoloLoss
    from .models import build_model
    from .train import ModelEMA, build_optimizer, optimizer_step, resolve_amp

    device = torch.device(spec.device)
    torch.manual_seed(spec.seed)
    hyp = spec.hyp
    model = build_model(spec.model_cfg, nc=spec.nc)
    freeze_modules(model, depth, freeze_bn=spec.freeze_bn)
    model = model.to(device, memory_format=torch.channels_last)
    optimizer = build_optimizer(model, spec.optimizer, hyp, spec.batch, 1)
    amp_dtype = resolve_amp(spec.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    ema = ModelEMA(model, hyp["ema_decay"], hyp["ema_tau"])
    loss_fn = YoloLoss.from_model(model, hyp, spec.imgsz)
    generator = torch.Generator().manual_seed(spec.seed)
    model.train()
    for _ in range(spec.steps):
        imgs, targets = _synthetic_batch(spec, device, generator)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            preds = model(imgs)
        loss, _ = loss_fn([p.float() for p in preds], targets)
        scaler.scale(loss).backward()
        optimizer_step(model, optimizer, scaler, ema)
        del imgs, targets, preds, loss
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _probe_cuda(spec: ProbeSpec, depth: int) -> Probe:
    device = torch.device(spec.device)
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    free, total = torch.cuda.mem_get_info(device)
    held_before = (total - free) - torch.cuda.memory_reserved(device)  # the context, other processes
    t0 = time.perf_counter()
    try:
        run_probe_steps(spec, depth)
        peak, error = held_before + torch.cuda.max_memory_reserved(device), None
    except torch.OutOfMemoryError as e:
        peak, error = None, f"out of memory ({str(e).splitlines()[0][:160]})"
    seconds = time.perf_counter() - t0
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    return Probe(depth, peak, seconds, error)


def _probe_subprocess(spec: ProbeSpec, depth: int, timeout_s: float | None = None) -> Probe:
    payload = json.dumps({"spec": dataclasses.asdict(spec), "depth": depth})
    env = {**os.environ, "OMP_NUM_THREADS": str(spec.threads)}
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):  # not a torchrun rank
        env.pop(var, None)
    t0 = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, "-m", "finetune.autofreeze"], input=payload, capture_output=True,
                              text=True, env=env, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return Probe(depth, None, time.perf_counter() - t0, f"did not finish within {timeout_s:g}s")
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        if done.returncode < 0:
            why = f"killed by signal {-done.returncode} (out of memory?)"
        else:
            lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
            why = f"exit {done.returncode}: {lines[-1][:200] if lines else 'no output'}"
        return Probe(depth, None, seconds, why)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return Probe(depth, int(result["peak_bytes"]), seconds)


def probe(spec: ProbeSpec, depth: int) -> Probe:
    """Peak memory of ``spec.steps`` optimizer steps at freeze ``depth`` on ``spec.device``."""
    if torch.device(spec.device).type == "cuda":
        return _probe_cuda(spec, depth)
    return _probe_subprocess(spec, depth)


def _probe_main() -> int:
    """The probe subprocess: read {"spec", "depth"} on stdin, print {"peak_bytes"} (this process's VmHWM)."""
    from .allocator import tune_malloc
    from .telemetry import read_peak_rss_bytes

    tune_malloc()  # as the training process does
    request = json.loads(sys.stdin.read())
    spec = ProbeSpec(**request["spec"])
    torch.set_num_threads(max(1, spec.threads))
    run_probe_steps(spec, int(request["depth"]))
    print(json.dumps({"peak_bytes": read_peak_rss_bytes()}))
    return 0


# --------------------------------------------------------------------------- the budget
def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if not text.isdigit():  # "max": no limit
        return None
    value = int(text)
    return value if value < _NO_LIMIT else None


def container_memory_limit(v2: Path = CGROUP_V2_MEMORY_MAX, v1: Path = CGROUP_V1_MEMORY_LIMIT) -> int | None:
    """The container's memory limit in bytes (cgroup v2, else v1), or None without one."""
    limit = _read_int(v2)
    return limit if limit is not None else _read_int(v1)


def loader_worker_estimate(batch: int, imgsz: int) -> int:
    """Memory of one loader process (an estimate, not measured): its private pages, and the
    two batches it keeps prefetched (float32, in shared memory, charged to the pod)."""
    return LOADER_WORKER_BASE_BYTES + 2 * batch * 3 * imgsz * imgsz * 4


@dataclass(frozen=True)
class Budget:
    bytes: int  # per training process
    source: str

    @property
    def usable(self) -> int:
        return int(self.bytes * (1 - MARGIN))


def memory_budget(device: torch.device, explicit: int | None, *, local_processes: int = 1, loader_workers: int = 0,
                  batch: int = 1, imgsz: int = 640, limit: int | None = None) -> Budget:
    """What one training process may use: ``explicit`` (--memory-budget), else its GPU's memory,
    else its share of the container's (or host's) memory. ``limit`` stands in for the cgroup."""
    if explicit is not None:
        return Budget(int(explicit), f"--memory-budget {human(explicit)}")
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        return Budget(int(total), f"GPU memory {human(total)} ({torch.cuda.get_device_name(device)})")
    limit = container_memory_limit() if limit is None else limit
    where = "container memory limit"
    if limit is None:
        limit, where = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "host memory (no container limit)"
    processes = max(1, local_processes)
    workers = loader_worker_estimate(batch, imgsz) * loader_workers
    share = limit // processes - workers
    source = f"{where} {human(limit)}"
    if processes > 1:
        source += f" / {processes} processes"
    if loader_workers:
        source += f" - {loader_workers} loader worker(s) x {human(loader_worker_estimate(batch, imgsz))}"
    if share <= 0:
        raise FinetuneError(f"--freeze auto: the {source} leaves nothing for training; lower --workers or the "
                            "processes per node, or pass --memory-budget")
    return Budget(int(share), source)


# --------------------------------------------------------------------------- the choice
@dataclass
class Choice:
    """What ``--freeze auto`` chose, and why (kept in last.pt, metrics.json, the log, the gauges)."""

    chosen: int
    budget_bytes: int
    usable_bytes: int
    budget_source: str
    probes: list[Probe]
    resumed: bool = False  # reused from last.pt, not measured in this run
    ranks: list[int] = field(default_factory=list)  # the depth each rank received (rank order)

    def to_dict(self) -> dict[str, Any]:
        return {"requested": "auto", "chosen": self.chosen, "budget_bytes": self.budget_bytes,
                "usable_bytes": self.usable_bytes, "margin": MARGIN, "budget_source": self.budget_source,
                "resumed": self.resumed, "ranks": self.ranks,
                "probes": [{**dataclasses.asdict(p), "fits": p.fits(self.usable_bytes)} for p in self.probes]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Choice:
        probes = [Probe(int(p["depth"]), None if p.get("peak_bytes") is None else int(p["peak_bytes"]),
                        float(p.get("seconds", 0.0)), p.get("error")) for p in d.get("probes", [])]
        return cls(int(d["chosen"]), int(d["budget_bytes"]), int(d["usable_bytes"]), str(d["budget_source"]), probes)

    def lines(self) -> list[str]:
        """The log: one line per probe, then the choice."""
        out = []
        for p in sorted(self.probes, key=lambda p: p.depth):
            figure = human(p.peak_bytes) if p.peak_bytes is not None else p.error
            verdict = "fits" if p.fits(self.usable_bytes) else "does not fit"
            out.append(f"freeze auto: depth {p.depth:>2}: peak {figure} ({p.seconds:.1f}s) - {verdict}")
        how = "reused from last.pt" if self.resumed else f"the shallowest of {len(self.probes)} measured that fits"
        out.append(f"freeze auto: chose depth {self.chosen} ({how}) for {human(self.usable_bytes)} usable = "
                   f"{self.budget_source} less the {MARGIN:.0%} margin")
        return out


def no_fit_message(probes: list[Probe], budget: Budget, batch: int, imgsz: int) -> str:
    measured = [p for p in probes if p.peak_bytes is not None]
    if measured:
        best = min(measured, key=lambda p: p.peak_bytes)
        smallest = f"the smallest peak measured is {human(best.peak_bytes)} (depth {best.depth})"
    else:
        smallest = "every probe ran out of memory (" + "; ".join(f"depth {p.depth}: {p.error}" for p in probes) + ")"
    return (f"--freeze auto: no freeze depth fits the memory budget: {smallest}, and {human(budget.usable)} is usable "
            f"({budget.source} less the {MARGIN:.0%} margin); use a smaller --batch (now {batch} per process) or "
            f"--imgsz (now {imgsz}), or a larger --memory-budget")


def choose(anchors: list[int], budget: Budget, measure: Callable[[int], Probe], refine: int = DEFAULT_REFINE,
           log: Callable[[str], None] | None = None, batch: int = 0, imgsz: int = 0, lowest: int = 0) -> Choice:
    """Probe every anchor depth, then bisect between the shallowest that fits and the deepest
    shallower one that does not (or ``lowest``); FinetuneError if none fits."""
    probes: dict[int, Probe] = {}

    def run(depth: int) -> Probe:
        p = probes[depth] = measure(depth)
        if log:
            log(f"freeze auto: probed depth {depth}: {human(p.peak_bytes) if p.peak_bytes is not None else p.error} "
                f"in {p.seconds:.1f}s")
        return p

    anchors = sorted(set(anchors))
    for depth in anchors:
        run(depth)
    fitting = [d for d in anchors if probes[d].fits(budget.usable)]
    if not fitting:
        raise FinetuneError(no_fit_message(list(probes.values()), budget, batch, imgsz))
    hi = fitting[0]
    below = [d for d in anchors if d < hi]
    lo = below[-1] if below else lowest - 1  # a depth known (or not allowed) not to fit
    for _ in range(max(0, refine)):
        if hi - lo <= 1:
            break
        mid = (lo + hi) // 2
        if run(mid).fits(budget.usable):
            hi = mid
        else:
            lo = mid
    chosen = min(d for d, p in probes.items() if p.fits(budget.usable))
    return Choice(chosen, budget.bytes, budget.usable, budget.source, sorted(probes.values(), key=lambda p: p.depth))


def anchor_depths(model_cfg: dict, minimum: int = 0) -> list[int]:
    """0 (or ``minimum``, the shallowest depth allowed), backbone and all-but-detect for this model."""
    from .models.config import freeze_presets

    return sorted({max(d, minimum) for d in (0, *freeze_presets(model_cfg).values())})


def refine_probes() -> int:
    """Bisection probes after the anchors: FINETUNE_FREEZE_REFINE, default 4 (0 = anchors only)."""
    text = os.environ.get("FINETUNE_FREEZE_REFINE", "")
    return int(text) if text.strip().isdigit() else DEFAULT_REFINE


def decide(cfg, model_cfg: dict, nc: int, info, batch_per_rank: int, resume_ckpt: dict | None,
           log: Callable[[str], None], workers: int = 0) -> Choice:
    """The depth every rank trains at: from last.pt when resuming, else measured on rank 0 and
    broadcast. ``cfg`` is the run's TrainConfig, ``info`` its DistInfo."""
    from .distributed import all_gather_object, broadcast_object, cpus_per_process

    record = ((resume_ckpt or {}).get("freeze") or {}) if resume_ckpt is not None else {}
    if resume_ckpt is not None and "depth" in record:
        auto = record.get("auto")
        if auto:
            choice = Choice.from_dict(auto)
            choice.chosen, choice.resumed = int(record["depth"]), True
        else:
            choice = Choice(int(record["depth"]), 0, 0, "last.pt", [], resumed=True)
        log(f"freeze auto: depth {choice.chosen} from last.pt (not probed again)")
        return choice
    result: dict[str, Any] = {}
    if info.is_main:
        try:
            minimum = 1 if cfg.cache == "features" else 0  # the feature cache needs a frozen prefix
            if minimum:
                log("freeze auto: --cache features needs a frozen prefix, so depth 0 is not a candidate")
            budget = memory_budget(info.device, cfg.memory_budget,
                                   local_processes=int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
                                   loader_workers=workers, batch=batch_per_rank, imgsz=cfg.imgsz)
            spec = ProbeSpec(model_cfg=model_cfg, nc=nc, batch=batch_per_rank, imgsz=cfg.imgsz, optimizer=cfg.optimizer,
                             hyp=cfg.hyperparameters, amp=cfg.amp, freeze_bn=cfg.freeze_bn, device=str(info.device),
                             threads=torch.get_num_threads() if info.device.type == "cpu" else cpus_per_process(),
                             seed=cfg.seed)
            log(f"freeze auto: measuring peak memory of {spec.steps} optimizer steps (batch {spec.batch}, imgsz "
                f"{spec.imgsz}, {info.device}) per candidate depth; budget {human(budget.usable)} usable "
                f"({budget.source} less the {MARGIN:.0%} margin)")
            choice = choose(anchor_depths(model_cfg, minimum), budget, lambda d: probe(spec, d), refine_probes(),
                            log=log, batch=batch_per_rank, imgsz=cfg.imgsz, lowest=minimum)
            result = {"choice": choice.to_dict()}
        except FinetuneError as e:
            result = {"error": str(e)}
    result = broadcast_object(result, info)
    if "error" in result:
        raise FinetuneError(result["error"])
    choice = Choice.from_dict(result["choice"])
    choice.ranks = all_gather_object(choice.chosen, info)  # what each rank trains at: rank 0's choice everywhere
    for line in choice.lines():
        log(line)
    return choice


if __name__ == "__main__":
    sys.exit(_probe_main())
