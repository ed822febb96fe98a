"""The manual: every relative link in README.md and docs/ resolves, the README stays a first-day page (with the
blocks that kdlab.study and benchmarks/run.py rewrite), and ``mkdocs build --strict`` passes."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
GENERATED = ("results", "sweep")  # docs/results/ (python -m kdlab.study --docs), docs/sweep/ (kdlab.compare)

FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.DOTALL | re.MULTILINE)
INLINE_CODE = re.compile(r"`[^`\n]*`")
# [text](target) and ![alt](target), with an optional "title"; the text may hold one level of [brackets]
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^()\s<>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def pages() -> list[Path]:
    docs = [p for p in sorted(DOCS.rglob("*.md")) if p.relative_to(DOCS).parts[0] not in GENERATED]
    return [README, *docs]


def links(page: Path) -> list[str]:
    text = INLINE_CODE.sub("", FENCE.sub("", page.read_text(encoding="utf-8")))
    return LINK.findall(text)


def test_relative_links_resolve():
    checked, broken = 0, []
    for page in pages():
        for target in links(page):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE) or target.startswith("#"):  # http(s), mailto, anchors
                continue
            path = target.split("#", 1)[0].split("?", 1)[0]
            checked += 1
            if not (page.parent / path).exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, "broken relative links:\n" + "\n".join(broken)
    assert checked > 50  # the regex still finds the links


def test_link_regex():
    text = "see [a](x.md#y), ![img](p.png \"t\"), [`code`](c.md), [b](https://e.org) `[no](z.md)`\n```\n[no](w.md)\n```\n"
    found = LINK.findall(INLINE_CODE.sub("", FENCE.sub("", text)))
    assert found == ["x.md#y", "p.png", "c.md", "https://e.org"]


def test_readme_is_a_first_day_page():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) < 300, "README.md grew past a first-day page: move the detail into docs/"
    for command in ("make install", "make run", "make test"):
        assert command in text
    # the generated blocks that kdlab/study/cli.py and benchmarks/run.py rewrite in place, each once and in order
    for begin, end in (("<!-- results:begin -->", "<!-- results:end -->"),
                       ("<!-- bench:begin -->", "<!-- bench:end -->")):
        assert text.count(begin) == 1 and text.count(end) == 1, (begin, end)
        assert text.index(begin) < text.index(end)
    # docs/results.md and docs/performance.md include these README sections (pymdownx.snippets)
    for section in ("reading-the-numbers", "bench"):
        assert f"--8<-- [start:{section}]" in text and f"--8<-- [end:{section}]" in text, section


def test_mkdocs_build_strict(tmp_path):
    for module in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python"):
        pytest.importorskip(module)
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site"),
                           "--config-file", str(ROOT / "mkdocs.yml")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert (tmp_path / "site" / "index.html").is_file()
    assert (tmp_path / "site" / "reference" / "distill" / "index.html").is_file()


def test_the_development_page_counts_the_tests_by_command():
    """A number of tests written into the manual drifts (it said 411, then 554, of ~1000): the page shows the
    command that counts them instead."""
    text = (DOCS / "development" / "index.md").read_text(encoding="utf-8")
    assert 'pytest --collect-only -q -m "not slow"' in text and "pytest --collect-only -q -m slow" in text
    quoted = re.findall(r"\b\d{2,}(?:,\d{3})* (?:tests|passed)\b", text)
    assert not quoted, f"docs/development/index.md quotes test counts: {quoted}"
