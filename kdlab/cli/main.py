"""``python -m kdlab``: the Hydra app that runs one knowledge-distillation pipeline per job.

    python -m kdlab                                    # the default: DGKD on Fashion-MNIST
    python -m kdlab +experiment=dgkd_cifar100          # a paper recipe
    python -m kdlab -m +experiment=dgkd_fashion_mnist seed=0,1,2 distill.temperature=2,4

Exit status: 0 success, 2 bad configuration or input (one line on stderr), 1 runtime failure (missing
data, NaN loss, I/O), 1 for a sweep in which any job failed, 128 + the signal number when stopped by
SIGTERM (143) or SIGINT (130): one line naming the signal and the stage; the finished stages stay in the
store and rerunning the same command resumes. Tracebacks only with ``debug=true`` or HYDRA_FULL_ERROR=1.
"""
from __future__ import annotations

import difflib
import os
import re
import shlex
import shutil
import sys
from collections.abc import Callable, Mapping
from typing import Any

from kdlab import config_tree
from kdlab.cli.hydra_app import CONF_DIR, STATE, report


def _one_line(text: str) -> str:
    lines = [ln.strip() for ln in str(text).strip().splitlines() if ln.strip()]
    lines = [ln for ln in lines if not ln.startswith("Set the environment variable HYDRA_FULL_ERROR")]
    return "; ".join(lines) if lines else "invalid configuration"


def _explain(e: BaseException, node_of: Callable[[str], Mapping[str, Any] | None]) -> str:
    """Hydra's composition errors as one line naming the bad value and the accepted ones.

    ``node_of(parent)`` is a config node (composed without the bad override), or None.
    """
    text = str(e)
    missing = re.search(r"Could not find '([^']+)'", text)
    if missing and "Available options in" in text:  # model=resnet7, data=imagenet, +experiment=nope
        group, _, name = missing.group(1).rpartition("/")
        block = text.split("Available options in", 1)[1].split("Config search path", 1)[0]
        options = [ln.strip() for ln in block.splitlines()[1:] if ln.strip()]
        top = group.split("/")[0]
        folder = config_tree.CONF_DIR / top
        if top and top != "hydra" and folder.is_dir():  # with a study's parts (+experiment=capacity_gap/...)
            name = "/".join([*group.split("/")[1:], name])
            group, options = top, sorted(p.relative_to(folder).with_suffix("").as_posix() for p in folder.rglob("*.yaml"))
        return f"unknown {group or 'config'} {name!r}; known: {', '.join(options)}"
    entry = re.search(r"Interpolation key '([^']+)' not found", text)
    if entry:  # pair=nope in a recipe whose values come from ${pairs.${pair}.chain}
        parts = entry.group(1).split(".")
        for i in range(len(parts) - 1, 0, -1):
            node = node_of(".".join(parts[:i]))
            known = sorted(str(k) for k in node) if node is not None else None
            if known is not None and parts[i] not in known:
                parent = parts[i - 1]
                kind = parent.removesuffix("s")
                return f"unknown {kind} {parts[i]!r}; known: {', '.join(known)}"
    bad = re.search(r"Could not override '([^']+)'", text)
    cause = re.search(r"full_key: (\S+)", str(e.__cause__ or ""))
    if bad:  # a key that does not exist (a typo, or a key of another data set)
        full = cause.group(1) if cause else bad.group(1)
        parent, _, leaf = full.rpartition(".")
        node = node_of(parent)
        if parent == "distill" and node is not None:  # another method's key (distill=dkd distill.temperature=2)
            from kdlab.distill import STRATEGIES

            if str(node.get("strategy")) in STRATEGIES:
                return STRATEGIES.get(str(node.get("strategy"))).unread(leaf)
        known = sorted(str(k) for k in node) if node is not None else []
        close = difflib.get_close_matches(leaf, known, n=1)
        hint = f" (did you mean {'.'.join(filter(None, [parent, close[0]]))}?)" if close else ""
        listed = f"; keys in {parent or 'the root config'}: {', '.join(known)}" if known else ""
        return (f"unknown config key {full!r}{hint}{listed}; to add a new key write +{bad.group(1)}=...")
    return _one_line(text)


def check_output_dir(path: str) -> None:
    """Hydra would die with a traceback creating a run directory under a file or on a read-only mount."""
    from pathlib import Path

    from kdlab.errors import StoreError

    p = Path(path).expanduser().absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    if not p.is_dir():
        raise StoreError(f"cannot create the output directory {path!r}: {str(p)!r} is not a directory")
    if not os.access(p, os.W_OK):
        raise StoreError(f"cannot create the output directory {path!r}: {str(p)!r} is not writable")


