"""The one configuration object of a training run, and the `finetune train` command line.

Every `finetune train` flag is a field of :class:`TrainConfig`; the field's metadata holds its
help, type and metavar (:func:`option`). The argparse arguments are generated from
``dataclasses.fields`` (as torchtitan derives its CLI from its config dataclasses), and
:meth:`TrainConfig.to_argv` writes the flags that reproduce a config, so everything that
starts `finetune train` (the operator's pods, `finetune compare`, the demo, the benchmark)
spells the command line through this one class. docs/trainer-contract.md's flag table is
generated from it: ``python -m finetune.config --update-doc docs/trainer-contract.md``.

Torch-free (standard library and the model-config module): the operator imports it.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any

from . import hyperparameters as hyperparameter_table
from .errors import FinetuneError
from .models.config import BUILTIN_MODELS, FREEZE_PRESETS

SEED_MAX = 2**32 - 1  # numpy's seed limit; the CRD's spec.training.seed says the same
MAX_CACHE_VIEWS = 64  # the CRD's spec.training.cacheViews says the same
DEFAULT_CACHE_VIEWS = 4  # --cache-views unset (bench/results/feature-cache.md: what K costs)
FREEZE_AUTO = "auto"  # --freeze auto: finetune.autofreeze picks the depth from measured memory
FREEZE_AUTO_MARGIN = 0.10  # of the memory budget, kept free by --freeze auto (the operator's status says it)


def feature_cache_refusal(freeze: str, freeze_bn: bool, mosaic: float) -> str | None:
    """Why ``--cache features`` cannot run with these settings (one sentence), or None.

    Here rather than in finetune.feature_cache, which needs torch: the operator checks it too.
    """
    if str(freeze).strip().isdigit() and int(str(freeze).strip()) == 0:
        return ("--cache features stores the outputs of the frozen modules, and --freeze 0 freezes none; "
                "pass --freeze backbone, all-but-detect or a module count, or use --cache none|ram")
    if not freeze_bn:
        return ("--cache features needs the frozen modules' BatchNorm statistics fixed, and with "
                "--freeze-bn false they change every step (the stored features would go stale); "
                "drop --freeze-bn false or use --cache none|ram")
    if mosaic > 0:
        return (f"--cache features cannot cache mosaic (--hyp mosaic={mosaic:g}): a mosaic joins different "
                "images every epoch; set --hyp mosaic=0 (--cache-views sets the augmented views instead)")
    return None


def bool_arg(value: str) -> bool:
    v = value.strip().lower()
    if v in ("true", "1", "yes", "on"):
        return True
    if v in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def freeze_arg(value: str) -> str:
    v = value.strip()
    if v.isdigit() or v in FREEZE_PRESETS or v == FREEZE_AUTO:
        return v
    raise argparse.ArgumentTypeError(
        f"expected a module count N, {' or '.join(repr(p) for p in FREEZE_PRESETS)} or {FREEZE_AUTO!r}, got {value!r}")


_BYTE_UNITS = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
               "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def parse_bytes(value: str | int) -> int:
    """A byte count: digits, or a Kubernetes-style quantity (6Gi, 512Mi, 8G, 1.5Gi)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kMGT]i?|Ki)?\s*", str(value))
    if not match or (match.group(2) or "") not in _BYTE_UNITS:
        raise argparse.ArgumentTypeError(f"expected bytes or a quantity such as 6Gi or 512Mi, got {value!r}")
    amount = int(float(match.group(1)) * _BYTE_UNITS[match.group(2) or ""])
    if amount <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive memory size, got {value!r}")
    return amount


def workers_arg(value: str) -> int | None:
    """``--workers``: a process count, or ``auto`` (None) for :func:`auto_workers`."""
    v = value.strip().lower()
    if v == "auto":
        return None
    if v.isdigit():
        return int(v)
    raise argparse.ArgumentTypeError(f"expected a number of processes (0 = load in the training process) or 'auto', got {value!r}")


def seed_arg(value: str) -> int:
    v = value.strip()
    if v.isdigit() and int(v) <= SEED_MAX:
        return int(v)
    raise argparse.ArgumentTypeError(f"expected an integer from 0 to {SEED_MAX}, got {value!r}")


class HypAction(argparse.Action):
    """``--hyp KEY=VALUE``, repeatable, collected into a dict.

    A bad key or value raises FinetuneError (one ``error:`` line naming the allowed range),
    not an argparse usage error.
    """

    def __call__(self, parser, namespace, values, option_string=None):
        key, sep, value = str(values).partition("=")
        key = key.strip()
        if not sep or not key:
            raise FinetuneError(f"--hyp {values!r}: expected KEY=VALUE, e.g. --hyp lr0=0.002")
        value = _checked_hyperparameter(f"--hyp {key}={value.strip()}", key, value.strip())
        setattr(namespace, self.dest, {**(getattr(namespace, self.dest) or {}), key: value})


