"""MkDocs hooks (mkdocs.yml ``hooks:``): the lists of methods in the manual, made from the method files themselves,
so that a new method is its four files (strategy, YAML, test, page) and nothing else.

* the navigation's "Methods" section: ``methods/index.md``, then every page of ``docs/methods/``, A-Z by title;
* the table of strategies in ``methods/index.md`` (at ``<!-- strategies -->``): one row per strategy registered in
  ``kdlab/distill/`` (``@STRATEGIES.register("<name>")``), with the ``distill=`` choice whose YAML names it, its
  module's one-line summary and its page;
* the API reference ``reference/distill.md`` (at ``<!-- modules -->``): a ``::: kdlab.distill.<module>`` block for
  every module of the package.

The files are read as text, nothing is imported (like mkdocstrings, which parses the sources statically), and
tests/distill/test_every_method.py checks the result against ``kdlab.distill.STRATEGIES``.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
REGISTER = re.compile(r"""@STRATEGIES\.register\(\s*["'](\w+)["']\s*\)""")
STRATEGY_KEY = re.compile(r"^strategy:\s*(\w+)", re.MULTILINE)
TABLE_MARK, MODULES_MARK = "<!-- strategies -->", "<!-- modules -->"


def title(page: Path) -> str:
    """A page's first ``# `` heading (its title in the navigation)."""
    for line in page.read_text(encoding="utf-8").splitlines():
        if line.startswith("# "):
            return line[2:].strip()
    return page.stem


def summary(module: Path) -> str:
    """The first line of a module's docstring."""
    doc = ast.get_docstring(ast.parse(module.read_text(encoding="utf-8"))) or ""
    return doc.split("\n\n", 1)[0].replace("\n", " ").strip()


def strategies(root: Path = ROOT) -> dict[str, Path]:
    """{strategy name: its module}, as registered in ``kdlab/distill/*.py``."""
    found: dict[str, Path] = {}
    for module in sorted((root / "kdlab" / "distill").glob("*.py")):
        for name in REGISTER.findall(module.read_text(encoding="utf-8")):
            found[name] = module
    return found


def choices(root: Path = ROOT) -> dict[str, str]:
    """{strategy name: the ``distill=`` choice whose YAML sets it} (``ce``: ``none``)."""
    out: dict[str, str] = {}
    for yaml in sorted((root / "conf" / "distill").glob("*.yaml")):
        m = STRATEGY_KEY.search(yaml.read_text(encoding="utf-8"))
        if m:
            out.setdefault(m.group(1), yaml.stem)
    return out


def methods_nav(root: Path = ROOT) -> list[str]:
    """The "Methods" section: the overview, then every page of ``docs/methods/``, A-Z by title."""
    pages = [p for p in (root / "docs" / "methods").glob("*.md") if p.name != "index.md"]
    return ["methods/index.md", *(f"methods/{p.name}" for p in sorted(pages, key=lambda p: title(p).lower()))]


def strategies_table(root: Path = ROOT) -> str:
    """The table of every registered strategy (Markdown, links relative to ``docs/methods/``)."""
    picks = choices(root)
    rows = ["| strategy | choose it with | what it is | page |", "|---|---|---|---|"]
    for name, module in sorted(strategies(root).items()):
        page = root / "docs" / "methods" / f"{name}.md"
        link = f"[{title(page)}]({name}.md)" if page.is_file() else "-"
        pick = f"`distill={picks[name]}`" if name in picks else "(no YAML)"
        rows.append(f"| `{name}` | {pick} | {summary(module)} | {link} |")
    return "\n".join(rows)


def modules_reference(root: Path = ROOT) -> str:
    """``::: kdlab.distill.<module>`` for every module: the contract first, then the others A-Z."""
    names = sorted(p.stem for p in (root / "kdlab" / "distill").glob("*.py") if not p.stem.startswith("_"))
    names.sort(key=lambda n: n != "base")
    return "\n\n".join(f"::: kdlab.distill.{n}" for n in names)


def on_config(config, **kwargs):
    for entry in config["nav"] or []:
        if isinstance(entry, dict) and "Methods" in entry:
            entry["Methods"] = methods_nav()
    return config


def on_page_markdown(markdown, page, config, files, **kwargs):
    if page.file.src_uri == "methods/index.md":
        return markdown.replace(TABLE_MARK, strategies_table())
    if page.file.src_uri == "reference/distill.md":
        return markdown.replace(MODULES_MARK, modules_reference())
    return markdown