# Hydra's command-line flags that each choose what the command does: at most one of them
HYDRA_COMMANDS = {"run": "--run", "multirun": "-m (--multirun)", "cfg": "--cfg", "shell_completion": "--shell-completion",
                  "info": "--info"}
SLURM_LAUNCHER = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"


def parse_command_line(argv: list[str]):
    """Hydra's flags and overrides of ``argv`` (Hydra's own parser), a ConfigError for what Hydra would
    refuse with its usage text or a traceback: an unknown flag, a flag after the overrides, two commands."""
    from hydra._internal.utils import get_args_parser

    from kdlab.errors import ConfigError

    parser = get_args_parser()

    def error(message: str) -> None:  # argparse would print its usage and exit 2
        raise ConfigError(message)

    parser.error = error  # type: ignore[method-assign]
    args, extra = parser.parse_known_args(argv)
    if extra:
        try:
            mixed = parser.parse_intermixed_args(argv)
        except ConfigError:
            mixed = None
        if mixed is None or not mixed.overrides:
            raise ConfigError(f"unrecognized arguments: {' '.join(extra)}")
        late = [a for a in argv[argv.index(mixed.overrides[0]):] if a.startswith("-")]
        flags = [a for a in argv if a not in mixed.overrides]
        raise ConfigError(f"{' '.join(late)} after the overrides: Hydra's flags go first, "
                          f"python -m kdlab {shlex.join(flags + mixed.overrides)}")
    given = [flag for dest, flag in HYDRA_COMMANDS.items() if getattr(args, dest) not in (None, False)]
    if len(given) > 1:
        hint = (": --cfg prints one job's config; drop -m and give each key one value (e.g. seed=0), or drop "
                "--cfg to run the sweep") if set(given) == {"-m (--multirun)", "--cfg"} else ""
        raise ConfigError(f"{' and '.join(given)} cannot be combined (one of {', '.join(HYDRA_COMMANDS.values())})"
                          + hint)
    if args.config_name not in (None, "config") and not (args.config_dir or args.config_path):
        raise ConfigError(f"--config-name {args.config_name}: kdlab's config is conf/config.yaml; choose with "
                          f"overrides (+experiment=<recipe>, pipeline=<name>, ...)")
    if args.resolve and args.cfg is None and not args.help:
        raise ConfigError("--resolve works only with --cfg (e.g. --cfg job --resolve)")
    return args


def _first_value(ov) -> str | None:
    """The first value of a sweep override as override text (the start of an Optuna interval), or None."""
    from hydra.core.override_parser.types import IntervalSweep

    try:
        return next(iter(ov.sweep_string_iterator()))
    except Exception:  # noqa: BLE001 - e.g. optuna's interval(): no list of values
        value = ov.value()
        return str(value.start) if isinstance(value, IntervalSweep) else None


def _is_group(name: str) -> bool:
    """Whether ``name`` is a config group (a folder of conf/, Hydra's own, or registered: ``model``)."""
    from hydra.core.config_store import ConfigStore

    return name.startswith("hydra/") or (config_tree.CONF_DIR / name).is_dir() or name in ConfigStore.instance().repo


def sweep_plan(args) -> tuple[list[str], list[str], list[list[str]]]:
    """(the first combination's overrides, the sweep overrides as given, the other option of each swept
    config group, one override list each): what :func:`check_command` composes. A sweep of Hydra's own
    settings (Hydra: "Sweeping over Hydra's configuration is not supported") is a ConfigError."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from kdlab.errors import ConfigError, warn

    try:
        parsed = OverridesParser.create().parse_overrides(args.overrides)
    except Exception as e:  # Hydra's parser errors
        raise ConfigError(_one_line(e)) from e
    given: dict[str, list[str]] = {}
    for ov, text in zip(parsed, args.overrides):
        if not ov.key_or_group.startswith("hydra"):
            given.setdefault(ov.key_or_group, []).append(text)
    for key, texts in given.items():  # Hydra silently keeps the last one; say so (seed=1 seed=2 vs seed=1,2)
        if len(texts) > 1 and len(set(texts)) > 1 and not args.cfg:
            warn(f"{key} is given {len(texts)} times ({', '.join(texts)}); the last one wins "
                 f"(for a sweep over values write {key}=a,b with -m)")
    slots: list[str | None] = []  # per override: its text, or a sweep's first value (None: an Optuna interval)
    sweeps: list[str] = []
    for ov, text in zip(parsed, args.overrides):
        if not ov.is_sweep_override():
            slots.append(text)
            continue
        key = ov.get_key_element()
        if ov.is_hydra_override() and key.startswith("hydra.sweeper.params."):
            raise ConfigError(f"{text}: Hydra's own settings take one value; to set an Optuna search space "
                              f"write it as an override of its own: "
                              f"'{key[len('hydra.sweeper.params.'):]}={text.split('=', 1)[1]}'")
        if ov.is_hydra_override():
            raise ConfigError(f"{text}: Hydra's own settings (hydra.*, hydra/...) take one value, not a sweep")
        sweeps.append(text)
        value = _first_value(ov)
        slots.append(None if value is None else f"{key}={value}")
    others = []  # a renamed recipe in +experiment=a,b,c: Hydra would compose it only when the sweep starts
    for i, ov in enumerate(parsed):
        if ov.is_sweep_override() and _is_group(ov.key_or_group.lstrip("+~")):
            for value in list(ov.sweep_string_iterator())[1:]:
                other = [*slots[:i], f"{ov.get_key_element()}={value}", *slots[i + 1:]]
                others.append([o for o in other if o is not None])
    return [o for o in slots if o is not None], sweeps, others


def _compose(config_name: str, overrides: list[str]):
    """(the job's config, Hydra's) as Hydra composes them for ``overrides``; Hydra's exception if it cannot."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import open_dict

    try:
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
    finally:
        GlobalHydra.instance().clear()
    with open_dict(cfg):
        hydra_cfg = cfg.pop("hydra")
    return cfg, hydra_cfg


