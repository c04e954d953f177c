"""The documentation's code runs as written: the README's quick start (the blocks between its
``--8<--`` markers, which the site's Getting started page includes) and the block of "flowdiff
from Python"; and the README's links point at files and headings that exist.

The quick start's ``flowdiff fit`` lines get a few flags appended that make training tiny (fewer
steps, a smaller U-Net), and ``make data`` writes fake MNIST; every other word runs as written.
A line the test does not know how to run fails it, so a new quick-start block comes with its
recipe here. The site itself (links between pages, anchors, the API reference) is checked by
``make docs`` (``mkdocs build --strict``), which ``make test`` runs first.
"""

import os
import re
import shlex
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest
from test_cli import TINY
from test_image_captions import TINY_DIT, write_metadata
from test_images import write_folder
from test_mnist_cli import TINY_UNET
from test_mnist_data import write_fake_mnist

ROOT = Path(__file__).parent.parent
README = (ROOT / "README.md").read_text()
PYTHON_PAGE = ROOT / "docs" / "guides" / "python.md"

# What `fit` gets appended, by config: the quick start's runs, made tiny.
TINY_FIT = {
    "toy.yaml": TINY,
    "mnist.yaml": [*TINY_UNET, "--trainer.max_steps", "4", "--trainer.val_check_interval", "4"],
    "images.yaml": [
        "--data.init_args.image_size", "12", "--data.init_args.batch_size", "4",
        "--data.init_args.cache_dir", "cache", "--data.init_args.decode_workers", "1",
        "--model.net.init_args.channels", "[8, 16]", "--model.net.init_args.norm_groups", "4",
        "--trainer.max_steps", "2", "--trainer.logger", "false",
        "--validation.num_samples", "6", "--model.sampler.init_args.steps", "2",
    ],
    "images_text.yaml": [
        "--data.init_args.image_size", "8", "--data.init_args.batch_size", "4",
        "--data.init_args.cache_dir", "cache", "--data.init_args.decode_workers", "1",
        *TINY_DIT, "--model.text_encoder.init_args.dim", "8",
        "--model.text_encoder.init_args.num_heads", "2", "--trainer.max_steps", "2",
        "--trainer.logger", "false", "--model.sampler.init_args.steps", "2",
    ],
}  # fmt: skip


def fenced_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", text, re.M | re.S)


def quick_start() -> dict[str, list[str]]:
    """{heading: command lines} of the README's quick start, comments dropped."""
    section = README.split("<!-- --8<-- [start:quickstart] -->", 1)[1]
    section = section.split("<!-- --8<-- [end:quickstart] -->", 1)[0]
    blocks = {}
    for part in re.split(r"^### ", section, flags=re.M)[1:]:
        heading = part.splitlines()[0].strip()
        lines = [line.split("#", 1)[0].strip() for block in fenced_blocks(part, "sh") for line in
                 block.splitlines()]  # fmt: skip
        blocks[heading] = [line for line in lines if line]
    return blocks


def test_the_quick_start_is_included_by_the_site_from_the_readme():
    page = (ROOT / "docs" / "getting-started.md").read_text()
    assert '--8<-- "README.md:quickstart"' in page
    assert set(quick_start()) >= {"2D toy data", "MNIST with classifier-free guidance",
                                  "Your own images"}  # fmt: skip


@pytest.mark.parametrize("heading", list(quick_start()))
def test_each_quick_start_block_runs_as_written(heading, tmp_path, monkeypatch, run_cli):
    monkeypatch.chdir(tmp_path)  # the repository's root: runs/ and data/ are written here
    images = write_folder(tmp_path / "my-images", per_class=4)
    captioned = write_metadata(tmp_path / "my-captioned-images")
    for line in quick_start()[heading]:
        line = line.replace("PATH/TO/CAPTIONED/IMAGES", str(captioned))
        words = shlex.split(line.replace("PATH/TO/IMAGES", str(images)))
        if words == ["make", "data"]:
            write_fake_mnist(tmp_path / "data")
            continue
        assert words[0] == "flowdiff", f"the test does not know how to run {line!r}"
        args = words[1:]
        if args[:1] == ["fit"]:
            config = Path(args[args.index("--config") + 1]).name
            args += TINY_FIT[config]
        before = set(tmp_path.rglob("samples.png"))
        code, out, err = run_cli(*args)
        assert code == 0, f"{line}\n{err}"
        if args[:1] == ["sample"]:  # "samples.pt + samples.png", in the run's samples/
            run = tmp_path / Path(args[args.index("--ckpt") + 1]).parent.parent
            made = set(tmp_path.rglob("samples.png")) - before
            assert made and all(run / "samples" in p.parents for p in made), line
        if args == ["--help"]:
            assert all(command in out for command in ("fit", "sample", "evaluate", "reflow"))


def test_the_python_page_runs_and_prints_what_it_says(tmp_path, run_cli, monkeypatch):
    (block,) = fenced_blocks(PYTHON_PAGE.read_text(), "python")
    promised = block.rstrip().splitlines()[-1].split("#", 1)[1].strip()  # the last comment
    script = tmp_path / "example.py"
    script.write_text(block)
    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    done = subprocess.run([sys.executable, script], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == promised
    # "Then `flowdiff sample --ckpt runs/python/checkpoints/last.ckpt` ... work on it."
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli("sample", "--ckpt", "runs/python/checkpoints/last.ckpt")
    assert code == 0, err
    assert list((tmp_path / "runs" / "python" / "samples").rglob("samples.png"))


def slug(heading: str) -> str:
    """The anchor Python-Markdown's table of contents gives a heading (its default slugify)."""
    text = unicodedata.normalize("NFKD", heading).encode("ascii", "ignore").decode()
    return re.sub(r"[-\s]+", "-", re.sub(r"[^\w\s-]", "", text).strip().lower())


def test_the_readme_links_point_at_files_and_headings_that_exist():
    links = re.findall(r"\]\(([^)\s]+)\)", README)
    local = [link for link in links if not re.match(r"[a-z]+://", link)]
    assert len(local) >= 20  # the README is a front door: it links into the documentation
    for link in local:
        path, _, anchor = link.partition("#")
        target = ROOT / path
        assert target.exists(), f"README.md links to {link!r}: no such file"
        if anchor:
            headings = re.findall(r"^#+ (.*)$", target.read_text(), re.M)
            slugs = {slug(heading) for heading in headings}
            assert anchor in slugs, f"README.md links to {link!r}: no such heading"
