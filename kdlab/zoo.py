"""`python -m kdlab.zoo`: the model zoo as a table (parameters, MFLOPs per image, prepool feature shape).

python -m kdlab.zoo --dataset cifar100
python -m kdlab.zoo --dataset fashion_mnist --on-the-fly --n 3
"""

from __future__ import annotations

import argparse
import sys

import torch

from kdlab.errors import KdlabError, unknown_name

# name -> (num_classes, in_channels, image size)
DATASETS = {"cifar10": (10, 3, 32), "cifar100": (100, 3, 32), "fashion_mnist": (10, 1, 28)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m kdlab.zoo", description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="cifar100", help=f"one of {', '.join(DATASETS)} (default cifar100)")
    p.add_argument("--on-the-fly", action="store_true", help="show the 1 x N twins (Pacemaker KD)")
    p.add_argument(
        "--n",
        type=int,
        default=None,
        help="row width N of the 1 x N twins (default: k); implies --on-the-fly",
    )
    p.add_argument("--mode", default="row", help="on-the-fly mode: row | mixed (default row)")
    p.add_argument("--models", default=None, help="comma-separated subset of model names (default: all)")
    return p.parse_args(argv)


def zoo_rows(
    dataset: str,
    on_the_fly: bool = False,
    n: int | None = None,
    mode: str = "row",
    models: list[str] | None = None,
) -> list[dict]:
    """One dict per model: name, family, params, macs (per image) and prepool shape."""
    from kdlab.models import FeatureTaps, build_model, count_macs, count_params, list_models, model_family

    if dataset not in DATASETS:
        raise unknown_name("dataset", dataset, DATASETS)
    num_classes, channels, size = DATASETS[dataset]
    rows = []
    for name in models or list_models():
        model = build_model(
            name,
            num_classes,
            channels,
            on_the_fly=on_the_fly,
            on_the_fly_n=n,
            on_the_fly_mode=mode,
            input_size=size,
        )
        with FeatureTaps(model, [model.default_tap], detach=True) as taps:  # one dummy forward for both
            macs = count_macs(model, (channels, size, size))
        rows.append(
            {
                "name": name,
                "family": model_family(name),
                "params": count_params(model),
                "macs": macs,
                "prepool": tuple(taps.features[model.default_tap].shape[1:]),
            }
        )
    return rows


def render(rows: list[dict], dataset: str, on_the_fly: bool, n: int | None, mode: str) -> None:
    from rich.console import Console
    from rich.table import Table

    num_classes, channels, size = DATASETS[dataset]
    title = f"kdlab model zoo: {dataset} ({num_classes} classes, {channels}x{size}x{size})"
    if on_the_fly:
        title += f", on-the-fly 1x{n if n else 'k'} twins ({mode})"
    table = Table(
        title=title,
        caption="MFLOPs = multiply-accumulates of Conv2d + Linear layers per image / 1e6 "
        "(the KD literature's convention)",
    )
    table.add_column("model")
    table.add_column("family")
    table.add_column("params", justify="right")
    table.add_column("MFLOPs", justify="right")
    table.add_column("prepool (CxHxW)", justify="right")  # the default feature tap
    for r in rows:
        table.add_row(
            r["name"],
            r["family"],
            f"{r['params']:,}",
            f"{r['macs'] / 1e6:.2f}",
            "x".join(map(str, r["prepool"])),
        )
    Console().print(table)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    on_the_fly = args.on_the_fly or args.n is not None
    try:
        if args.dataset not in DATASETS:
            raise unknown_name("dataset", args.dataset, DATASETS)
        models = [m.strip() for m in args.models.split(",") if m.strip()] if args.models else None
        torch.set_grad_enabled(False)
        torch.set_num_threads(1)  # single-image dummy passes: threads only add contention
        rows = zoo_rows(args.dataset, on_the_fly, args.n, args.mode, models)
    except KdlabError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    render(rows, args.dataset, on_the_fly, args.n, args.mode)
    return 0


if __name__ == "__main__":
    sys.exit(main())
