"""Reference cards: what a paper recipe's reference code ran, field by field, and where it says so.

A card is ``cards/<recipe>.yaml`` (beside ``conf/``, never a config Hydra could select; located by
:mod:`kdlab.config_tree`)::

    recipe: dkd_cifar100                      # conf/experiment/<recipe>.yaml
    title: DKD, resnet32x4 -> resnet8x4 on CIFAR-100
    reference: mdistiller at a08d46f, DKD (Zhao et al., CVPR 2022)   # the run the card describes
    code: megvii-research/mdistiller@a08d46f10d61...                  # null: no public code ...
    no_public_code: null                      # ... and then what was searched and what the paper gives
    published: [{what: ..., value: 76.32, source: ...}]                # the numbers the recipe cites
    reported: {value: test_acc_best_on_test, source: ...}             # the results.json field of that number (null:
                                                                      # the reference does not say)
    seeds: {value: {student: 31}, source: ...}                        # the author's seeds (null: not set)
    fields:                                   # checked: the recipe under protocol=reference resolves to these
      trainer.max_epochs: {value: 240, source: "configs/cifar100/dkd/res32x4_res8x4.yaml:L11"}
      stages.student.lr_schedule: {value: {0: 0.05, 150: 0.005, ...}, source: ...}
      normalization.mean: {value: [0.5071, 0.4867, 0.4408], source: ..., kdlab: [0.5071, 0.4865, 0.4409],
                           reason: "why kdlab's reference run differs (a known deviation)"}
    descriptive:                              # not config values: stated, with why they are not checked
      teacher mode: {value: ..., source: ..., reason: ...}
    heldout: {<field>: <why the default protocol differs there>}        # beyond the protocol's own fields
    pairs:                                    # named pairs (pair=<name>): their fields over the base ones
      resnet32x4-shufflev2: {published: [...], fields: {...}}

A field names a value of the composed run: a dotted path of the config (``data.batch_size``), a stage's resolved
value (``stages.<stage>.<key>``: ``arch``, ``max_epochs``, ``seed``, ``keep`` (the checkpoint it keeps),
``lr_schedule`` (``{epoch: lr}`` where the lr changes, from the stage's optimizer and scheduler as it trains),
``model.*``, ``distill.*``, ``optimizer.*``, ``scheduler.*``, ``stochastic.*``), or ``normalization.mean`` /
``normalization.std`` (the data's, as the data set applies them). A field that names nothing is an error.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdlab import config_tree
from kdlab.errors import ConfigError
from kdlab.pipeline import protocol

REQUIRED = ("recipe", "title", "reference", "published", "reported", "fields")
FIELD_KEYS = ("value", "source", "kdlab", "reason")
STAGE_KEYS = ("arch", "max_epochs", "seed", "keep", "lr_schedule", "sources", "model", "distill", "optimizer",
              "scheduler", "stochastic")
DERIVED = ("normalization.mean", "normalization.std")
MISSING = object()


def card_name(path: Path) -> str:
    try:
        return str(path.relative_to(config_tree.ROOT))
    except ValueError:
        return str(path)


def has_card(recipe: str) -> bool:
    return config_tree.card_path(recipe).is_file()


def recipes_with_cards() -> list[str]:
    return sorted(p.stem for p in config_tree.CARDS_DIR.glob("*.yaml"))


def load_card(recipe: str, path: Path | None = None) -> dict[str, Any]:
    """The card of ``recipe``, its form checked (one ConfigError line naming the card and the entry)."""
    import yaml

    path = Path(path) if path is not None else config_tree.card_path(recipe)
    where = card_name(path)
    if not path.is_file():
        raise ConfigError(f"experiment {recipe!r} has no reference card ({where}); recipes with one: "
                          f"{', '.join(recipes_with_cards())}")
    try:
        card = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{where}: not a readable YAML card: {str(e).splitlines()[0]}") from e
    if not isinstance(card, dict):
        raise ConfigError(f"{where}: a card is a mapping with {', '.join(REQUIRED)}")
    missing = [k for k in REQUIRED if k not in card]
    if missing:
        raise ConfigError(f"{where}: missing {', '.join(missing)} (a card has {', '.join(REQUIRED)})")
    if card["recipe"] != recipe:
        raise ConfigError(f"{where}: recipe {card['recipe']!r} is not {recipe!r}")
    if not card.get("code") and not card.get("no_public_code"):
        raise ConfigError(f"{where}: give the reference code (code: owner/repo@commit) or no_public_code: why")
    _check_entry(where, "reported", card["reported"])
    if card["reported"]["value"] is not None and card["reported"]["value"] not in protocol.REPORTED["reference"]:
        raise ConfigError(f"{where}: reported {card['reported']['value']!r} is no field protocol=reference reports; "
                          f"known: {', '.join(protocol.REPORTED['reference'])}")
    for scope, fields in [("fields", card["fields"]),
                          *((f"pairs.{p}.fields", (e or {}).get("fields") or {}) for p, e in
                            (card.get("pairs") or {}).items())]:
        if not isinstance(fields, dict):
            raise ConfigError(f"{where}: {scope} must be a mapping of field: {{value, source}}")
        for key, entry in fields.items():
            _check_entry(where, f"{scope}.{key}", entry)
    for key, entry in (card.get("descriptive") or {}).items():
        _check_entry(where, f"descriptive.{key}", entry, reason=True)
    return card


def _check_entry(where: str, name: str, entry: Any, reason: bool = False) -> None:
    if not isinstance(entry, dict) or "value" not in entry or not entry.get("source"):
        raise ConfigError(f"{where}: {name} needs a value and its source ({{value: ..., source: ...}})")
    unknown = sorted(set(entry) - set(FIELD_KEYS))
    if unknown:
        raise ConfigError(f"{where}: {name} has unknown key(s) {', '.join(unknown)}; known: {', '.join(FIELD_KEYS)}")
    if ("kdlab" in entry) != bool(entry.get("reason")) and not reason:
        raise ConfigError(f"{where}: {name}: a known deviation gives both kdlab (kdlab's value) and reason")
    if reason and not entry.get("reason"):
        raise ConfigError(f"{where}: {name}: a descriptive entry says why it is not checked (reason: ...)")


def card_fields(card: dict[str, Any], pair: str | None) -> dict[str, dict[str, Any]]:
    """The card's fields for the run's pair (``pair=<name>``): the base fields, the pair's over them."""
    fields = dict(card["fields"])
    pairs = card.get("pairs") or {}
    if pairs:
        if pair not in pairs:
            raise ConfigError(f"{card_name(config_tree.card_path(card['recipe']))} has no pair {pair!r}; "
                              f"known: {', '.join(pairs)}")
        fields.update((pairs[pair] or {}).get("fields") or {})
    return fields


