"""Fine-tuning loop: build steps, `train_one_epoch`, `evaluate`, checkpoints.

Reads top to bottom like torchvision's detection references: `init_distributed()` from
torchrun's environment, build the data, model, optimizer and schedule, then one loop over
epochs that trains, validates (with the EMA weights), writes `last.pt`/`best.pt` on rank 0
and publishes metrics. The same function runs alone or under `torchrun`.
"""

from __future__ import annotations

import copy
import logging
import math
import random
import signal
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from . import __version__, autofreeze
from .allocator import tune_malloc
from .checkpoint import CHECKPOINT_FORMAT, load_resume_checkpoint, save_checkpoint, write_json, write_results_csv
from .config import FREEZE_AUTO, TrainConfig
from .data.config import load_data_config
from .data.dataset import YoloDataset, auto_workers, build_dataloader
from .distributed import (DistInfo, all_gather_object, all_reduce_mean, any_rank, barrier, broadcast_object,
                          cleanup, init_distributed, set_cpu_threads)
from .errors import FinetuneError, Interrupted
from .evaluate import evaluate
from .feature_cache import FeatureCache, cached_loader, model_input, open_or_build
from .freeze import freeze_modules, set_train_mode, unwrap_model
from .loss import YoloLoss
from .models import build_model
from .models.config import load_model_config, resolve_freeze
from .progress import RunLogger
from .telemetry import MemorySample, TrainingMetrics, finetune_name, reset_peak_memory

log = logging.getLogger("finetune")

LOSS_NAMES = ("box", "obj", "cls")


# --------------------------------------------------------------------------- build steps
def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """`auto` = bf16 where the GPU supports it, fp16 on older GPUs, off on the CPU."""
    if amp == "off" or device.type != "cuda":
        if amp in ("bf16", "fp16") and device.type != "cuda":
            log.warning("--amp %s ignored: mixed precision is only used on CUDA", amp)
        return None
    if amp == "fp16":
        return torch.float16
    if amp == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def lr_lambda(schedule: str, epochs: int, lrf: float):
    """Per-epoch LR multiplier going from 1 to `lrf` (cosine or linear)."""
    if schedule == "linear":
        return lambda e: (1 - e / epochs) * (1.0 - lrf) + lrf
    return lambda e: ((1 - math.cos(e * math.pi / epochs)) / 2) * (lrf - 1) + 1


def accumulation_steps(hyp: dict[str, float], batch: int) -> int:
    """Batches whose gradients add up to one optimizer step: the nominal batch ``nbs`` (64,
    as YOLOv5) over the real one, at least 1."""
    return max(round(hyp["nbs"] / batch), 1)


def build_optimizer(model: nn.Module, name: str, hyp: dict[str, float], batch: int, accumulate: int):
    """Three parameter groups as in YOLOv5: decayed weights, BatchNorm weights and biases
    (neither decayed). Frozen parameters are left out entirely."""
    decay, no_decay_bn, biases = [], [], []
    for module in model.modules():
        for pname, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            if pname == "bias":
                biases.append(p)
            elif isinstance(module, nn.modules.batchnorm._BatchNorm):
                no_decay_bn.append(p)
            else:
                decay.append(p)
    weight_decay = hyp["weight_decay"] * batch * accumulate / hyp["nbs"]
    groups = [
        {"params": no_decay_bn, "weight_decay": 0.0, "group": "bn"},
        {"params": decay, "weight_decay": weight_decay, "group": "weights"},
        {"params": biases, "weight_decay": 0.0, "group": "bias"},
    ]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise FinetuneError("every parameter is frozen: lower --freeze so that at least the Detect layer trains")
    if name == "AdamW":
        return torch.optim.AdamW(groups, lr=hyp["lr0"], betas=(hyp["momentum"], 0.999))
    return torch.optim.SGD(groups, lr=hyp["lr0"], momentum=hyp["momentum"], nesterov=True)


