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
import sys
from collections.abc import Callable

from kdlab.cli.hydra_app import CONF_DIR, STATE, report


def _one_line(text: str) -> str:
    lines = [ln.strip() for ln in str(text).strip().splitlines() if ln.strip()]
    lines = [ln for ln in lines if not ln.startswith("Set the environment variable HYDRA_FULL_ERROR")]
    return "; ".join(lines) if lines else "invalid configuration"


def _explain(e: BaseException, keys_of: Callable[[str], list[str] | None]) -> str:
    """Hydra's composition errors as one line naming the bad value and the accepted ones.

    ``keys_of(parent)`` lists the keys of a config node (composed without the bad override), or None.
    """
    text = str(e)
    missing = re.search(r"Could not find '([^']+)'", text)
    if missing and "Available options in" in text:  # model=resnet7, data=imagenet, +experiment=nope
        group, _, name = missing.group(1).rpartition("/")
        block = text.split("Available options in", 1)[1].split("Config search path", 1)[0]
        options = [ln.strip() for ln in block.splitlines()[1:] if ln.strip()]
        return f"unknown {group or 'config'} {name!r}; known: {', '.join(options)}"
    bad = re.search(r"Could not override '([^']+)'", text)
    cause = re.search(r"full_key: (\S+)", str(e.__cause__ or ""))
    if bad:  # a key that does not exist (a typo, or a key of another data set)
        full = cause.group(1) if cause else bad.group(1)
        parent, _, leaf = full.rpartition(".")
        known = keys_of(parent) or []
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


def preflight(argv: list[str]) -> None:
    """Compose the config once before Hydra runs it, so bad overrides end with one line and exit 2."""
    from hydra import compose, initialize_config_dir
    from hydra._internal.utils import get_args_parser
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    args = get_args_parser().parse_args(argv)
    if args.help or args.hydra_help or args.cfg or args.info or args.shell_completion or args.config_path \
            or args.config_dir or args.experimental_rerun:
        return
    from kdlab.errors import KdlabError, warn
    from kdlab.pipeline.checks import validate_config  # the checks (and torch) only for a run, not for --help
    overrides: list[str] = []
    try:
        parsed = OverridesParser.create().parse_overrides(args.overrides)
    except Exception as e:  # noqa: BLE001 - Hydra's parser errors
        report(_one_line(e), 2)
        sys.exit(2)
    given: dict[str, list[str]] = {}
    for ov, text in zip(parsed, args.overrides):
        if not ov.key_or_group.startswith("hydra"):
            given.setdefault(ov.key_or_group, []).append(text)
    for key, texts in given.items():  # Hydra silently keeps the last one; say so (seed=1 seed=2 vs seed=1,2)
        if len(texts) > 1 and len(set(texts)) > 1:
            warn(f"{key} is given {len(texts)} times ({', '.join(texts)}); the last one wins "
                 f"(for a sweep over values write {key}=a,b with -m)")
    for ov, text in zip(parsed, args.overrides):
        if ov.key_or_group.startswith("hydra"):
            continue
        if ov.is_sweep_override():
            try:
                first = next(iter(ov.sweep_string_iterator()))
            except Exception:  # noqa: BLE001, S112 - e.g. optuna's interval(): nothing to check here
                continue
            overrides.append(f"{ov.get_key_element()}={first}")
        else:
            overrides.append(text)
    debug = False
    try:
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose(config_name=args.config_name or "config", overrides=overrides)
        GlobalHydra.instance().clear()
        debug = bool(cfg.get("debug"))
        plain = OmegaConf.to_container(cfg, resolve=True)
        validate_config(plain)
        from kdlab.cli.resources import check_settings

        check_settings(plain.get("sweep") or {}, bool(args.multirun), [k for k in given if k.startswith("sweep.")])
        run_dirs = [ov.value() for ov in parsed if ov.key_or_group == f"hydra.{'sweep' if args.multirun else 'run'}.dir"]
        check_output_dir(str(run_dirs[-1]) if run_dirs else str((plain.get("paths") or {}).get("output_dir", ".")))
    except KdlabError as e:
        if debug or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        report(str(e), e.exit_code)
        sys.exit(e.exit_code)
    except Exception as e:
        if debug or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise

        def keys_of(parent: str) -> list[str] | None:
            try:
                GlobalHydra.instance().clear()
                with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
                    node = compose(config_name=args.config_name or "config",
                                   overrides=[o for o in overrides if not o.lstrip("+~").startswith(parent + ".")
                                              or "=" not in o])
                node = OmegaConf.select(node, parent) if parent else node
                return sorted(str(k) for k in node) if hasattr(node, "keys") else None
            except Exception:  # noqa: BLE001 - only a hint
                return None

        report(_explain(e, keys_of), 2)
        sys.exit(2)
    finally:
        GlobalHydra.instance().clear()


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