def compose_checked(config_name: str, overrides: list[str]):
    """:func:`_compose`, with a ConfigError of one line naming the bad value and the accepted ones when Hydra
    cannot compose (its own message with HYDRA_FULL_ERROR=1)."""
    from omegaconf import OmegaConf

    from kdlab.errors import ConfigError

    def node_of(parent: str) -> Mapping[str, Any] | None:  # composed without the bad override, for the hint
        try:
            node, hydra_node = _compose(config_name, [o for o in overrides if "=" not in o or not
                                                      o.lstrip("+~").startswith(parent + ".")])
            if parent.startswith("hydra"):
                node, parent = hydra_node, parent.partition(".")[2]
            node = OmegaConf.select(node, parent) if parent else node
            return node if hasattr(node, "keys") else None
        except Exception:  # noqa: BLE001 - only a hint
            return None

    try:
        return _compose(config_name, overrides)
    except Exception as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        raise ConfigError(_explain(e, node_of)) from e


def _reads_model(pipeline: Any) -> bool:
    """Whether a pipeline config (unresolved) interpolates the ``model`` group (``chain: ["${model}"]``)."""
    if isinstance(pipeline, dict):
        return any(_reads_model(v) for v in pipeline.values())
    if isinstance(pipeline, list):
        return any(_reads_model(v) for v in pipeline)
    return isinstance(pipeline, str) and "${model" in pipeline


def check_model_is_read(overrides: list[str], cfg, hydra_cfg) -> None:
    """``model=`` (or ``model.*=``) is read by ``pipeline=single`` alone: elsewhere it would be ignored."""
    from omegaconf import OmegaConf

    from kdlab.errors import ConfigError

    given = [o for o in overrides if o.lstrip("+~").split("=", 1)[0].split(".")[0] == "model"]
    if not given or _reads_model(OmegaConf.to_container(cfg.get("pipeline") or {}, resolve=False)):
        return
    chain = ",".join(str(e.get("arch") if isinstance(e, dict) else e)
                     for e in OmegaConf.to_container(cfg.pipeline, resolve=True).get("chain") or [])
    raise ConfigError(
        f"{given[0]} is not read by pipeline={hydra_cfg.runtime.choices.get('pipeline')}: the model group is the "
        f"one model of pipeline=single; this pipeline trains pipeline.chain=[{chain}]. To train {given[0]} "
        f"alone write pipeline=single {given[0]}; to put it in the chain set pipeline.chain=[...]")


def check_machine(args, multirun: bool, hydra_cfg, plain: dict[str, Any]) -> None:
    """What depends on this machine: the run (or sweep) directory can be created, and the SLURM launcher
    finds ``srun`` (submitit would stop with a traceback once the sweep starts)."""
    from omegaconf import OmegaConf

    from kdlab.errors import ConfigError

    if multirun and str(OmegaConf.select(hydra_cfg, "launcher._target_")) == SLURM_LAUNCHER \
            and shutil.which("srun") is None:
        raise ConfigError("hydra/launcher=slurm submits a SLURM job array, but this machine has no srun "
                          "(not a SLURM node); run the command on the cluster's login node, or here with "
                          "hydra/launcher=joblib (local processes) or the default launcher")
    key = f"hydra.{'sweep' if multirun else 'run'}.dir="
    run_dirs = [o.split("=", 1)[1] for o in args.overrides if o.startswith(key)]
    check_output_dir(run_dirs[-1] if run_dirs else str((plain.get("paths") or {}).get("output_dir", ".")))