# ------------------------------------------------------------------------------------------------ resolving

def lr_schedule(spec: Any) -> dict[int, float]:
    """``{epoch: lr}`` at the epochs (0-based) where the stage's lr changes, as its optimizer and scheduler
    (instantiated as the module does, stepped once per epoch) set it."""
    import torch
    from hydra.utils import instantiate

    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = instantiate(spec.optimizer)(params=[param])
    scheduler = instantiate(spec.scheduler)(optimizer, max_epochs=spec.max_epochs) if spec.scheduler else None
    out: dict[int, float] = {}
    for epoch in range(int(spec.max_epochs)):
        lr = float(optimizer.param_groups[0]["lr"])
        if not out or not math.isclose(lr, list(out.values())[-1], rel_tol=1e-12):
            out[epoch] = lr
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
    return out


def normalization(cfg: dict[str, Any]) -> dict[str, list[float]]:
    """The data's normalization as the data set applies it: ``data.mean`` / ``data.std``, else its own."""
    from kdlab.data import DATASETS
    from kdlab.data.imagefolder import IMAGENET_MEAN, IMAGENET_STD

    data = cfg.get("data") or {}
    if data.get("mean") is not None:
        return {"mean": list(data["mean"]), "std": list(data["std"])}
    cls = DATASETS.get(str(data.get("name")))
    mean, std = tuple(getattr(cls, "default_mean", ())), tuple(getattr(cls, "default_std", ()))
    if not mean and data.get("name") == "imagefolder":
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    if not mean:  # computed from the data when it loads (synthetic)
        return {"mean": "the data's own", "std": "the data's own"}
    return {"mean": [float(m) for m in mean], "std": [float(s) for s in std]}


def _path(node: Any, parts: list[str]) -> Any:
    for part in parts:
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return MISSING
    return node