def _checked_hyperparameter(flag: str, key: str, value: object) -> float:
    """``value`` as a float, or a FinetuneError starting with ``flag`` (what the user typed)."""
    why = hyperparameter_table.problem(key, value)
    if why is not None:
        raise FinetuneError(f"{flag}: {why}")
    return float(value)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Flag:
    """How a TrainConfig field is spelled on the `finetune train` command line."""

    help: str
    type: Callable[[str], Any] | None = None
    choices: tuple[str, ...] | None = None
    metavar: str | None = None
    default_text: str | None = None  # the default in words, where the value alone does not say it
    action: type[argparse.Action] | None = None
    bare: str | None = None  # the value of the flag given alone (`--resume`); written `--flag=VALUE`


def option(default: Any = MISSING, *, default_factory: Any = MISSING, **flag: Any) -> Any:
    """A TrainConfig field and its flag; no default makes the flag required."""
    return field(default=default, default_factory=default_factory, metadata={"flag": Flag(**flag)})


@dataclass(kw_only=True)
class TrainConfig:
    """One training run. Each field is a `finetune train` flag, in the order `to_argv` writes them."""

    data: Path = option(type=Path, metavar="PATH", help="YOLO data.yaml (path, train, val, names/nc)")
    model: str = option("yolov5s", metavar="NAME_OR_YAML",
                        help="|".join(BUILTIN_MODELS) + " or a model YAML of the same form")
    weights: Path | None = option(None, type=Path, metavar="PATH", default_text="random init",
                                  help="pretrained weights: a finetune checkpoint or an Ultralytics YOLOv5 .pt")
    freeze: str = option("0", type=freeze_arg, metavar="|".join(("N", *FREEZE_PRESETS, FREEZE_AUTO)),
                         help="freeze modules 0..N-1; 'backbone' (modules of the backbone, 10 for YOLOv5) or "
                              "'all-but-detect' (everything but the Detect layer, 24); 0 trains everything; 'auto' "
                              "= the shallowest depth whose measured peak memory fits --memory-budget (finetune.autofreeze)")
    memory_budget: int | None = option(None, type=parse_bytes, metavar="BYTES",
                                       default_text="GPU memory (CUDA) or the container's memory limit, per process",
                                       help="with --freeze auto: the memory one training process may use, in bytes or "
                                            "as a quantity (6Gi); the depth is chosen so that its measured peak stays "
                                            "10% below it")
    freeze_bn: bool = option(True, type=bool_arg, metavar="true|false",
                             default_text="true; false = YOLOv5's behaviour, where they drift",
                             help="keep frozen BatchNorm layers' running statistics fixed")
    epochs: int = option(50, type=int, metavar="N", help="epochs to train")
    batch: int = option(16, type=int, metavar="N",
                        help="global batch size over all ranks; must be divisible by the world size")
    imgsz: int = option(640, type=int, metavar="N", help="train/val image size in pixels, a multiple of 32")
    optimizer: str = option("SGD", choices=("SGD", "AdamW"), help="optimizer")
    lr0: float | None = option(None, type=float, metavar="F",
                               default_text=f"hyp lr0 = {hyperparameter_table.BY_NAME['lr0'].default:g}",
                               help="initial learning rate")
    lr_schedule: str = option("cosine", choices=("cosine", "linear"),
                              help="learning-rate decay to lr0*lrf over the run")
    patience: int = option(0, type=int, metavar="N",
                           help="stop after this many epochs without mAP@0.5:0.95 improvement; 0 = never")
    amp: str = option("auto", choices=("auto", "bf16", "fp16", "off"),
                      help="mixed precision on CUDA: auto = bf16 where supported else fp16; ignored on CPU")
    cache: str = option("none", choices=("none", "ram", "features"),
                        help="ram = keep decoded, resized images in RAM; features = run the frozen modules once "
                             "per image view and train the rest from their stored outputs (needs --freeze > 0 and "
                             "--freeze-bn true; no mosaic; see --cache-views)")
    cache_views: int | None = option(None, type=int, metavar="K", default_text=str(DEFAULT_CACHE_VIEWS),
                              help="with --cache features: views computed per training image, view 0 un-augmented, "
                                   "the others randomly augmented; epoch e trains on view e mod K; 1 = no "
                                   "augmentation")
    seed: int = option(0, type=seed_arg, metavar="N", help=f"random seed, 0 to {SEED_MAX}")
    workers: int | None = option(None, type=workers_arg, metavar="N|auto", default_text="auto",  # None: auto_workers()
                                 help="data-loader processes per rank; 0 loads in the training process; auto = one "
                                      "per spare core on CUDA (at most 8), on CPU 0 up to 2 cores per rank, else one "
                                      "per 4 cores")
    hyp: dict[str, float] = option(default_factory=dict, action=HypAction, metavar="KEY=VALUE", default_text="none",
                                   help="override one hyperparameter (repeatable), e.g. --hyp mosaic=1.0 "
                                        "--hyp warmup_epochs=1; keys, defaults and allowed values: "
                                        "docs/trainer-contract.md")
    device: str = option("auto", choices=("auto", "cpu", "cuda"),
                         help="auto = this rank's GPU when CUDA is available, else CPU")
    out: Path = option(type=Path, metavar="DIR", help="run directory for last.pt, best.pt, results.csv and metrics.json")
    name: str | None = option(None, metavar="NAME", default_text="the --out directory's name", help="run name")
    resume: str | None = option(None, choices=("must", "auto"), bare="must", default_text="off",
                                help="continue from OUT/last.pt (an error if it is missing); --resume=auto "
                                     "continues only if it exists (what the operator passes)")
    metrics_port: int | None = option(None, type=int, metavar="PORT", default_text="off",
                                      help="rank 0 serves Prometheus metrics on 0.0.0.0:PORT for the whole run")
    metrics_linger: float = option(0.0, type=float, metavar="SECONDS",
                                   help="keep serving the final metrics this long after training ends, so a "
                                        "scraper sees the last epoch")
    log_format: str = option("text", choices=("text", "json"),
                             help="one line per epoch as text or JSON when not on a terminal")
    progress: bool | None = option(None, type=bool_arg, metavar="true|false",
                                   default_text="on when stderr is a terminal",
                                   help="force the progress bar on or off")

    def __post_init__(self) -> None:
        self.data = Path(self.data)
        self.out = Path(self.out)
        if self.weights is not None:
            self.weights = Path(self.weights)
        self.freeze = str(self.freeze)
        if self.name is None:
            self.name = self.out.resolve().name
        for f in dataclasses.fields(self):
            choices, value = f.metadata["flag"].choices, getattr(self, f.name)
            if choices and value is not None and value not in choices:
                raise FinetuneError(f"{flag_name(f)} {value}: choose one of {', '.join(choices)}")
        if self.epochs < 1:
            raise FinetuneError("--epochs must be at least 1")
        if self.batch < 1:
            raise FinetuneError("--batch must be at least 1")
        if self.imgsz < 32 or self.imgsz % 32:
            raise FinetuneError(f"--imgsz {self.imgsz}: must be a positive multiple of 32 (the model's largest stride)")
        if not 0 <= self.seed <= SEED_MAX:
            raise FinetuneError(f"--seed {self.seed}: must be an integer from 0 to {SEED_MAX}")
        if self.lr0 is not None:
            self.lr0 = _checked_hyperparameter(f"--lr0 {self.lr0}", "lr0", self.lr0)
        self.hyp = {key: _checked_hyperparameter(f"--hyp {key}={value}", key, value) for key, value in self.hyp.items()}
        if self.cache_views is not None and not 1 <= self.cache_views <= MAX_CACHE_VIEWS:
            raise FinetuneError(f"--cache-views {self.cache_views}: must be from 1 to {MAX_CACHE_VIEWS}")
        if isinstance(self.memory_budget, str):
            try:
                self.memory_budget = parse_bytes(self.memory_budget)
            except argparse.ArgumentTypeError as e:
                raise FinetuneError(f"--memory-budget: {e}") from None
        if self.memory_budget is not None and self.freeze != FREEZE_AUTO:
            raise FinetuneError(f"--memory-budget only applies to --freeze auto (this run freezes {self.freeze})")
        if self.cache == "features":
            why = feature_cache_refusal(self.freeze, self.freeze_bn, self.hyperparameters["mosaic"])
            if why:
                raise FinetuneError(why)

    @property
    def feature_cache_views(self) -> int:
        """K of ``--cache features``: ``--cache-views``, else the default."""
        return DEFAULT_CACHE_VIEWS if self.cache_views is None else self.cache_views

    @property
    def hyperparameters(self) -> dict[str, float]:
        merged = {**hyperparameter_table.defaults(), **self.hyp}
        if self.lr0 is not None:
            merged["lr0"] = self.lr0
        return merged

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items()}

    def to_argv(self) -> list[str]:
        """The `finetune train` flags that reproduce this config (every field that is set)."""
        argv: list[str] = []
        for f in dataclasses.fields(self):
            value, flag = getattr(self, f.name), f.metadata["flag"]
            if value is None:
                continue
            if isinstance(value, Mapping):  # --hyp KEY=VALUE, once per key
                for key, item in value.items():
                    argv += [flag_name(f), f"{key}={item}"]
            elif flag.bare is not None:  # an optional value must be attached: --resume=auto
                argv.append(f"{flag_name(f)}={value}")
            else:
                argv += [flag_name(f), value_text(value)]
        return argv

    @classmethod
    def from_namespace(cls, args: argparse.Namespace) -> TrainConfig:
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})

    @classmethod
    def from_argv(cls, argv: list[str]) -> TrainConfig:
        """Parse `finetune train` flags (what :meth:`to_argv` writes)."""
        parser = argparse.ArgumentParser(prog="finetune train")
        add_train_arguments(parser)
        return cls.from_namespace(parser.parse_args(argv))


