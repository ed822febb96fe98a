"""Where an imported stage's weights come from (``model.pretrained``): a library's default weights or a local file,
for a zoo model with RepDistiller's / mdistiller's parameter names mapped to kdlab's (the released teachers).

Above :mod:`kdlab.models.library` (the library models and their weights) and :mod:`kdlab.models.released` (the
released teachers' names), so that neither needs the other."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from kdlab.errors import ConfigError
from kdlab.models.library import _library_weights, is_library_arch, read_weights_file, split_arch
from kdlab.models.released import to_zoo_keys


def pretrained_state(arch: str, pretrained: Any, in_channels: int) -> tuple[dict[str, torch.Tensor], str, str]:
    """(state_dict, sha256, where from) of ``model.pretrained``: ``true`` the library's default weights (a
    download on first use, then the library's cache; sha256 of the state_dict), a path a local weights
    file (sha256 of the file; for a zoo model its names mapped by :func:`kdlab.models.released.to_zoo_keys`)."""
    if pretrained is True:
        if not is_library_arch(arch):
            raise ConfigError(f"model.pretrained=true needs a library model (timm/<name>, torchvision/<name>); "
                              f"{arch!r} is a kdlab zoo model: give a weights file instead")
        state, sha = _library_weights(arch, in_channels)
        return state, sha, f"{split_arch(arch)[0]} weights"  # type: ignore[index]
    from kdlab.store.fileio import sha256_file

    path = Path(str(pretrained)).expanduser()
    state = read_weights_file(path)
    if not is_library_arch(arch):  # a zoo model: RepDistiller's / mdistiller's names (the released teachers) too
        state = to_zoo_keys(arch, state)
    return state, sha256_file(path), str(path)


def pretrained_sha256(arch: str, pretrained: Any, in_channels: int) -> str:
    """The hash a pretrained stage's store key holds (:func:`pretrained_state`), without keeping the weights."""
    if pretrained is True:
        return _library_weights(arch, in_channels)[1]
    from kdlab.store.fileio import sha256_file

    path = Path(str(pretrained)).expanduser()
    if not path.is_file():
        raise ConfigError(f"model.pretrained {str(path)!r} does not exist or is not a file")
    return sha256_file(path)
