"""Finding the stage that ``python -m kdlab.export`` exports: a run directory (its ``results.json`` names every
stage's store key), a stage directory of the store, or a store key; the stored stage verified (read-only store,
a damaged stage is an error), its model rebuilt from ``meta.json`` by the code that trains it and its weights
loaded; the run's data module rebuilt from its resolved config, for the check's test images."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdlab.errors import ConfigError, KdlabError, StoreError, warn

if TYPE_CHECKING:
    import torch
    from torch import nn


@dataclass
class Target:
    """A stored stage to export: its model (eval mode, float32, weights loaded) and where it came from."""

    model: nn.Module
    entry: dict[str, Any]
    description: dict[str, Any]
    key: str
    stage: str
    run_dir: Path | None = None
    results: dict[str, Any] | None = None
    data: Any = None  # the run's data module (None: a bare store key, or the data could not be loaded)
    notes: list[str] = field(default_factory=list)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        from kdlab.models.base import input_hw

        return (int(self.description["in_channels"]), *input_hw(self.description["input_size"]))

    @property
    def quantized_activations(self) -> bool:
        from kdlab.models.quant import quant_layers

        return any(m.act.bits is not None for _, m in quant_layers(self.model))


def default_store_dir() -> Path:
    """The config's ``paths.store_dir`` (conf/paths/default.yaml), relative to the working directory."""
    from omegaconf import OmegaConf

    from kdlab.cli.hydra_app import CONF_DIR

    paths = OmegaConf.load(Path(CONF_DIR) / "paths" / "default.yaml")
    return Path(str(OmegaConf.to_container(OmegaConf.create({"paths": paths}), resolve=True)["paths"]["store_dir"]))


def _open_store(root: Path) -> Any:
    from kdlab.store import StageStore

    return StageStore(root, on_corrupt="fail", writer=False)  # read-only; a damaged stage is an error


def _known_keys(root: Path, limit: int = 10) -> str:
    keys = sorted(p.name for p in root.glob("*") if (p / "DONE").is_file()) if root.is_dir() else []
    if not keys:
        return "none"
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def _record(key: str, roots: list[Path], what: str) -> Any:
    """The verified stored stage ``key`` from the first of ``roots`` that holds it."""
    for root in roots:
        record = _open_store(root).lookup(key, what)
        if record is not None:
            return record
    raise ConfigError(f"{what}: store key {key!r} is not in the store {str(roots[0])!r} (set --store)")


def _store_roots(row: dict[str, Any], run_dir: Path, store: Path | None) -> list[Path]:
    """Where a run's stage may be stored: --store, else the store of its checkpoint path (as written, then
    relative to the run directory's ancestors: a relative paths.store_dir is relative to where the run ran)."""
    if store is not None:
        return [store]
    ckpt = Path(str(row.get("checkpoint") or ""))
    roots = [ckpt.parent.parent] if ckpt.parts else []
    if ckpt.parts and not ckpt.is_absolute():
        roots += [anc / ckpt.parent.parent for anc in run_dir.resolve().parents]
    return [r for r in roots if (r / row["store_key"]).is_dir()] or roots[:1] or [default_store_dir()]


