"""Docs that cannot drift: every ``python -m kdlab ...`` command in README.md and docs/ composes as written.

``python -m kdlab`` commands go through :func:`kdlab.cli.main.check_command`, what the CLI runs before Hydra
does (Hydra's flags, the overrides composed with Hydra's own settings and launchers, the config validated as
the pipeline reads it, no data loaded), in this process; a ``-m`` sweep is checked in each of its
first combination, as the CLI checks it, and in each other option of a config group it sweeps
(``+experiment=a,b``). The tools' commands
(``kdlab.compare``, ``kdlab.study``, ``kdlab.export``, ``kdlab.zoo``) go through their own argument parsers,
and the study's name and parts through its loader. What depends on the reader's machine (their data, their
SLURM cluster, their output directory) is not checked; the placeholders for their own paths are listed in
:data:`tests.helpers.doc_commands.PLACEHOLDERS`. A renamed key, recipe, group option or flag fails this test.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.doc_commands import PAGES, PLACEHOLDERS, Command, _split, all_commands, commands_of

TOOLS = ("kdlab", "kdlab.compare", "kdlab.study", "kdlab.export", "kdlab.zoo", "kdlab.cards")
#: optional libraries a page tells the reader to install before its command (docs/wandb.md: pip install mlflow)
READER_INSTALLS = ("mlflow",)


def group_options(args: list[str]) -> list[list[str]]:
    """The other options of each config group a multirun sweeps over (``+experiment=a,b``, ``distill=kd,dkd``,
    ``hydra/launcher=...``), one argument list each: the first combination stays, one group option changes.

    The first combination is what the CLI checks before a sweep; a swept group's other options are where a
    renamed recipe or group option hides. The other values of a swept key (``seed=0,1,2``) compose the same
    tree and are checked in their own jobs, as the sweeps page says."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from kdlab.cli.main import parse_command_line
    from kdlab.config_tree import CONF_DIR

    overrides = list(parse_command_line(list(args)).overrides)  # Hydra's own parser: --cfg job, -m, ... apart
    flags = [a for a in args if a not in overrides]
    parsed = OverridesParser.create().parse_overrides(overrides)
    out = []
    for i, (ov, text) in enumerate(zip(parsed, overrides)):
        group = ov.key_or_group.lstrip("+~")
        if not ov.is_sweep_override() or not ((CONF_DIR / group).is_dir() or group == "model"):
            continue
        for value in list(ov.sweep_string_iterator())[1:]:
            out.append(flags + overrides[:i] + [f"{text.split('=', 1)[0]}={value}"] + overrides[i + 1:])
    return out


def check_kdlab(args: list[str]) -> None:
    from kdlab.cli.main import check_command

    check_command(list(args), machine=False)  # a sweep: its first combination, as the CLI checks it
    for other in group_options(args):
        check_command(other, machine=False)


def check_tool(module: str, args: list[str]) -> None:
    """The tool's own parser (argparse's usage error becomes an AssertionError naming it)."""
    from kdlab.errors import ConfigError

    try:
        if module == "kdlab.compare":
            from kdlab.compare.cli import build_parser

            build_parser().parse_args(args)
        elif module == "kdlab.study":
            from kdlab.study.cli import build_parser
            from kdlab.study.config import load_study

            cut = args.index("--") if "--" in args else len(args)
            a = build_parser().parse_args(args[:cut])
            parts = load_study(a.name)["parts"]
            for part in (a.only or "").split(","):
                if part and part not in parts:
                    raise ConfigError(f"--only names unknown part {part!r}; parts: {', '.join(parts)}")
        elif module == "kdlab.export":
            from kdlab.export.cli import parse_args

            parse_args(args)
        elif module == "kdlab.zoo":
            from kdlab.data import DATASETS
            from kdlab.zoo import parse_args

            if parse_args(args).dataset not in DATASETS:
                raise ConfigError(f"unknown --dataset; known: {', '.join(DATASETS)}")
        elif module == "kdlab.cards":
            from kdlab.cards import build_parser as cards_parser
            from kdlab.pipeline.cards import load_card

            a = cards_parser().parse_args(args)
            if a.recipe is not None:
                load_card(a.recipe)  # an unknown recipe is a ConfigError naming the known ones
        else:
            raise AssertionError(f"unknown tool python -m {module}")
    except SystemExit as e:
        raise AssertionError(f"python -m {module}: argparse refused {args} (exit {e.code})") from e


def check(command: Command, file: Path) -> str | None:
    """None if the command composes (or parses) as written, else the reason."""
    from kdlab.errors import KdlabError

    teachers = file.parent / "cifar_teachers"
    args = [a.replace("{file}", str(file)).replace("{teachers}", str(teachers)) for a in command.args]
    try:
        if command.module == "kdlab":
            check_kdlab(args)
        else:
            check_tool(command.module, args)
    except (KdlabError, AssertionError) as e:
        return str(e)
    return None


@pytest.fixture(scope="module")
def placeholder_file(tmp_path_factory) -> Path:
    from kdlab.models.released import FILE, RELEASED

    path = tmp_path_factory.mktemp("docs") / "teacher.pt"
    path.write_bytes(b"")
    for arch in RELEASED:  # the released teachers' folder ({teachers}): checked to exist, never read here
        released = path.parent / "cifar_teachers" / FILE.format(arch=arch)
        released.parent.mkdir(parents=True, exist_ok=True)
        released.write_bytes(b"")
    return path