def check_command(argv: list[str], machine: bool = True) -> None:
    """What ``python -m kdlab <argv>`` would refuse, as a KdlabError with its one line: Hydra's flags, the
    overrides composed (Hydra's settings and launcher included; a sweep's first combination and each other
    option of a swept group), each config validated as the pipeline will read it (no data loaded).
    ``machine``: also what depends on this machine (:func:`check_machine`). Quiet for a command that will run.
    The docs test (tests/docs/test_commands.py) calls it for every command the manual shows.
    """
    from omegaconf import OmegaConf

    from kdlab.errors import ConfigError, KdlabError

    args = parse_command_line(argv)
    if args.help or args.hydra_help or args.info or args.shell_completion or args.config_path \
            or args.config_dir or args.experimental_rerun:
        return
    first, sweeps, others = sweep_plan(args)
    if args.cfg and sweeps:
        raise ConfigError(f"--cfg prints one job's config; give each key one value, not the sweep "
                          f"{', '.join(sweeps)}")
    if args.cfg:
        return  # Hydra prints the config (composition errors, if any, are Hydra's to show)
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from kdlab.cli.resources import check_settings
    from kdlab.pipeline.checks import validate_config  # the checks (and torch) only for a run, not for --help
    from kdlab.pipeline.protocol import check_sweeper

    parsed = OverridesParser.create().parse_overrides(args.overrides)
    sweeper = next((ov.value() for ov in parsed if ov.key_or_group == "hparams_search"), None)
    for i, overrides in enumerate([first, *others]):
        cfg, hydra_cfg = compose_checked(args.config_name or "config", overrides)
        multirun = args.multirun or str(hydra_cfg.mode) in ("MULTIRUN", "RunMode.MULTIRUN")
        if sweeps and not multirun:
            raise ConfigError(f"{sweeps[0]} is a sweep (one job per value), which needs -m: python -m kdlab -m "
                              f"{shlex.join(args.overrides)}; for a list write {sweeps[0].split('=', 1)[0]}=[...]")
        debug = bool(cfg.get("debug")) or os.environ.get("HYDRA_FULL_ERROR") == "1"
        try:
            check_model_is_read(overrides, cfg, hydra_cfg)
            plain = OmegaConf.to_container(cfg, resolve=True)
            validate_config(plain)
            check_sweeper(plain, sweeper)  # Optuna's objective needs a validation split
            check_settings(plain.get("sweep") or {}, multirun,  # sweep.*: checked, and only in a sweep
                           [o.lstrip("+~").split("=", 1)[0] for o in overrides if o.lstrip("+~").startswith("sweep.")])
            if machine and i == 0:
                check_machine(args, multirun, hydra_cfg, plain)
        except KdlabError as e:
            e.debug = debug  # type: ignore[attr-defined]  # preflight re-raises it: the traceback
            raise
        except Exception as e:  # e.g. an interpolation that cannot resolve (pair=nope): one line naming the
            if debug:           # accepted values (debug: the traceback)
                raise

            def node_of(parent: str, cfg: Any = cfg) -> Mapping[str, Any] | None:
                node = OmegaConf.select(cfg, parent) if parent else cfg
                return node if hasattr(node, "keys") else None

            raise ConfigError(_explain(e, node_of)) from e


def preflight(argv: list[str]) -> None:
    """Compose and check the config once before Hydra runs it (:func:`check_command`), so that bad input ends
    with one line and its exit status (2) instead of Hydra's messages or a traceback."""
    from kdlab.errors import KdlabError

    try:
        check_command(argv)
    except KdlabError as e:
        if getattr(e, "debug", False) or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        report(str(e), e.exit_code)
        sys.exit(e.exit_code)


def main() -> None:
    from kdlab.cli import gc_policy

    gc_policy.hold()  # the libraries are imported with the collector off (kdlab/cli/gc_policy.py)
    from kdlab.cli.logs import quiet_libraries

    quiet_libraries()
    from kdlab.cli.hydra_app import hydra_entry, register_configs, report_interrupt
    from kdlab.errors import Interrupted, interrupt_handlers

    with interrupt_handlers():  # SIGTERM / SIGINT anywhere: one line and 128 + signum, never a traceback
        try:
            register_configs()
            preflight(sys.argv[1:])  # imports torch, Lightning and the pipeline
            gc_policy.release()
            hydra_entry()
        except Interrupted as e:
            report_interrupt(e)
    gc_policy.at_exit()
    sys.exit(STATE["exit"])


if __name__ == "__main__":
    main()
