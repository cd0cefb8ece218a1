"""The shell blocks of README.md and docs/*.md run as written.

Every ```bash block of a page is one of three kinds:

* a synopsis: its first line is ``# synopsis``; it shows a command's form (placeholders, options in
  brackets) and is not run, so it must be marked;
* the test suite's own commands (``python -m pytest ...``): running them here would run this test
  again, so each must be a line of ``.ci/run``, which runs them;
* anything else: run by :func:`test_page_commands_run_as_written`, with bash (``set -euo pipefail``),
  page by page (README.md first, then docs/ in name order) and block by block, in ONE scratch copy of
  the repository, so a block may use what an earlier block wrote (``drdo demo`` of docs/demo.md finds
  the README's run and reuses its training runs). ``drdo``, ``python`` and ``torchrun`` are this
  checkout's code.

Running the blocks takes minutes of CPU (the full ``drdo demo`` among them), so they run when
``DRDO_DOC_COMMANDS=1`` is set (``.ci/run`` sets it) and are skipped otherwise; the checks of the
blocks' form always run. Each page's wall time and the CPU time of its commands are printed (``-s``
shows them; the CPU time depends less on what else the machine runs).
"""
from __future__ import annotations

import os
import pathlib
import re
import resource
import shutil
import stat
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SYNOPSIS = "# synopsis"
#: Set to 1 to run the blocks (minutes of CPU).
RUN_ENV = "DRDO_DOC_COMMANDS"
#: The longest a page's blocks may run (the full demo, then its cached re-runs, on 2 CPU cores).
PAGE_TIMEOUT_S = 3600
_FENCE = re.compile(r"^```(?:bash|sh|shell)\n(.*?)^```", flags=re.S | re.M)
_TEST_COMMAND = re.compile(r"^(?:[A-Z_]+=\S+\s+)*python -m pytest\b")
#: Placeholders a runnable block must not hold: `...`, `<name>`, `[--option]`, `a|b` choices.
_PLACEHOLDER = re.compile(r"\.\.\.|<[\w-]+>|\[--|\s--\w[\w-]*\s+\w+\|\w+")


def shell_blocks(page: pathlib.Path) -> list[str]:
    """The bodies of the page's shell blocks, in page order."""
    return _FENCE.findall(page.read_text(encoding="utf-8"))


def is_synopsis(block: str) -> bool:
    return block.lstrip().startswith(SYNOPSIS)


def commands(block: str) -> list[str]:
    """The block's lines without comments and blank lines (a `#` after a space starts a comment)."""
    lines = (re.sub(r"(^|\s)#.*$", "", line).strip() for line in block.splitlines())
    return [line for line in lines if line]


def is_test_suite(block: str) -> bool:
    return all(_TEST_COMMAND.match(c) for c in commands(block))


def runnable_blocks(page: pathlib.Path) -> list[str]:
    return [b for b in shell_blocks(page) if not is_synopsis(b) and not is_test_suite(b)]


def _id(page: pathlib.Path) -> str:
    return page.relative_to(ROOT).as_posix()


@pytest.mark.parametrize("page", PAGES, ids=_id)
def test_blocks_with_placeholders_are_marked_as_synopses(page):
    for block in shell_blocks(page):
        if is_synopsis(block) or is_test_suite(block):
            continue
        found = [c for c in commands(block) if _PLACEHOLDER.search(c)]
        assert not found, (f"{_id(page)}: a shell block that is not marked `{SYNOPSIS}` holds a placeholder, so it "
                           f"cannot run as written: {found[0]!r}")


def test_test_command_blocks_are_what_ci_runs():
    ci = {line.strip() for line in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()}
    blocks = [(page, b) for page in PAGES for b in shell_blocks(page) if not is_synopsis(b) and is_test_suite(b)]
    assert blocks, "the README shows how to run the tests"
    for page, block in blocks:
        for command in commands(block):
            assert command in ci, f"{_id(page)} shows `{command}`, which .ci/run does not run"


def test_the_marker_is_documented():
    text = " ".join((ROOT / "docs" / "training.md").read_text(encoding="utf-8").split())
    assert f"first line is `{SYNOPSIS}`" in text and "tests/test_doc_commands.py" in text