class ModelEMA:
    """Exponential moving average of a model's weights and buffers, with YOLOv5's decay ramp
    d = decay * (1 - exp(-updates / tau)), so early updates follow the model closely.

    Not torch's ``AveragedModel``: its ``update_parameters`` walks every parameter and
    buffer in Python on each call, ~2 ms for yolov5n on a 2-core node, about 30x the
    averaging itself (measured). Here the pairs of tensors that can change are collected
    once and averaged with one fused ``_foreach_lerp_``: trainable parameters and floating
    buffers (BatchNorm statistics). Frozen parameters never change, so their average is
    their value and they are skipped. Integer buffers (BatchNorm's ``num_batches_tracked``)
    are copied, not averaged. ``module`` is the averaged copy, evaluated and checkpointed.
    """

    def __init__(self, model: nn.Module, decay: float, tau: float):
        self.module = copy.deepcopy(unwrap_model(model))
        self.module.requires_grad_(False)
        self.decay, self.tau = decay, tau
        self.updates = 0  # updates so far; the first one copies the model (d = 0)
        self._source: nn.Module | None = None

    def _bind(self, model: nn.Module) -> None:
        averaged = dict(self.module.named_parameters())
        current = dict(model.named_parameters())
        if averaged.keys() != current.keys():
            raise ValueError("the EMA follows a model of another architecture")
        averaged_pairs = [(averaged[k], v) for k, v in current.items() if v.requires_grad]
        copied_pairs = []
        for pair in zip(self.module.buffers(), model.buffers()):
            (averaged_pairs if pair[0].is_floating_point() else copied_pairs).append(pair)
        self._float = ([a for a, _ in averaged_pairs], [b for _, b in averaged_pairs])
        self._other = ([a for a, _ in copied_pairs], [b for _, b in copied_pairs])
        self._source = model

    @torch.no_grad()
    def update_parameters(self, model: nn.Module) -> None:
        if model is not self._source:
            self._bind(model)
        d = self.decay * (1 - math.exp(-self.updates / self.tau))
        torch._foreach_lerp_(self._float[0], self._float[1], 1.0 - d)
        if self._other[0]:
            torch._foreach_copy_(self._other[0], self._other[1])
        self.updates += 1


def portable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weights as a checkpoint holds them: on the CPU and in the standard (contiguous)
    layout. The model trains channels-last, whose strided conv weights some consumers of a
    checkpoint refuse (safetensors, for one) or would copy on every load."""
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


@dataclass
class RunState:
    """What survives a restart, beside the weights and optimizer: saved in last.pt."""

    start_epoch: int = 0
    best_fitness: float = -1.0
    best_epoch: int = -1
    epochs_without_improvement: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best_metrics: dict[str, float] = field(default_factory=dict)
    wall_time_s: float = 0.0


# --------------------------------------------------------------------------- graceful stop
class StopSignal:
    """SIGTERM (pod deletion for suspend, preemption, eviction, drain) sets a flag; the ranks
    agree on it at optimizer-step boundaries, one small all-reduce each, so every rank stops
    after the same step and no accumulated gradient is lost."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def install(self) -> None:
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread (a test driving train() from a thread)
            self._previous = None

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True

    def agreed(self, info: DistInfo) -> bool:
        return any_rank(self.requested, info)


@dataclass
class EpochProgress:
    """How far one rank got through an interrupted epoch (saved in last.pt, per rank)."""

    batches_done: int = 0
    loss_sum: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    images: int = 0
    elapsed_s: float = 0.0
    data_wait_s: float = 0.0


# --------------------------------------------------------------------------- one epoch
def optimizer_step(model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                   ema: ModelEMA) -> None:
    """Once per nominal batch (after the accumulated backward passes): unscale and clip the
    gradients, step, clear the gradients, update the EMA."""
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=10.0)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    ema.update_parameters(unwrap_model(model))


