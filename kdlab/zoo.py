"""`python -m kdlab.zoo`: the model zoo as a table (parameters, MFLOPs per image, prepool feature shape).

python -m kdlab.zoo --dataset cifar100
python -m kdlab.zoo --dataset fashion_mnist --on-the-fly --n 3
python -m kdlab.zoo --dataset cifar10 --quant 2 --act-bits 4     # ternary weights, 4-bit activations: size in bytes
python -m kdlab.zoo --models resnet20 --json                      # the rows as JSON
"""

from __future__ import annotations

import argparse
import sys

import torch

from kdlab.cli.report import report_error
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
    p.add_argument("--quant", type=int, nargs="?", const=2, default=None, metavar="BITS",
                   help="quantize the weights to BITS (2 = ternary, the default of a bare --quant; 3..16 uniform) "
                        "and show the size in bytes at the bit-widths (model.quant.weight_bits)")
    p.add_argument("--act-bits", type=int, default=None, help="activation bits with --quant (default: float)")
    p.add_argument("--first-last", default="8bit", help="first / last layers with --quant: 8bit | full | same")
    p.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    return p.parse_args(argv)


def zoo_rows(
    dataset: str,
    on_the_fly: bool = False,
    n: int | None = None,
    mode: str = "row",
    models: list[str] | None = None,
    quant: dict | None = None,
) -> list[dict]:
    """One dict per model: name, family, params, macs (per image), prepool shape, bit-widths and the size in
    bytes at them (``float_bytes``: the same model in float32)."""
    from kdlab.models import FeatureTaps, build_model, count_macs, count_params, list_models, model_family
    from kdlab.models.quant import quant_config, quant_report, size_bytes

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
        float_bytes = size_bytes(model)
        q = quant_config(quant)
        if q is not None:
            model = build_model(name, num_classes, channels, on_the_fly=on_the_fly, on_the_fly_n=n,
                                on_the_fly_mode=mode, input_size=size, quant=q)
        with FeatureTaps(model, [model.default_tap], detach=True) as taps:  # one dummy forward for both
            macs = count_macs(model, (channels, size, size))
        rows.append(
            {
                "name": name,
                "family": model_family(name),
                "params": count_params(model),
                "macs": macs,
                "prepool": tuple(taps.features[model.default_tap].shape[1:]),
                **quant_report(model),
                "float_bytes": float_bytes,
            }
        )
    return rows


def render(rows: list[dict], dataset: str, on_the_fly: bool, n: int | None, mode: str, quant: dict | None = None
           ) -> None:
    from rich.console import Console
    from rich.table import Table

    num_classes, channels, size = DATASETS[dataset]
    title = f"kdlab model zoo: {dataset} ({num_classes} classes, {channels}x{size}x{size})"
    if on_the_fly:
        title += f", on-the-fly 1x{n if n else 'k'} twins ({mode})"
    if quant:
        title += (f", W{quant['weight_bits'] or 32} A{quant['act_bits'] or 32} (first / last layers: "
                  f"{quant['first_last']})")
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
    if quant:
        table.add_column("bytes", justify="right")
        table.add_column("float32 bytes", justify="right")
    for r in rows:
        table.add_row(
            r["name"],
            r["family"],
            f"{r['params']:,}",
            f"{r['macs'] / 1e6:.2f}",
            "x".join(map(str, r["prepool"])),
            *([f"{r['size_bytes']:,}", f"{r['float_bytes']:,}"] if quant else []),
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
        from kdlab.models.quant import check_bits, quant_config

        check_bits("--quant", args.quant)
        check_bits("--act-bits", args.act_bits)
        quant = quant_config({"weight_bits": args.quant, "act_bits": args.act_bits, "first_last": args.first_last},
                             where="--quant") if args.quant is not None or args.act_bits is not None else None
        rows = zoo_rows(args.dataset, on_the_fly, args.n, args.mode, models, quant)
    except KdlabError as e:
        return report_error("kdlab.zoo", e)
    if args.json:
        import json

        print(json.dumps(rows, indent=1))
        return 0
    render(rows, args.dataset, on_the_fly, args.n, args.mode, quant)
    return 0


if __name__ == "__main__":
    sys.exit(main())