def resolve(cfg: dict[str, Any], specs: list[Any], key: str) -> Any:
    """The run's value of a card field (MISSING where the field names nothing)."""
    parts = key.split(".")
    if parts[0] == "stages":
        spec = next((s for s in specs if len(parts) > 2 and s.name == parts[1]), None)
        if spec is None or parts[2] not in STAGE_KEYS:
            return MISSING
        name, rest = parts[2], parts[3:]
        if name == "keep":
            value = None if protocol.is_imported(spec) else protocol.stage_keep(cfg, spec)
        elif name == "lr_schedule":
            value = lr_schedule(spec)
        else:
            value = getattr(spec, name)
        return _path(value, rest) if rest else value
    if key in DERIVED:
        return normalization(cfg)[parts[1]]
    return _path(cfg, parts)


def same(a: Any, b: Any) -> bool:
    """Card value == run value: numbers to rounding (240 == 240.0), mappings with keys compared as text."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b or (isinstance(a, bool) and isinstance(b, bool) and a == b)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        a2, b2 = {str(k): v for k, v in a.items()}, {str(k): v for k, v in b.items()}
        return a2.keys() == b2.keys() and all(same(a2[k], b2[k]) for k in a2)
    return a == b


@dataclass
class FieldCheck:
    field: str
    expected: Any  # what kdlab's reference run resolves to: the card's value, or its kdlab value (a known deviation)
    actual: Any
    reference: Any  # the reference code's value
    source: str
    reason: str | None  # a known deviation's reason

    @property
    def ok(self) -> bool:
        return same(self.expected, self.actual)


def check_card(card: dict[str, Any], cfg: dict[str, Any], specs: list[Any]) -> list[FieldCheck]:
    """Every field of the card (for the run's pair) against the run; a field that names nothing is a ConfigError."""
    where = card_name(config_tree.card_path(card["recipe"]))
    out = []
    for key, entry in card_fields(card, cfg.get("pair")).items():
        actual = resolve(cfg, specs, key)
        if actual is MISSING:
            stages = ", ".join(s.name for s in specs)
            raise ConfigError(f"{where}: field {key!r} names no config key; a field is a config path (data.batch_size),"
                              f" stages.<stage>.<{'|'.join(STAGE_KEYS)}>[.key] (stages: {stages}) or "
                              f"{' / '.join(DERIVED)}")
        out.append(FieldCheck(key, entry.get("kdlab", entry["value"]), actual, entry["value"], str(entry["source"]),
                              entry.get("reason")))
    return out


def reference_report(cfg: dict[str, Any], specs: list[Any]) -> dict[str, Any] | None:
    """Under protocol=reference: the recipe's card held against the run (results.json ``reference``); None under
    the held-out protocol. A recipe without a card is a ConfigError (there is nothing to be faithful to)."""
    if protocol.protocol_name(cfg) != "reference":
        return None
    recipe = str(cfg.get("experiment_name") or "default")
    if not has_card(recipe):
        raise ConfigError(f"protocol=reference runs a paper recipe as its reference code did, but experiment "
                          f"{recipe!r} has no reference card ({card_name(config_tree.card_path(recipe))}); recipes "
                          f"with one: {', '.join(recipes_with_cards())}; the whole training split without a card: "
                          f"data.val_split=0 protocol.keep=last")
    card = load_card(recipe)
    checks = check_card(card, cfg, specs)
    changed = [c for c in checks if not c.ok]
    return {"card": card_name(config_tree.card_path(recipe)), "reference": card["reference"],
            "pair": cfg.get("pair") if card.get("pairs") else None,
            "fields": len(checks), "as_card": len(checks) - len(changed),
            "known_deviations": sorted(c.field for c in checks if c.reason and c.ok),
            "changed": [{"field": c.field, "card": c.expected, "run": c.actual} for c in changed],
            "reported": card["reported"]["value"]}


def summary_line(report: dict[str, Any]) -> str:
    """The one line a reference run starts with."""
    known = report["known_deviations"]
    line = (f"reference run of {report['card']} ({report['reference']}"
            + (f"; pair {report['pair']}" if report.get("pair") else "") + f"): {report['as_card']} of "
            f"{report['fields']} fields as the card" + (f", {len(known)} known deviation(s) (docs/experiments.md)"
                                                        if known else "")
            + (f"; the reference's number is {report['reported']}" if report["reported"] else ""))
    if report["changed"]:
        line += "; you changed: " + ", ".join(f"{c['field']} (card {_short(c['card'])}, run {_short(c['run'])})"
                                              for c in report["changed"])
    return line


def _short(v: Any) -> str:
    text = str(v)
    return text if len(text) <= 40 else text[:37] + "..."