def train_one_epoch(
    model: nn.Module,
    loader,
    optimizer: torch.optim.Optimizer,
    loss_fn: YoloLoss,
    ema: ModelEMA,
    epoch: int,
    cfg: TrainConfig,
    info: DistInfo,
    amp_dtype: torch.dtype | None,
    scaler: torch.amp.GradScaler,
    lf,
    on_step=None,
    start: EpochProgress | None = None,
    stop: StopSignal | None = None,
) -> dict[str, Any]:
    """One pass over this rank's shard; returns mean losses and throughput.

    ``start`` continues an interrupted epoch (the loader then yields only the batches after
    ``start.batches_done``). When ``stop`` is agreed at an optimizer-step boundary the epoch
    ends early and the result is ``{"interrupted": EpochProgress}`` instead.
    """
    hyp = cfg.hyperparameters
    start = start or EpochProgress()
    num_batches = start.batches_done + len(loader)  # the whole epoch's batches on this rank
    warmup_iters = round(hyp["warmup_epochs"] * num_batches)
    accumulate_target = accumulation_steps(hyp, cfg.batch)
    set_train_mode(model)
    loss_sum = torch.tensor(start.loss_sum, dtype=torch.float32)
    images = start.images
    # An interrupted epoch stopped right after an optimizer step, at its last batch.
    last_step = num_batches * epoch + start.batches_done - 1 if start.batches_done else -1
    t0 = time.perf_counter() - start.elapsed_s
    data_wait = start.data_wait_s  # time spent waiting for the input pipeline (torchvision's "data" time)
    optimizer.zero_grad(set_to_none=True)
    t_ready = time.perf_counter()
    for i, (imgs, targets, _metas) in enumerate(loader, start=start.batches_done):
        data_wait += time.perf_counter() - t_ready
        ni = i + num_batches * epoch  # iterations since the start of training
        accumulate = accumulate_target
        if ni <= warmup_iters and warmup_iters > 0:
            accumulate = max(1, round(float(_interp(ni, warmup_iters, 1, hyp["nbs"] / cfg.batch))))
            for group in optimizer.param_groups:
                start_lr = hyp["warmup_bias_lr"] if group.get("group") == "bias" else 0.0
                group["lr"] = _interp(ni, warmup_iters, start_lr, group["initial_lr"] * lf(epoch))
                if "momentum" in group:
                    group["momentum"] = _interp(ni, warmup_iters, hyp["warmup_momentum"], hyp["momentum"])
        inputs = model_input(imgs, info.device)  # images, or the frozen prefix's cached outputs for them
        targets = targets.to(info.device)
        with torch.autocast(info.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            preds = model(inputs)
        loss, loss_items = loss_fn([p.float() for p in preds], targets)
        if info.distributed:
            loss = loss * info.world_size  # DDP averages gradients across ranks
        scaler.scale(loss).backward()
        stepped = ni - last_step >= accumulate or i == num_batches - 1
        if stepped:
            optimizer_step(model, optimizer, scaler, ema)
            last_step = ni
        loss_sum += loss_items.detach().cpu()
        images += len(imgs)
        if on_step is not None:
            on_step(i + 1, num_batches, loss_sum / (i + 1), images)
        # Every rank steps at the same batches, so every rank takes part in the same checks.
        if stepped and stop is not None and i < num_batches - 1 and stop.agreed(info):
            return {"interrupted": EpochProgress(i + 1, loss_sum.tolist(), images, time.perf_counter() - t0,
                                                 data_wait)}
        t_ready = time.perf_counter()
    elapsed = time.perf_counter() - t0
    mean = all_reduce_mean(loss_sum / max(num_batches, 1), info)
    total_images = sum(all_gather_object(images, info))
    slowest = max(all_gather_object(elapsed, info))
    return {
        **{n: float(v) for n, v in zip(LOSS_NAMES, mean)},
        "images": total_images,
        "train_time_s": slowest,
        "images_per_second": total_images / slowest if slowest > 0 else 0.0,
        "data_wait_s": max(all_gather_object(data_wait, info)),
    }


def _interp(x: float, x1: float, y0: float, y1: float) -> float:
    return y0 + (y1 - y0) * min(max(x / x1, 0.0), 1.0)


# --------------------------------------------------------------------------- the run
class Trainer:
    def __init__(self, cfg: TrainConfig, info: DistInfo):
        self.cfg = cfg
        self.info = info
        self.out = cfg.out
        self.logger = RunLogger(cfg, info)

    # ---- build
    def build(self) -> None:
        cfg, info = self.cfg, self.info
        if cfg.batch % info.world_size:
            raise FinetuneError(f"--batch {cfg.batch} is not divisible by the world size {info.world_size} "
                                f"(nodes x processes per node); choose a multiple of {info.world_size}")
        self.batch_per_rank = cfg.batch // info.world_size
        seed_everything(cfg.seed + info.rank)
        self.hyp = cfg.hyperparameters
        self.data_cfg = load_data_config(cfg.data)
        self.model_cfg = load_model_config(cfg.model)
        self.resume_ckpt = self._find_resume()
        self.freeze_choice: autofreeze.Choice | None = None
        if cfg.freeze == FREEZE_AUTO:  # measured on rank 0 (or read from last.pt), the same on every rank
            self.freeze_choice = autofreeze.decide(
                cfg, self.model_cfg, self.data_cfg.nc, info, self.batch_per_rank, self.resume_ckpt, self.logger.info,
                workers=auto_workers(info.device) if cfg.workers is None else cfg.workers)
            self.freeze_depth = self.freeze_choice.chosen
        else:
            self.freeze_depth = resolve_freeze(cfg.freeze, self.model_cfg)
        self.last_metrics: dict[str, float] = {}

        model = build_model(self.model_cfg, nc=self.data_cfg.nc)
        model.names = list(self.data_cfg.names)
        if self.resume_ckpt is None and cfg.weights is not None:
            from .models.weights import load_pretrained

            load_pretrained(model, cfg.weights, log)
        self.freeze_info = freeze_modules(model, self.freeze_depth, freeze_bn=cfg.freeze_bn)
        # Channels-last, as the loader delivers batches: ~25% faster on CPU (measured) and
        # the layout tensor cores want under AMP.
        self.model = model.to(info.device, memory_format=torch.channels_last)
        frozen_desc = f"modules 0..{self.freeze_depth - 1} frozen" if self.freeze_depth else "no modules frozen"
        self.logger.info(
            f"model {cfg.model}: {self.freeze_info.frozen_params + self.freeze_info.trainable_params:,} parameters, "
            f"freeze {cfg.freeze} -> {frozen_desc} ({self.freeze_info.frozen_params:,} frozen, "
            f"{self.freeze_info.trainable_params:,} trainable), frozen BatchNorm statistics "
            f"{'fixed' if cfg.freeze_bn else 'updating'}"
        )

        self.accumulate = accumulation_steps(self.hyp, cfg.batch)
        self.optimizer = build_optimizer(self.model, cfg.optimizer, self.hyp, cfg.batch, self.accumulate)
        self.lf = lr_lambda(cfg.lr_schedule, cfg.epochs, self.hyp["lrf"])
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.lf)
        self.amp_dtype = resolve_amp(cfg.amp, info.device)
        self.scaler = torch.amp.GradScaler(info.device.type, enabled=self.amp_dtype == torch.float16)
        self.ema = ModelEMA(self.model, self.hyp["ema_decay"], self.hyp["ema_tau"])
        self.state = RunState()
        self.resume_progress: EpochProgress | None = None
        if self.resume_ckpt is not None:
            self._restore(self.resume_ckpt)
        self.ddp_model = (DistributedDataParallel(self.model, device_ids=[info.device.index] if info.device.type == "cuda" else None)
                          if info.distributed else self.model)

        image_cache = "none" if cfg.cache == "features" else cfg.cache  # the feature cache decodes each view once
        self.train_set = YoloDataset(self.data_cfg.train, cfg.imgsz, augment=True, hyp=self.hyp, cache=image_cache,
                                     nc=self.data_cfg.nc)
        self.val_set = YoloDataset(self.data_cfg.val, cfg.imgsz, augment=False, cache=image_cache, nc=self.data_cfg.nc)
        if self.train_set.stats.get("labels", 0) == 0:
            raise FinetuneError(f"no labels found for the training images of {cfg.data}: expected YOLO label files "
                                f"(labels/<image>.txt next to images/) with 'class cx cy w h' lines")
        self.logger.info(f"train: {self.train_set.summary()}")
        self.logger.info(f"val: {self.val_set.summary()}")
        self.workers = auto_workers(info.device) if cfg.workers is None else cfg.workers
        loading = (f"{self.workers} loader process(es) per rank" if self.workers else
                   "in the training process (--workers 0)")
        threads = f", {torch.get_num_threads()} compute threads per rank" if info.device.type == "cpu" else ""
        self.logger.info(f"data loading: {loading}{threads}")
        self.train_loader, self.train_sampler = build_dataloader(
            self.train_set, self.batch_per_rank, self.workers, shuffle=True, distributed=info.distributed,
            seed=cfg.seed, drop_last=False)
        self.val_loader, _ = build_dataloader(
            self.val_set, self.batch_per_rank, self.workers, shuffle=False, distributed=info.distributed, seed=cfg.seed)
        self.feature_cache: FeatureCache | None = None
        if cfg.cache == "features":
            self._use_feature_cache()
        self.loss_fn = YoloLoss.from_model(self.model, self.hyp, cfg.imgsz)

        self.metrics = None
        if info.is_main and cfg.metrics_port is not None:
            self.metrics = TrainingMetrics(finetune_name(cfg.name))
            self.metrics.serve(cfg.metrics_port)
            self.logger.info(f"metrics: http://0.0.0.0:{cfg.metrics_port}/metrics")
        if self.metrics:
            self.metrics.set_run(cfg.epochs, self.freeze_info.frozen_params, self.freeze_info.trainable_params)
            self.metrics.set_freeze(self.freeze_depth, self.freeze_choice)
            self.metrics.set_progress(self.state.start_epoch, {}, 0.0)
            if self.feature_cache is not None:
                self.metrics.set_feature_cache(self.feature_cache.bytes, self.feature_cache.build_time_s,
                                               self.feature_cache.manifest["views"])

    def _use_feature_cache(self) -> None:
        """Train and validate from the frozen prefix's stored outputs (finetune.feature_cache)."""
        cfg, info = self.cfg, self.info
        self.feature_cache = open_or_build(
            self.model, self.freeze_depth, cfg.imgsz, self.train_set, self.val_set, self.hyp, cfg.feature_cache_views,
            cfg.seed, self.out, info, workers=self.workers)
        self.logger.info(self.feature_cache.describe())
        self.train_loader, self.train_sampler = cached_loader(self.feature_cache.train, self.batch_per_rank,
                                                              shuffle=True, info=info, seed=cfg.seed)
        self.val_loader, _ = cached_loader(self.feature_cache.val, self.batch_per_rank, shuffle=False, info=info,
                                           seed=cfg.seed)

    def _find_resume(self) -> dict | None:
        last = self.out / "last.pt"
        if self.cfg.resume == "must" or (self.cfg.resume == "auto" and last.is_file()):
            ckpt = load_resume_checkpoint(last)
            self.logger.info(f"resuming from {last}: {ckpt['epoch']} of {self.cfg.epochs} epochs done")
            return ckpt
        if last.is_file():
            raise FinetuneError(f"{self.out} already holds a run (last.pt); pass --resume to continue it "
                                f"or choose another --out")
        return None

    def _restore(self, ckpt: dict) -> None:
        self.model.load_state_dict(ckpt["model"])
        self.ema.module.load_state_dict(ckpt["ema"])
        self.ema.updates = int(ckpt["ema_updates"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        s = ckpt["run_state"]
        self.state = RunState(start_epoch=ckpt["epoch"], best_fitness=s["best_fitness"], best_epoch=s["best_epoch"],
                              epochs_without_improvement=s["epochs_without_improvement"],
                              history=list(ckpt.get("history", [])), best_metrics=dict(s.get("best_metrics", {})),
                              wall_time_s=s.get("wall_time_s", 0.0))
        self.last_metrics = dict(ckpt.get("metrics") or {})
        if ckpt.get("interrupted"):
            self.resume_progress = self._interrupted_position(ckpt["interrupted"])

    def _interrupted_position(self, record: Any) -> EpochProgress | None:
        """This rank's place in the epoch a SIGTERM interrupted; its RNG state is restored."""
        try:
            ranks = record["ranks"]
            if int(record["world_size"]) != self.info.world_size:
                self.logger.info(f"last.pt was interrupted part-way through epoch {self.state.start_epoch + 1} with "
                                 f"{record['world_size']} processes, now {self.info.world_size}: that epoch's "
                                 "shards differ, so it restarts from its first batch")
                return None
            mine = ranks[self.info.rank]
            progress = EpochProgress(**mine["progress"])
            torch.set_rng_state(mine["rng"])
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError):
            raise FinetuneError(f"cannot resume: {self.out / 'last.pt'} has a malformed record of where its epoch "
                                "stopped; delete it to start over") from None
        self.logger.info(f"resuming epoch {self.state.start_epoch + 1} after batch {progress.batches_done}, where "
                         "SIGTERM stopped it")
        return progress

    # ---- checkpoints
    def _checkpoint(self, epoch_done: int, metrics: dict[str, float], with_training_state: bool) -> dict:
        ckpt = {
            "format": CHECKPOINT_FORMAT,
            "version": __version__,
            "epoch": epoch_done,
            "model_yaml": self.model_cfg,
            "nc": self.data_cfg.nc,
            "names": list(self.data_cfg.names),
            "ema": portable_state_dict(self.ema.module),
            "metrics": metrics,
            "freeze": {"depth": self.freeze_depth, "batchnorm_fixed": self.cfg.freeze_bn, "requested": self.cfg.freeze,
                       **({"auto": self.freeze_choice.to_dict()} if self.freeze_choice else {})},
            "train_config": self.cfg.to_dict(),
        }
        if with_training_state:
            ckpt.update({
                "model": portable_state_dict(self.model),
                "ema_updates": self.ema.updates,
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else {},
                "history": self.state.history,
                "run_state": {
                    "best_fitness": self.state.best_fitness,
                    "best_epoch": self.state.best_epoch,
                    "epochs_without_improvement": self.state.epochs_without_improvement,
                    "best_metrics": self.state.best_metrics,
                    "wall_time_s": self.state.wall_time_s,
                },
            })
        return ckpt

    # ---- the loop
    def fit(self) -> dict[str, Any]:
        stop = StopSignal()
        stop.install()
        try:
            return self._fit(stop)
        finally:
            stop.restore()

    def _fit(self, stop: StopSignal) -> dict[str, Any]:
        cfg, info = self.cfg, self.info
        self.build()
        stopped_early = False
        for epoch in range(self.state.start_epoch, cfg.epochs):
            progress = self.resume_progress if epoch == self.state.start_epoch else None
            epoch_start = time.perf_counter() - (progress.elapsed_s if progress else 0.0)
            if progress is None:
                # Everything random in an epoch derives from (seed, epoch, rank), so a run resumed
                # from last.pt replays the same epochs an uninterrupted run would (an epoch resumed
                # part-way restores its RNG state instead).
                seed_everything(cfg.seed + 1000 * epoch + info.rank)
            if self.train_sampler is not None:
                self.train_sampler.set_epoch(epoch, start=progress.batches_done * self.batch_per_rank if progress else 0)
            if self.feature_cache is not None:
                self.feature_cache.train.set_epoch(epoch)  # view epoch mod K
            reset_peak_memory(info.device)
            stats = train_one_epoch(self.ddp_model, self.train_loader, self.optimizer, self.loss_fn, self.ema, epoch,
                                    cfg, info, self.amp_dtype, self.scaler, self.lf,
                                    on_step=self.logger.step_callback(epoch, cfg.epochs, self.metrics),
                                    start=progress, stop=stop)
            if "interrupted" in stats:
                self._save_interrupted(epoch, stats["interrupted"])
                raise Interrupted(f"stopped by SIGTERM after batch {stats['interrupted'].batches_done} of epoch "
                                  f"{epoch + 1}; last.pt holds that position and --resume continues from it")
            if not all(math.isfinite(stats[n]) for n in LOSS_NAMES):
                # Every rank sees the same all-reduced losses, so all stop together, and the
                # last good last.pt/best.pt are kept rather than overwritten with NaN weights.
                raise FinetuneError(
                    f"training diverged in epoch {epoch + 1}: the loss became NaN/inf; lower --lr0 "
                    f"(now {self.hyp['lr0']}) or lengthen warm-up (--hyp warmup_epochs=...), then "
                    f"--resume from the last good checkpoint or start again")
            self.scheduler.step()
            val_metrics, _preds, _metas = evaluate(self.ema.module, self.val_loader, info.device,
                                                   conf_thres=self.hyp["conf_thres"], iou_thres=self.hyp["iou_thres"],
                                                   amp_dtype=self.amp_dtype, distributed=info.distributed)
            memory = all_gather_object(MemorySample.take(info.rank, info.device), info)
            epoch_time = time.perf_counter() - epoch_start
            self.state.wall_time_s += epoch_time
            stopped_early = self._end_epoch(epoch, stats, val_metrics, memory, epoch_time)
            stopped_early = broadcast_object(stopped_early, info)
            if stopped_early:
                break
            if epoch + 1 < cfg.epochs and stop.agreed(info):
                raise Interrupted(f"stopped by SIGTERM after epoch {epoch + 1}; last.pt holds it and --resume "
                                  "continues from there")
        barrier(info)
        return self._finish(stopped_early)

    def _save_interrupted(self, epoch: int, progress: EpochProgress) -> None:
        """Rank 0 saves the run as it stands part-way through ``epoch``, with every rank's
        position and RNG state, so --resume continues with the next batch."""
        ranks = all_gather_object({"progress": asdict(progress), "rng": torch.get_rng_state()}, self.info)
        if self.info.is_main:
            ckpt = self._checkpoint(epoch, self.last_metrics, with_training_state=True)
            ckpt["interrupted"] = {"epoch": epoch, "world_size": self.info.world_size, "ranks": ranks}
            save_checkpoint(ckpt, self.out / "last.pt")
            self.logger.info(f"SIGTERM: saved last.pt after batch {progress.batches_done} of epoch {epoch + 1}")
        barrier(self.info)

    def _end_epoch(self, epoch: int, stats: dict, val: dict, memory: list[MemorySample], epoch_time: float) -> bool:
        """Rank 0 records the epoch: results, checkpoints, metrics. Returns: stop early?"""
        cfg = self.cfg
        if not self.info.is_main:
            return False
        peak = max(m.peak for m in memory)
        fitness = val["map50_95"]
        improved = fitness > self.state.best_fitness
        if improved:
            self.state.best_fitness, self.state.best_epoch = fitness, epoch + 1
            self.state.epochs_without_improvement = 0
        else:
            self.state.epochs_without_improvement += 1
        row = {
            "epoch": epoch + 1,
            "train/box_loss": stats["box"], "train/obj_loss": stats["obj"], "train/cls_loss": stats["cls"],
            "metrics/precision": val["precision"], "metrics/recall": val["recall"],
            "metrics/mAP_0.5": val["map50"], "metrics/mAP_0.5:0.95": val["map50_95"],
            "lr": self.optimizer.param_groups[0]["lr"],
            "epoch_time_s": epoch_time, "train_time_s": stats["train_time_s"], "data_wait_s": stats["data_wait_s"],
            "images_per_second": stats["images_per_second"],
            "memory_peak_bytes": peak, "memory_kind": memory[0].device_type,
        }
        self.state.history.append(row)
        metrics = {"map50": val["map50"], "map50_95": val["map50_95"], "precision": val["precision"],
                   "recall": val["recall"], "images_per_second": stats["images_per_second"],
                   "memory_peak_bytes": peak}
        if improved:
            self.state.best_metrics = {**metrics, "epoch": epoch + 1}
        self.last_metrics = metrics
        last = self._checkpoint(epoch + 1, metrics, with_training_state=True)
        save_checkpoint(last, self.out / "last.pt")
        if improved:
            save_checkpoint(self._checkpoint(epoch + 1, metrics, with_training_state=False), self.out / "best.pt")
        write_results_csv(self.out / "results.csv", self.state.history)
        if self.metrics:
            self.metrics.set_progress(epoch + 1, stats, stats["images_per_second"])
            self.metrics.set_validation(val)
            self.metrics.set_memory(memory)
        self.logger.epoch_end(epoch + 1, cfg.epochs, stats, val, peak, memory[0].device_type, epoch_time)
        if cfg.patience and self.state.epochs_without_improvement >= cfg.patience:
            self.logger.info(f"early stop: no mAP@0.5:0.95 improvement for {cfg.patience} epochs "
                             f"(best {self.state.best_fitness:.4f} at epoch {self.state.best_epoch})")
            return True
        return False

    def _finish(self, stopped_early: bool) -> dict[str, Any]:
        history = self.state.history
        summary = {
            "name": self.cfg.name,
            "model": self.cfg.model,
            "freeze": self.cfg.freeze,
            "freeze_depth": self.freeze_depth,
            **({"freeze_auto": self.freeze_choice.to_dict()} if self.freeze_choice else {}),
            "freeze_batchnorm": self.cfg.freeze_bn,
            "epochs": self.cfg.epochs,
            "epochs_completed": len(history),
            "stopped_early": stopped_early,
            "final": history[-1] if history else {},
            "best": self.state.best_metrics,
            "best_epoch": self.state.best_epoch,
            "frozen_parameters": self.freeze_info.frozen_params,
            "trainable_parameters": self.freeze_info.trainable_params,
            "wall_time_s": self.state.wall_time_s,
            "device": str(self.info.device),
            "world_size": self.info.world_size,
            "amp": str(self.amp_dtype).replace("torch.", "") if self.amp_dtype else "off",
            "weights": str(self.cfg.weights) if self.cfg.weights else None,
            "checkpoint": str(self.out / "best.pt"),
        }
        if self.feature_cache is not None:
            train_time = sum(row["train_time_s"] for row in history)
            images = sum(row["images_per_second"] * row["train_time_s"] for row in history)
            summary["feature_cache"] = {**self.feature_cache.summary(),
                                        "images_per_second": images / train_time if train_time > 0 else 0.0}
        if self.info.is_main:
            write_json(self.out / "metrics.json", summary)
            self.logger.info(f"done: {len(history)} epochs, best mAP@0.5:0.95 {self.state.best_fitness:.4f} "
                             f"(epoch {self.state.best_epoch}); results in {self.out}")
        if self.metrics:
            if self.cfg.metrics_linger > 0:
                # Only rank 0 serves metrics; the other ranks wait at the process group's
                # teardown, so the whole job ends together after the linger.
                time.sleep(self.cfg.metrics_linger)
            self.metrics.shutdown()
        self.logger.close()
        return summary


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run a fine-tune described by `cfg` (alone or as one torchrun rank)."""
    tune_malloc()  # before the first large allocation; loader workers inherit it
    info = init_distributed(cfg.device)
    set_cpu_threads(info.device)
    try:
        return Trainer(cfg, info).fit()
    finally:
        cleanup(info)