def run_data_config(results: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """(the run's ``data`` config without batch_size, its batch size) from results.json's resolved config."""
    data: dict[str, Any] = {}
    for k, v in (results.get("config") or {}).items():
        if k.startswith("data."):
            node, parts = data, k.split(".")[1:]
            for p in parts[:-1]:
                node = node.setdefault(p, {})
            node[parts[-1]] = v
    if "name" not in data:
        raise KdlabError("results.json has no data config (config.data.*); cannot rebuild the run's test images")
    return data, int(data.pop("batch_size", 64) or 64)


def load_run_data(results: dict[str, Any]) -> Any:
    from kdlab.data import build_datamodule

    data_cfg, batch_size = run_data_config(results)
    return build_datamodule(data_cfg, batch_size=batch_size, seed=int(results.get("seed") or 0))


def build_target(model_entry: dict[str, Any], description: dict[str, Any], state_dict: dict[str, torch.Tensor]
                 ) -> nn.Module:
    from kdlab.pipeline.assemble import model_from_entry

    model = model_from_entry(model_entry, int(description["num_classes"]), int(description["in_channels"]),
                             description["input_size"])
    model.load_state_dict(state_dict)
    return model.float().eval().requires_grad_(False)


def resolve(source: str, stage: str | None, store: Path | None, with_data: bool = True) -> Target:
    """The stage that ``source`` (a run directory, a stage directory of the store, or a store key) names."""
    from kdlab.models.base import input_hw

    path = Path(source)
    run_dir, results = None, None
    if path.is_dir() and (path / "results.json").is_file():
        run_dir = path
        try:
            results = json.loads((path / "results.json").read_text())
            rows = list(results["stages"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"cannot read {str(path / 'results.json')!r}: {e}") from e
        if not rows:
            raise ConfigError(f"run {str(path)!r} has no finished stage (status {results.get('status')!r})")
        names = [r["name"] for r in rows]
        name = stage if stage is not None else names[-1]
        if name not in names:
            raise ConfigError(f"unknown --stage {name!r}; stages of run {str(path)!r}: {', '.join(names)}")
        row = rows[names.index(name)]
        record = _record(str(row["store_key"]), _store_roots(row, path, store), f"stage {name}")
    elif path.is_dir() and (path / "meta.json").is_file():  # a stage directory of the store: <store>/<key>
        if stage is not None:
            raise ConfigError(f"--stage selects a stage of a run directory; {source!r} is one stored stage")
        record = _record(path.name, [path.parent], f"stage directory {source!r}")
        name = str(record.meta.get("name") or record.key)
    elif path.is_dir():
        raise ConfigError(f"{source!r} is a directory without results.json: not a run directory (nor a stored "
                          f"stage with meta.json)")
    else:
        root = store if store is not None else default_store_dir()
        if stage is not None:
            raise ConfigError(f"--stage selects a stage of a run directory; {source!r} is not one")
        if "/" in source or source in ("", ".", ".."):
            raise ConfigError(f"run directory {source!r} does not exist (a run directory holds results.json)")
        if not (root / source / "DONE").is_file():
            raise ConfigError(f"{source!r} is neither a run directory (with results.json) nor a key in the "
                              f"store {str(root)!r}; known keys: {_known_keys(root)}")
        record = _record(source, [root], f"store key {source!r}")
        name = str(record.meta.get("name") or record.key)
    meta = record.meta
    try:
        entry, desc = dict(meta["model"]), dict(meta["description"])
        model = build_target(entry, desc, record.state_dict())
    except (KeyError, TypeError) as e:
        raise StoreError(f"stage {name} ({record.key}): meta.json lacks the model spec ({e})") from e
    except RuntimeError as e:  # load_state_dict: the weights do not fit the model
        raise StoreError(f"stage {name} ({record.key}): its weights do not fit its model: "
                         f"{str(e).splitlines()[0]}") from e
    target = Target(model=model, entry=entry, description=desc, key=record.key, stage=name, run_dir=run_dir,
                    results=results)
    if results is not None and with_data:
        try:
            dm = load_run_data(results)
        except KdlabError as e:
            target.notes.append(f"the run's data cannot be loaded: {e}")
            warn(f"the run's data cannot be loaded ({e}); the check uses random inputs")
        else:
            shape = (int(dm.in_channels), *input_hw(dm.image_size))
            if shape != target.input_shape or int(dm.num_classes) != int(desc["num_classes"]):
                raise KdlabError(f"the run's data ({dm.num_classes} classes, {shape}) does not match stage {name} "
                                 f"({desc['num_classes']} classes, {target.input_shape})")
            target.data = dm
    return target
