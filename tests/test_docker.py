"""The Dockerfile cannot be built here (no Docker): check what can be checked without building it.

Its install step is `make install`, README.md's install, which CI runs before every test run; so
the image installs exactly what is tested. These tests keep it that way."""

import re
import shlex
from pathlib import Path

ROOT = Path(__file__).parent.parent
DOCKERFILE = (ROOT / "Dockerfile").read_text()
DOCKER_GUIDE = ROOT / "docs" / "guides" / "docker.md"  # the documentation's Docker page


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE)
    lines = [line.strip() for line in text.splitlines()]
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "")
        for line in lines
        if line and not line.startswith("#")
    ]


def test_entry_point_is_flowdiff_run_by_a_non_root_user():
    steps = instructions()
    assert ("ENTRYPOINT", '["flowdiff"]') in steps
    users = [args for op, args in steps if op == "USER"]
    assert users and users[-1] not in ("root", "0")
    entry = [op for op, _ in steps].index("ENTRYPOINT")
    assert [op for op, _ in steps[:entry]].count("USER") >= 1
    assert any(op == "RUN" and "useradd" in args and users[-1] in args for op, args in steps)


def test_the_install_is_the_readme_install():
    runs = [args for op, args in instructions() if op == "RUN"]
    assert any(re.search(r"\bmake install\b", run) for run in runs)
    assert not any("pip install" in run for run in runs)  # no second list of packages to drift
    readme = (ROOT / "README.md").read_text()
    assert "make install" in readme.split("## Install", 1)[1].split("\n## ", 1)[0]
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^install: \$\(STAMP\)", makefile, re.M)
    assert "$(TORCH_INDEX)" in makefile  # the index the Dockerfile chooses reaches pip


def test_cpu_by_default_cuda_by_build_argument():
    args = dict(tuple(a.split("=", 1)) for op, a in instructions() if op == "ARG" and "=" in a)
    assert args["BASE"].startswith("python:")
    assert args["TORCH_INDEX"] == "https://download.pytorch.org/whl/cpu"
    assert ("FROM", "${BASE}") in instructions()
    assert "--build-arg BASE=nvidia/cuda:" in DOCKER_GUIDE.read_text()


def test_copied_files_exist_and_suffice_for_the_install():
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    copied = []
    for op, args in instructions():
        if op == "COPY":
            words = [w for w in shlex.split(args) if not w.startswith("--")]
            copied += words[:-1]
    for source in copied:
        assert (ROOT / source).exists(), source
        assert source not in ignored, source
    # What `pip install -e .` reads: pyproject.toml, its readme, the package (with its configs).
    assert {"pyproject.toml", "README.md", "Makefile", "flowdiff"} <= set(copied)
    assert {".venv", "runs", "data", ".git"} <= ignored


def test_documented_docker_run_mounts_the_image_work_directory():
    workdir = [a for op, a in instructions() if op == "WORKDIR"][-1]
    runs = re.findall(r"^docker run .*$", DOCKER_GUIDE.read_text(), re.M)
    assert runs and any("flowdiff fit --config configs/toy.yaml" in r for r in runs)
    for line in runs:
        for mount in re.findall(r"-v \S+:(\S+)", line):
            assert mount.strip("\"'").startswith(workdir), line


def test_the_image_has_the_configs_where_the_checkout_has_them():
    assert (ROOT / "configs").is_symlink()
    target = (ROOT / "configs").readlink()
    assert re.search(rf"\bln -s {re.escape(str(target))} configs\b", DOCKERFILE)