def _demo_commands() -> list[tuple[str, str]]:
    """(page, command) of every `drdo demo` command the runnable blocks hold (`a && b` chains split)."""
    found = []
    for page in PAGES:
        for block in runnable_blocks(page):
            for line in commands(block):
                parts = (part.strip() for part in line.split("&&"))
                found += [(_id(page), part) for part in parts if part.startswith("drdo demo")]
    return found


def test_demo_commands_of_other_settings_write_to_other_directories(monkeypatch):
    """Two documented demos of different settings never share an output directory: the second would be
    refused (a demo of other settings is there), so a reader following the pages in order could not run it."""
    import shlex

    from drdo.cli import parse_args
    from drdo.demo.run import _identity, settings_from_args

    monkeypatch.chdir(ROOT)  # the commands name files relative to the repository root
    by_dir: dict[str, tuple[str, str, dict]] = {}
    for page, command in _demo_commands():
        settings = settings_from_args(parse_args(shlex.split(command)[1:]))
        seen = by_dir.setdefault(os.path.normpath(settings.output_dir), (page, command, _identity(settings)))
        assert seen[2] == _identity(settings), (f"`{command}` ({page}) and `{seen[1]}` ({seen[0]}) write demos of "
                                                f"other settings into {settings.output_dir}: give one --output-dir")
    assert len(by_dir) >= 3, sorted(by_dir)  # the full demo, --quick and the variants, each in its own directory


# ------------------------------------------------------------------------------------------ running the blocks


def _copy_repository(target: pathlib.Path) -> None:
    """The checkout's tracked and untracked-but-not-ignored files (no runs/, no caches) into ``target``."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                                capture_output=True, check=True).stdout.decode().split("\0")
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: everything but outputs and caches
        shutil.copytree(ROOT, target, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns(".git", "runs", "__pycache__", "*.egg-info", ".pytest_cache"))
        return
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)


def _shims(bin_dir: pathlib.Path) -> None:
    """`drdo`, `python` and `torchrun` that run this interpreter (and, through PYTHONPATH, the copy's code)."""
    bin_dir.mkdir()
    for name, body in (("drdo", '-m drdo "$@"'), ("python", '"$@"'), ("torchrun", '-m torch.distributed.run "$@"')):
        path = bin_dir / name
        path.write_text(f'#!/bin/sh\nexec "{sys.executable}" {body}\n')
        path.chmod(path.stat().st_mode | stat.S_IXUSR)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """One scratch copy of the repository for every page, and the environment its commands run in."""
    base = tmp_path_factory.mktemp("doc-commands")
    repo = base / "repo"
    repo.mkdir()
    _copy_repository(repo)
    _shims(base / "bin")
    env = dict(os.environ, PATH=f"{base / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
               PYTHONPATH=os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")])))
    return repo, env


#: What a page's blocks must leave in the scratch copy, besides exiting 0.
EXPECTED_FILES = {
    "README.md": ["runs/demo/report.json"],
    "docs/demo.md": ["runs/demo/report.json", "runs/demo-quick/report.json", "runs/demo-variants/report.json"],
    "docs/training.md": ["runs/pipeline/report.json", "runs/pipeline/drdo_2ranks/run.json"],
}


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@pytest.mark.parametrize("page", [p for p in PAGES if runnable_blocks(p)], ids=_id)
def test_page_commands_run_as_written(page, scratch):
    if os.environ.get(RUN_ENV) != "1":
        pytest.skip(f"the shell blocks take minutes of CPU; run them with {RUN_ENV}=1")
    repo, env = scratch
    start, cpu_start = time.perf_counter(), _children_cpu_s()
    for index, block in enumerate(runnable_blocks(page), 1):
        done = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=repo, env=env, capture_output=True,
                              text=True, timeout=PAGE_TIMEOUT_S)
        assert done.returncode == 0, (f"{_id(page)}, shell block {index} exited {done.returncode}:\n{block}\n"
                                      f"--- stdout ---\n{done.stdout[-3000:]}\n--- stderr ---\n{done.stderr[-3000:]}")
    print(f"\n{_id(page)}: shell blocks ran in {time.perf_counter() - start:.0f} s wall clock, "
          f"{_children_cpu_s() - cpu_start:.0f} s of CPU")
    missing = [f for f in EXPECTED_FILES.get(_id(page), []) if not (repo / f).is_file()]
    assert not missing, f"{_id(page)}'s blocks did not write {missing}"