def flag_name(f: dataclasses.Field) -> str:
    return "--" + f.name.replace("_", "-")


def value_text(value: Any) -> str:
    """A flag's value as typed on the command line (so that its ``type`` reads it back)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _default_text(f: dataclasses.Field) -> str | None:
    flag = f.metadata["flag"]
    if flag.default_text is not None:
        return flag.default_text
    if f.default is MISSING or f.default is None:
        return None
    return value_text(f.default)


def add_train_arguments(parser: argparse.ArgumentParser, only: Iterable[str] | None = None,
                        defaults: Mapping[str, Any] | None = None) -> None:
    """The `finetune train` flags, one per TrainConfig field (``only`` some of them; other ``defaults``)."""
    only = None if only is None else set(only)
    for f in dataclasses.fields(TrainConfig):
        if only is not None and f.name not in only:
            continue
        flag: Flag = f.metadata["flag"]
        kwargs: dict[str, Any] = {"help": flag.help}
        if f.default is MISSING and f.default_factory is MISSING:
            kwargs["required"] = True
        else:
            kwargs["default"] = f.default_factory() if f.default is MISSING else f.default
        if defaults and f.name in defaults:
            kwargs["default"] = defaults[f.name]
            kwargs["help"] += f" (default: {value_text(defaults[f.name])})"
        elif (text := _default_text(f)) is not None:
            kwargs["help"] += f" (default: {text})"
        kwargs["help"] = kwargs["help"].replace("%", "%%")  # argparse %-formats help
        for key in ("type", "choices", "metavar", "action"):
            if getattr(flag, key) is not None:
                kwargs[key] = getattr(flag, key)
        if flag.bare is not None:
            kwargs.update(nargs="?", const=flag.bare)
        parser.add_argument(flag_name(f), **kwargs)


# --------------------------------------------------------------------- docs/trainer-contract.md
DOC_START = "<!-- generated from finetune.config (python -m finetune.config --update-doc FILE): start -->"
DOC_END = "<!-- generated: end -->"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def flags_markdown() -> str:
    """The `finetune train` flags as a Markdown table."""
    rows = ["| flag | default | meaning |", "| --- | --- | --- |"]
    for f in dataclasses.fields(TrainConfig):
        flag: Flag = f.metadata["flag"]
        value = flag.metavar or "|".join(flag.choices or ())
        spelled = f"{flag_name(f)}[={value}]" if flag.bare is not None else f"{flag_name(f)} {value}"
        required = f.default is MISSING and f.default_factory is MISSING
        default = "required" if required else (_default_text(f) or "")
        rows.append(f"| `{_cell(spelled)}` | {_cell(default)} | {_cell(flag.help)} |")
    return "\n".join(rows)


def contract_markdown() -> str:
    """The generated part of docs/trainer-contract.md: the flags, then the hyperparameters."""
    return (f"{DOC_START}\n{flags_markdown()}\n\n"
            "Hyperparameters (`--hyp KEY=VALUE`; the operator's `spec.training.hyperparameters`):\n\n"
            f"{hyperparameter_table.markdown_table()}\n{DOC_END}")


def update_doc(path: Path) -> None:
    text = path.read_text()
    start, end = text.index(DOC_START), text.index(DOC_END) + len(DOC_END)
    path.write_text(text[:start] + contract_markdown() + text[end:])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m finetune.config", description="The `finetune train` contract.")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--markdown", action="store_true", help="print the flag and hyperparameter tables")
    group.add_argument("--update-doc", type=Path, metavar="FILE",
                       help=f"replace FILE's section between {DOC_START!r} and {DOC_END!r} with the tables")
    args = p.parse_args(argv)
    if args.update_doc:
        update_doc(args.update_doc)
    else:
        print(contract_markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())
