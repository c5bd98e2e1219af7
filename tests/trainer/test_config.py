"""The `finetune train` contract: TrainConfig, its derived command line, the hyperparameter
table, and every caller that starts `finetune train` through TrainConfig.to_argv."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import sys
from pathlib import Path

import pytest

from finetune import cli, compare, demo, hyperparameters
from finetune.config import SEED_MAX, TrainConfig, contract_markdown
from finetune.data.augment import resolve_hyp
from finetune.errors import FinetuneError
from finetune.loss import YoloLoss
from finetune.models.config import FREEZE_PRESETS, freeze_presets, load_model_config

REPO = Path(__file__).resolve().parents[2]


def main_error(capsys, *argv: str) -> str:
    """Run `finetune` in-process; it must exit 2 with one `error: ...` line and no traceback."""
    assert cli.main(list(argv)) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def train_args(tmp_path, *flags: str) -> list[str]:
    return ["train", "--data", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "run"), *flags]


# ------------------------------------------------------------------ --hyp and the hyperparameter table
@pytest.mark.parametrize("item, fragments", [
    ("nbs=0", ["nbs", ">= 1", "nominal batch size"]),  # was a ZeroDivisionError traceback
    ("fliplr=2", ["fliplr", "in [0, 1]", "left-right flip"]),
    ("mosaic=nan", ["mosaic", "in [0, 1]", "mosaic"]),
    ("lr0=inf", ["lr0", "> 0", "initial learning rate"]),
    ("ema_decay=1", ["ema_decay", "in (0, 1)"]),
    ("scale=big", ["scale", "must be a number", "'big'"]),
    ("lr00=1", ["unknown hyperparameter 'lr00'", "lr0", "mosaic"]),
    ("mosaic", ["expected KEY=VALUE"]),
])
def test_hyp_errors_are_one_line_naming_key_range_and_meaning(capsys, tmp_path, item, fragments):
    line = main_error(capsys, *train_args(tmp_path, "--hyp", "lr0=0.002", "--hyp", item))
    assert line.startswith("error: --hyp ")
    for fragment in fragments:
        assert fragment in line, line


def test_lr0_flag_is_checked_against_the_table(capsys, tmp_path):
    line = main_error(capsys, *train_args(tmp_path, "--lr0", "nan"))
    assert "--lr0 nan" in line and "> 0" in line


def test_every_default_is_inside_its_own_range():
    for h in hyperparameters.HYPERPARAMETERS:
        assert h.contains(h.default), h
    assert len(hyperparameters.BY_NAME) == len(hyperparameters.HYPERPARAMETERS)


def test_loader_and_loss_defaults_come_from_the_table():
    table = hyperparameters.defaults()
    assert resolve_hyp(None) == table
    loss = YoloLoss(2, [[[1.0, 1.0]] * 3] * 3, [8, 16, 32])
    assert loss.hyp == table and loss.anchor_t == table["anchor_t"]
    with pytest.raises(FinetuneError, match=r"shear .* in \[0, 45\]"):
        resolve_hyp({"shear": 90})


def test_config_hyperparameters_merge_overrides_and_lr0():
    cfg = TrainConfig(data="d.yaml", out="r", hyp={"mosaic": "1"}, lr0=0.002)
    assert cfg.hyp == {"mosaic": 1.0}
    assert cfg.hyperparameters == {**hyperparameters.defaults(), "mosaic": 1.0, "lr0": 0.002}
    with pytest.raises(FinetuneError, match="--hyp nbs=0"):
        TrainConfig(data="d.yaml", out="r", hyp={"nbs": 0})


# ------------------------------------------------------------------ --seed
@pytest.mark.parametrize("seed", ["-1", "4294967296", "1.5", "x"])
def test_seed_out_of_range_is_an_argparse_error(capsys, tmp_path, seed):
    with pytest.raises(SystemExit) as exc:
        cli.main(train_args(tmp_path, "--seed", seed))
    assert exc.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "argument --seed" in last and f"from 0 to {SEED_MAX}" in last and "Traceback" not in last


def test_seed_bounds_are_accepted():
    for seed in (0, SEED_MAX):
        assert TrainConfig.from_argv(["--data", "d", "--out", "r", "--seed", str(seed)]).seed == seed
    with pytest.raises(FinetuneError, match="--seed"):
        TrainConfig(data="d", out="r", seed=SEED_MAX + 1)


# ------------------------------------------------------------------ the derived command line
def every_field_set() -> TrainConfig:
    """A config in which every field differs from its default."""
    return TrainConfig(
        data=Path("/d/data.yaml"), model="yolov5n", weights=Path("/w/best.pt"), freeze="auto", memory_budget=6 << 30,
        freeze_bn=False,
        epochs=3, batch=8, imgsz=320, optimizer="AdamW", lr0=0.002, lr_schedule="linear", patience=5, amp="bf16",
        cache="ram", cache_views=2, seed=SEED_MAX, workers=0, hyp={"mosaic": 0.5, "nbs": 16.0}, device="cpu", out=Path("/o/run"),
        name="named", resume="auto", metrics_port=9400, metrics_linger=2.5, log_format="json", progress=True)


def test_to_argv_round_trips():
    cfg = every_field_set()
    defaults = TrainConfig(data=cfg.data, out=cfg.out)
    for f in dataclasses.fields(TrainConfig):
        if f.name not in ("data", "out"):
            assert getattr(cfg, f.name) != getattr(defaults, f.name), f.name  # so the round trip tests it
    assert TrainConfig.from_argv(cfg.to_argv()) == cfg
    assert TrainConfig.from_argv(defaults.to_argv()) == defaults
    assert TrainConfig.from_argv(dataclasses.replace(cfg, resume="must").to_argv()).resume == "must"


def test_flags_users_and_the_operator_rely_on():
    parse = TrainConfig.from_argv
    base = ["--data", "d", "--out", "r"]
    assert parse(base) == TrainConfig(data="d", out="r")
    assert parse([*base, "--resume"]).resume == "must" and parse([*base, "--resume=auto"]).resume == "auto"
    assert parse([*base, "--freeze-bn", "false"]).freeze_bn is False
    assert parse([*base, "--progress", "true"]).progress is True
    assert parse([*base, "--workers", "auto"]).workers is None and parse([*base, "--workers", "3"]).workers == 3
    assert parse([*base, "--hyp", "mosaic=1", "--hyp", "nbs=8"]).hyp == {"mosaic": 1.0, "nbs": 8.0}
    defaults = TrainConfig(data="d", out="r")
    assert (defaults.model, defaults.freeze, defaults.epochs, defaults.batch, defaults.imgsz) == \
        ("yolov5s", "0", 50, 16, 640)
    assert (defaults.optimizer, defaults.lr_schedule, defaults.amp, defaults.cache, defaults.log_format,
            defaults.device) == ("SGD", "cosine", "auto", "none", "text", "auto")


def test_freeze_flag_uses_the_preset_table(capsys):
    assert FREEZE_PRESETS == tuple(freeze_presets(load_model_config("yolov5n")))
    for preset in FREEZE_PRESETS:
        assert TrainConfig.from_argv(["--data", "d", "--out", "r", "--freeze", preset]).freeze == preset
    with pytest.raises(SystemExit):
        TrainConfig.from_argv(["--data", "d", "--out", "r", "--freeze", "head"])
    assert "'backbone' or 'all-but-detect'" in capsys.readouterr().err


def test_train_help_lists_every_field(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = capsys.readouterr().out
    for f in dataclasses.fields(TrainConfig):
        assert "--" + f.name.replace("_", "-") in text, f.name


def test_contract_doc_is_generated_from_train_config():
    doc = (REPO / "docs" / "trainer-contract.md").read_text()
    assert contract_markdown() in doc, ("docs/trainer-contract.md is stale: run "
                                        "python -m finetune.config --update-doc docs/trainer-contract.md")


# ------------------------------------------------------------------ the callers
def parsed_by_the_cli(cmd: list[str]) -> TrainConfig:
    """What the `finetune train` process started with ``cmd`` would run."""
    assert cmd[:4] == [sys.executable, "-m", "finetune.cli", "train"]
    return TrainConfig.from_namespace(cli.build_parser().parse_args(cmd[3:]))


def test_compare_starts_each_depth_with_its_settings(tmp_path):
    parser = argparse.ArgumentParser()
    compare.add_compare_arguments(parser)
    args = parser.parse_args(["--data", "d.yaml", "--model", "yolov5n", "--weights", "w.pt", "--batch", "8",
                              "--imgsz", "128", "--cache", "ram", "--seed", "7", "--workers", "0", "--hyp", "nbs=16",
                              "--device", "cpu", "--metrics-port", "9401", "--out", str(tmp_path)])
    assert args.epochs == 10  # compare's own default
    run_dir = tmp_path / "freeze-backbone"
    assert parsed_by_the_cli(compare.train_command(args, "backbone", run_dir)) == TrainConfig(
        data="d.yaml", model="yolov5n", weights="w.pt", freeze="backbone", epochs=10, batch=8, imgsz=128, cache="ram",
        seed=7, workers=0, hyp={"nbs": 16}, device="cpu", metrics_port=9401, out=run_dir, name="freeze-backbone")


def test_demo_pretrain_command(tmp_path):
    cmd = demo.pretrain_command(tmp_path / "pretrain", tmp_path / "data.yaml", demo.QUICK, None, "cpu")
    assert parsed_by_the_cli(cmd) == TrainConfig(
        data=tmp_path / "data.yaml", model="yolov5n", epochs=demo.QUICK.pretrain_epochs, batch=demo.QUICK.batch,
        imgsz=demo.QUICK.imgsz, cache="ram", device="cpu", out=tmp_path / "pretrain", name="pretrain",
        optimizer="AdamW", lr0=0.002, hyp={"nbs": 16, "warmup_epochs": 1, "mosaic": 0.5, "lrf": 0.1})


def test_bench_training_command(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_freeze", REPO / "bench" / "freeze.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    cmd = bench.training_command(tmp_path / "d.yaml", "yolov5n", 10, 16, 320, 5, 2, "cpu", tmp_path / "freeze-10")
    assert parsed_by_the_cli(cmd) == TrainConfig(
        data=tmp_path / "d.yaml", model="yolov5n", freeze="10", epochs=5, batch=16, imgsz=320, workers=2, cache="ram",
        device="cpu", out=tmp_path / "freeze-10", hyp={"warmup_epochs": 0}, progress=False)
