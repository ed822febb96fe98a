"""``python -m kdlab.cards``: the paper recipes' reference cards beside what kdlab runs.

    python -m kdlab.cards                                   # every card: its reference, fields, known deviations
    python -m kdlab.cards dkd_cifar100                      # one card, field by field: reference | source | kdlab
    python -m kdlab.cards dkd_cifar100 pair=resnet32x4-shufflev2 trainer.max_epochs=10   # any overrides
    python -m kdlab.cards takd_cifar100_resnet --command    # the reference run's command, with the author's seeds
    python -m kdlab.cards --docs                            # rewrite docs/experiments.md's card tables

A card (``cards/<recipe>.yaml``, the format in :mod:`kdlab.pipeline.cards`) says, for every setting that moves a
recipe's number, what its reference code ran and where it says so; ``tests/pipeline/test_cards.py`` holds every
recipe under ``protocol=reference`` to its card.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from kdlab import config_tree
from kdlab.cli.report import report_error
from kdlab.errors import ConfigError, KdlabError

DOCS = config_tree.ROOT / "docs" / "experiments.md"
BEGIN, END = "<!-- cards:begin -->", "<!-- cards:end -->"
#: why kdlab's default protocol differs from the reference run where the protocols themselves set a field
PROTOCOL_REASONS = {
    "data.val_split": "the held-out protocol: a validation split held out of training chooses the reported epoch "
                      "(protocol=reference: none)",
    "trainer.precision": "auto: bf16-mixed on a bf16 GPU, for speed (protocol=reference: fp32)",
    "keep": "the held-out protocol keeps the best epoch on its validation split (a data-free stage: its last); "
            "protocol=reference keeps what the reference kept",
}
Compose = Callable[[str, "str | None", str, Sequence[str]], dict]


def compose(recipe: str, pair: str | None, protocol: str, overrides: Sequence[str] = ()) -> dict:
    """The resolved config of ``python -m kdlab +experiment=<recipe> protocol=<protocol> [pair=...] <overrides>``."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from kdlab.cli.hydra_app import CONF_DIR, register_configs

    register_configs()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = hydra_compose(config_name="config", overrides=[f"+experiment={recipe}", f"protocol={protocol}",
                                                                 *([f"pair={pair}"] if pair else []), *overrides])
        return OmegaConf.to_container(cfg, resolve=True)
    except Exception as e:  # Hydra's composition errors: one line
        raise ConfigError(f"cannot compose +experiment={recipe} protocol={protocol}: {str(e).splitlines()[0]}") from e
    finally:
        GlobalHydra.instance().clear()