@pytest.fixture
def reader_installs(monkeypatch):
    """The libraries of READER_INSTALLS count as installed (each page that needs one says to install it)."""
    from kdlab.pipeline import loggers

    text = "\n".join(p.read_text(encoding="utf-8") for p in PAGES)
    for name in READER_INSTALLS:
        assert f"pip install {name}" in text, f"no page says pip install {name}"
    real = loggers.find_spec
    monkeypatch.setattr(loggers, "find_spec", lambda name: object() if name in READER_INSTALLS else real(name))


def test_every_command_in_the_docs_composes(placeholder_file, reader_installs, capsys):
    """Each distinct command once (the results tables repeat theirs between README and docs/results)."""
    from kdlab.cli.hydra_app import register_configs

    register_configs()
    commands = all_commands()
    distinct: dict[tuple[str, tuple[str, ...]], Command] = {}
    for c in commands:
        distinct.setdefault((c.module, c.args), c)
    broken = [f"{c}\n    not a kdlab command (python -m {c.module})" for c in distinct.values() if c.module not in TOOLS]
    # the tool named in prose (`python -m kdlab.compare`) is not a command line
    todo = [c for c in distinct.values() if c.module in TOOLS
            and (c.args or c.module == "kdlab" or c.text.strip() != f"python -m {c.module}")]
    # in this process, one after the other: Hydra's composition is the cost (~0.1-0.3 s a command). Forked workers
    # were tried and hung: a process that has run torch (and W&B's threads, after other tests) is not safe to fork.
    reasons = [check(c, placeholder_file) for c in todo]
    broken += [f"{c}\n    {reason}" for c, reason in zip(todo, reasons) if reason]
    capsys.readouterr()  # the warnings check_command printed for the good ones
    assert not broken, f"{len(broken)} of {len(distinct)} commands in the docs do not compose:\n" + "\n".join(broken)
    # the collector still finds the manual's commands: the quick tour, the results tables, every tool
    assert len(distinct) > 150, len(distinct)
    assert {c.module for c in commands} == set(TOOLS)


# -- the collector and the checks themselves -------------------------------------------------------------
def test_collector_reads_blocks_spans_continuations_and_comments(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "Run `python -m kdlab +experiment=kd_fashion_mnist` or `python -m kdlab.compare`.\n"
        "```bash\n"
        "python -m kdlab -m seed=0,1 \\\n"
        "    'pipeline.chain=[plain4,plain2]'   # a comment\n"
        "make study            # = python -m kdlab.study fashion_mnist --docs   (28 min)\n"
        "OMP_NUM_THREADS=1 python -m kdlab.zoo --json | head\n"
        "```\n", encoding="utf-8")
    found = [(c.line, c.module, c.args) for c in commands_of(page)]
    assert found == [
        (1, "kdlab", ("+experiment=kd_fashion_mnist",)),
        (1, "kdlab.compare", ()),
        (3, "kdlab", ("-m", "seed=0,1", "pipeline.chain=[plain4,plain2]")),
        (5, "kdlab.study", ("fashion_mnist", "--docs")),
        (6, "kdlab.zoo", ("--json",)),
    ]


def test_placeholders_are_few_and_explicit():
    assert len(PLACEHOLDERS) <= 10
    assert _split("python -m kdlab.compare <sweep dir> --by experiment") != \
        _split("python -m kdlab.compare outputs/multirun/x --by experiment")  # raw text is not rewritten here


@pytest.mark.parametrize(("args", "needle"), [
    (["+experiment=dgkd_fashion_mnits"], "unknown experiment 'dgkd_fashion_mnits'"),  # a renamed recipe
    (["distill.temperatur=2"], "distill.temperatur is not read by dgkd"),  # a renamed key
    (["+logger.mlflow._target_=pytorch_lightning.loggers.MLFlowLoger"], "MLFlowLoger"),  # a logger argument
    (["-m", "seed=0,1", "hydra/launcher=jobllib"], "unknown hydra/launcher 'jobllib'"),
    (["-m", "seed=0,1", "+experiment=kd_fashion_mnist,dgkd_fashion_mnits"], "'dgkd_fashion_mnits'"),  # 2nd option
])
def test_a_broken_command_fails_the_check(args, needle, placeholder_file, capsys):
    from kdlab.cli.hydra_app import register_configs

    register_configs()
    reason = check(Command("page.md", 1, "python -m kdlab " + " ".join(args), "kdlab", tuple(args)),
                   placeholder_file)
    capsys.readouterr()
    assert reason is not None and needle in reason, reason


@pytest.mark.parametrize(("module", "args", "needle"), [
    ("kdlab.compare", ["SWEEP", "--bye", "experiment"], "argparse refused"),
    ("kdlab.study", ["fashion_mnist", "--only", "plain_chian"], "unknown part 'plain_chian'"),
    ("kdlab.study", ["fashion_mnsit"], "unknown study 'fashion_mnsit'"),
    ("kdlab.export", ["RUN_DIR"], "--format is required"),
    ("kdlab.zoo", ["--dataset", "cifar1000"], "unknown --dataset"),
])
def test_a_broken_tool_command_fails_the_check(module, args, needle, placeholder_file, capsys):
    reason = check(Command("page.md", 1, "", module, tuple(args)), placeholder_file)
    capsys.readouterr()
    assert reason is not None and needle in reason, reason
