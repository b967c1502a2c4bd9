"""The README stays one screen, and the project's issue numbers stay out of everything a user reads
(README, docs, examples) and everything an engineer reads (code, comments, tests): they belong in
CHANGELOG.md alone. The docs site itself is built in strict mode by `make test` (mkdocs.yml)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 150
# The forms an issue number takes in prose: "issue" or "issues", an optional "#", the number; or "#" and
# the number in parentheses.
ISSUE_NUMBER = re.compile(r"\bissues?\s*#?\s*\d+|\(#\d+\)", re.IGNORECASE)


def tracked_text_files() -> dict[str, str]:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: the tracked files are unknown")
    names = (
        subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.decode().split("\0")
    )
    texts = {}
    for name in filter(None, names):
        path = ROOT / name
        if not path.is_file() or path.is_symlink():
            continue
        try:
            texts[name] = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            continue  # weights, graphs, images
    return texts


def test_the_readme_fits_one_screen():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move the detail into docs/"


def test_no_issue_numbers_outside_the_changelog():
    texts = tracked_text_files()
    assert "README.md" in texts and "mvlm_compile/cli.py" in texts
    found = [
        f"{name}:{number}: {line.strip()}"
        for name, text in texts.items()
        if name != "CHANGELOG.md"
        for number, line in enumerate(text.splitlines(), 1)
        if ISSUE_NUMBER.search(line)
    ]
    assert not found, "issue numbers belong in CHANGELOG.md only:\n" + "\n".join(found)


def test_the_pattern_finds_the_forms_it_is_for():
    issue = "issue"  # the cited forms are made here, so that this file cites none
    for cited in (
        f"see {issue} 15",
        f"{issue.title()}s 12 and 13",
        f"{issue} #20",
        "fixed (" + "#21)",
        f"({issue.upper()} 7)",
    ):
        assert ISSUE_NUMBER.search(cited), cited
    for plain in ("an issue's fix", "issues with 16-bit images", "colour #ff0000"):
        assert not ISSUE_NUMBER.search(plain), plain