def fmt(v: Any) -> str:
    """A value as a card and a table show it: numbers to 6 significant digits, lists and mappings compact."""
    if isinstance(v, bool) or v is None:
        return str(v).lower() if v is not None else "null"
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(fmt(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {fmt(x)}" for k, x in v.items()) + "}"
    return str(v)


def rows(recipe: str, pair: str | None = None, overrides: Sequence[str] = (), composer: Compose = compose
         ) -> tuple[dict, list[dict]]:
    """The card of ``recipe`` and one row per field: its reference value and source, what kdlab's reference run
    and its default (heldout) run resolve it to, and why they differ."""
    from kdlab.pipeline import build_stages
    from kdlab.pipeline.cards import check_card, load_card, resolve, same

    card = load_card(recipe)
    ref = composer(recipe, pair, "reference", overrides)
    held = composer(recipe, pair, "heldout", overrides)
    held_specs = build_stages(held)
    out = []
    for c in check_card(card, ref, build_stages(ref)):
        heldout = resolve(held, held_specs, c.field)
        why = []
        if c.reason:
            why.append(f"protocol=reference runs {fmt(c.expected)}: {c.reason}")
        if not c.ok:
            why.append(f"changed here: {fmt(c.actual)}")
        if not same(heldout, c.actual):
            key = "keep" if c.field.endswith(".keep") else c.field
            why.append(PROTOCOL_REASONS.get(key) or (card.get("heldout") or {}).get(c.field)
                       or "the default protocol differs (no reason on the card)")
        out.append({"field": c.field, "reference": c.reference, "source": c.source, "reference_run": c.actual,
                    "heldout": heldout, "ok": c.ok, "why": "; ".join(why)})
    return card, out


def command(card: dict) -> str:
    """The reference run's command: the recipe under protocol=reference with the author's seeds, where known."""
    parts = ["python -m kdlab", f"+experiment={card['recipe']}", "protocol=reference"]
    seeds = (card.get("seeds") or {}).get("value")
    if isinstance(seeds, dict):
        for stage, seed in seeds.items():
            parts.append(f"seed={seed}" if stage == "*" else f"++pipeline.per_stage.{stage}.seed={seed}")
    return " ".join(parts)


def _cell(v: Any) -> str:
    return str(v).replace("|", "\\|").replace("\n", " ")


def card_markdown(recipe: str, composer: Compose = compose) -> str:
    """One recipe's section of docs/experiments.md: its reference, the fields side by side, the pairs."""
    card, table = rows(recipe, composer=composer)
    code = f"code `{card['code']}`" if card.get("code") else "**no public code**"
    lines = [f"### {recipe}", "", f"{card['title']}. Reference: {card['reference']}; {code}."]
    if card.get("no_public_code"):
        lines[-1] += f" {card['no_public_code']}."
    reported = card["reported"]
    lines += ["", f"The reference's number: `{reported['value']}` ({reported['source']})." if reported["value"]
              else f"The reference's number: not stated ({reported['source']}).",
              (f"Seeds: {fmt(card['seeds']['value']) if card['seeds']['value'] is not None else 'not set'} "
               f"({card['seeds']['source']}). The reference run: `{command(card)}`"), ""]
    for p in card.get("published") or []:
        what = ", ".join(f"{k} {fmt(v)}" for k, v in p.items() if k != "source")
        lines.append(f"- published: {what} ({p['source']})")
    lines += ["", "| field | reference | source | kdlab default (heldout) | deviation and reason |", "|---|---|---|---|---|"]
    for r in table:
        lines.append(f"| `{r['field']}` | {_cell(fmt(r['reference']))} | {_cell(r['source'])} | "
                     f"{_cell(fmt(r['heldout']))} | {_cell(r['why']) or '-'} |")
    desc = card.get("descriptive") or {}
    if desc:
        lines += ["", "| not a config value | reference | source | why it is not checked |", "|---|---|---|---|"]
        lines += [f"| {k} | {_cell(fmt(e['value']))} | {_cell(e['source'])} | {_cell(e['reason'])} |"
                  for k, e in desc.items()]
    pairs = card.get("pairs") or {}
    if pairs:
        base = card["fields"]
        lines += ["", f"Pairs (`pair=<name>`, default `{next(iter(pairs))}`): the fields a pair sets over the default's.",
                  "", "| pair | fields | published |", "|---|---|---|"]
        for name, entry in pairs.items():
            own = [f"`{k.removeprefix('stages.')}` {fmt(e.get('kdlab', e['value']) if 'kdlab' in e else e['value'])}"
                   + (f" (reference {fmt(e['value'])})" if "kdlab" in e else "")
                   for k, e in (entry.get("fields") or {}).items() if base.get(k) != e]
            pub = "; ".join(", ".join(f"{k} {fmt(v)}" for k, v in p.items() if k not in ("source", "pair"))
                            for p in entry.get("published") or []) or "-"
            lines.append(f"| {name} | {_cell('; '.join(own)) or '-'} | {_cell(pub)} |")
    return "\n".join(lines) + "\n"


def docs_markdown(composer: Compose = compose) -> str:
    """Every card's section, in recipe order: the block between docs/experiments.md's cards markers."""
    from kdlab.pipeline.cards import recipes_with_cards

    head = ("Generated by `python -m kdlab.cards --docs` from `cards/*.yaml`; every field is held to the recipe "
            "under `protocol=reference` by `tests/pipeline/test_cards.py`.\n\n")
    return head + "\n".join(card_markdown(r, composer) for r in recipes_with_cards())


def write_docs(path: Path = DOCS, composer: Compose = compose) -> None:
    text = path.read_text(encoding="utf-8")
    if BEGIN not in text or END not in text:
        raise ConfigError(f"{path} has no {BEGIN} ... {END} markers to write the cards between")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(f"{head}{BEGIN}\n{docs_markdown(composer)}{END}{tail}", encoding="utf-8")
    tmp.replace(path)


def summary() -> str:
    from kdlab.pipeline.cards import load_card, recipes_with_cards

    out = []
    for recipe in recipes_with_cards():
        card = load_card(recipe)
        known = [k for k, e in card["fields"].items() if "kdlab" in e]
        code = card.get("code") or "no public code"
        out.append(f"{recipe:26s} {len(card['fields']):3d} fields, {len(known)} known deviation(s), "
                   f"{len(card.get('pairs') or {})} pair(s); {code.split(' ')[0]}")
    return "\n".join(out)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m kdlab.cards", description=__doc__.split("\n\n")[0])
    p.add_argument("recipe", nargs="?", help="a recipe with a card (conf/experiment/<recipe>.yaml, cards/<recipe>.yaml)")
    p.add_argument("overrides", nargs="*", help="overrides of the run (pair=<name>, trainer.max_epochs=10, ...)")
    p.add_argument("--command", action="store_true", help="print the reference run's command (the author's seeds)")
    p.add_argument("--docs", action="store_true", help="rewrite the card tables of docs/experiments.md")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    try:
        from kdlab.pipeline.cards import load_card

        if args.docs:
            write_docs()
            print(f"wrote {DOCS}")
        elif args.recipe is None:
            print(summary())
        elif args.command:
            print(command(load_card(args.recipe)))
        else:
            pair = next((o.split("=", 1)[1] for o in args.overrides if o.startswith("pair=")), None)
            card, table = rows(args.recipe, pair, [o for o in args.overrides if not o.startswith("pair=")])
            print(f"{args.recipe}: {card['reference']}")
            for r in table:
                flag = "ok" if r["ok"] else "CHANGED"
                print(f"  {flag:7s} {r['field']:48s} reference {fmt(r['reference'])}; reference run "
                      f"{fmt(r['reference_run'])}; heldout {fmt(r['heldout'])}" + (f"  ({r['why']})" if r["why"] else ""))
            print(f"  the reference run: {command(card)}")
        return 0
    except KdlabError as e:
        return report_error("kdlab.cards", e)
    except Exception as e:  # noqa: BLE001 - one line, never a traceback
        return report_error("kdlab.cards", e)


if __name__ == "__main__":
    sys.exit(main())
