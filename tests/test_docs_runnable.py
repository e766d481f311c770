"""The README's and docs/'s commands run, and their links resolve.

A shell block fenced as ```` ```sh runnable ```` is run on the testbed as a reader would run it after
``make install`` and ``. .venv/bin/activate``: a page's blocks in order, in one bash (``set -euo pipefail``), in
an empty working folder, with this interpreter's bin folder first on PATH and ``OMP_NUM_THREADS=1``. A failing
command fails the page's test with the block and the output since that block began. Other blocks (7B paths, a GPU,
several GPUs) are illustrative and are not run. The pages run two at a time (one thread each), the README first:
its blocks take longest.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
README_LIMIT = 12_000  # characters: the rest belongs in docs/
BLOCK = re.compile(r"^```sh runnable[^\n]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
FENCED = re.compile(r"^```.*?^```[ \t]*$", re.MULTILINE | re.DOTALL)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)
MARK = "@@ forgetless-docs block"
PAGE_TIMEOUT = 420  # seconds; every page together should take 3–4 minutes on 2 cores
WORKERS = 2  # pages run at once, one thread each


def runnable_blocks(text: str) -> list[str]:
    """The runnable shell blocks of a page, in order."""
    return BLOCK.findall(text)


def page_script(blocks: list[str]) -> str:
    """One bash script of a page's blocks, each announced by a marker line that names it."""
    parts = ["set -euo pipefail"]
    for i, block in enumerate(blocks, 1):
        parts += [f"echo '{MARK} {i}'", block]
    return "\n".join(parts) + "\n"


def failed_block(output: str, blocks: list[str]) -> str:
    """The block that was running when the script stopped, and its output."""
    marks = list(re.finditer(rf"^{re.escape(MARK)} (\d+)$", output, re.MULTILINE))
    if not marks:
        return f"before the first block:\n{output[-6000:]}"
    last = marks[-1]
    i = int(last.group(1))
    return f"block {i} of {len(blocks)}:\n{blocks[i - 1]}\n--- its output (tail) ---\n{output[last.end() :][-6000:]}"


def run_env() -> dict[str, str]:
    """The environment of an activated venv, one thread per process."""
    bin_dir = str(Path(sys.executable).parent)
    return {
        **os.environ,
        "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
    }


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.replace("`", "").strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {slug(h) for h in HEADING.findall(FENCED.sub("", path.read_text()))}


def links(path: Path) -> list[str]:
    """The link targets of a page outside its code blocks."""
    return LINK.findall(FENCED.sub("", path.read_text()))


def broken(page: Path, target: str) -> str | None:
    """What is wrong with a relative link of `page` (None: it resolves, anchor included)."""
    if re.match(r"^[a-z]+:", target):
        return None  # http:, https:, mailto:
    ref, _, anchor = target.partition("#")
    path = (page.parent / ref).resolve() if ref else page
    if not path.exists():
        return f"{target}: no file {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}"
    if anchor and path.suffix == ".md" and anchor not in anchors(path):
        return f"{target}: no heading #{anchor} in {path.name}"
    return None


def bash(script: str, folder: Path) -> subprocess.CompletedProcess:
    """`script` in one bash, in `folder`, in the venv's environment; stdout and stderr together."""
    return subprocess.run(
        ["bash", "-c", script],
        cwd=folder,
        env=run_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=PAGE_TIMEOUT,
        check=False,
    )


def run_page(page: Path, folder: Path) -> subprocess.CompletedProcess:
    """A page's blocks in one bash, in `folder`."""
    return bash(page_script(runnable_blocks(page.read_text())), folder)


RUNNABLE = [p for p in PAGES if runnable_blocks(p.read_text())]


@pytest.fixture(scope="module")
def page_runs(request, tmp_path_factory) -> dict[Path, Future]:
    """Every page this session selected, started WORKERS at a time once the testbed model is assembled (so that no
    two pages assemble it at once); each test waits for its own page."""
    pages = [
        item.callspec.params["page"]
        for item in request.session.items
        if getattr(item, "module", None) is sys.modules[__name__]
        and item.originalname == "test_the_page_runs"
    ]
    subprocess.run(["forgetless", "testbed", "model"], env=run_env(), capture_output=True, check=True)
    pool = ThreadPoolExecutor(WORKERS)
    yield {p: pool.submit(run_page, p, tmp_path_factory.mktemp(f"docs-{p.stem}")) for p in pages}
    pool.shutdown(cancel_futures=True)


def test_the_readme_is_short_and_has_runnable_blocks():
    text = README.read_text()
    assert len(text) <= README_LIMIT, f"README.md has {len(text)} characters; move the rest to docs/"
    assert runnable_blocks(text)


def test_every_link_resolves_and_every_docs_page_is_linked_from_the_readme():
    problems = [f"{p.relative_to(ROOT)}: {why}" for p in PAGES for t in links(p) if (why := broken(p, t))]
    linked = {(README.parent / t.partition("#")[0]).resolve() for t in links(README)}
    problems += [
        f"README.md does not link {p.relative_to(ROOT)}" for p in PAGES[1:] if p.resolve() not in linked
    ]
    assert not problems, "\n".join(problems)


def test_a_failing_block_stops_its_page_and_is_named(tmp_path):
    text = (
        "```sh runnable\necho one\n```\n```sh\nexit 0\n```\n"
        "```sh runnable\necho two; false\n```\n```sh runnable\necho three\n```\n"
    )
    blocks = runnable_blocks(text)
    assert blocks == ["echo one\n", "echo two; false\n", "echo three\n"]  # the illustrative block is not run
    done = bash(page_script(blocks), tmp_path)
    assert done.returncode != 0 and "three" not in done.stdout
    report = failed_block(done.stdout, blocks)
    assert report.startswith("block 2 of 3:\necho two; false") and report.endswith("two\n")


@pytest.mark.parametrize("page", RUNNABLE, ids=[str(p.relative_to(ROOT)) for p in RUNNABLE])
def test_the_page_runs(page, page_runs):
    done = page_runs[page].result()
    if done.returncode != 0:
        blocks = runnable_blocks(page.read_text())
        pytest.fail(
            f"{page.relative_to(ROOT)}: exit {done.returncode} in {failed_block(done.stdout, blocks)}",
            pytrace=False,
        )
