"""Turn each weights format we can obtain into a state dict of our own backbone modules.

A converter takes the path of what a source delivered (a file, or a folder for TF.js) and returns tensors
keyed by our module names. Files are read with ``torch.load(..., weights_only=True)`` or plain JSON and
raw float32 buffers: nothing is ever unpickled.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from lookalike.errors import WeightsError

StateDict = dict[str, torch.Tensor]

_BN_KERAS_TO_TORCH = {
    "gamma": "weight",
    "beta": "bias",
    "moving_mean": "running_mean",
    "moving_variance": "running_var",
}
_KERAS_BLOCK = re.compile(r"^(res|bn)(\d)([a-z])_branch(1|2[abc])/(\w+)$")


def read_tfjs_layers_model(folder: Path) -> dict[str, np.ndarray]:
    """All weights of a TF.js layers model (``model.json`` plus binary shards), by Keras weight name."""
    try:
        manifest = json.loads((folder / "model.json").read_text())
        groups = manifest["weightsManifest"]
    except (OSError, ValueError, KeyError) as exc:
        raise WeightsError(f"{folder}: not a TF.js layers model ({exc})") from exc
    weights: dict[str, np.ndarray] = {}
    for group in groups:
        buffer = b"".join((folder / shard).read_bytes() for shard in group["paths"])
        offset = 0
        for spec in group["weights"]:
            if spec.get("dtype", "float32") != "float32" or "quantization" in spec:
                raise WeightsError(f"{folder}: weight {spec['name']} is not plain float32")
            count = int(np.prod(spec["shape"], dtype=np.int64))
            end = offset + 4 * count
            if end > len(buffer):
                raise WeightsError(f"{folder}: shards end before weight {spec['name']}")
            array = np.frombuffer(buffer[offset:end], dtype="<f4").reshape(spec["shape"])
            weights[spec["name"]] = array.copy()
            offset = end
        if offset != len(buffer):
            raise WeightsError(f"{folder}: {len(buffer) - offset} unexpected bytes after the last weight")
    return weights


def _keras_conv(kernel: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1)))


def _keras_module_name(prefix: str, stage: str, block: str, branch: str) -> str:
    layer = f"layer{int(stage) - 1}.{ord(block) - ord('a')}"
    if branch == "1":
        return f"{layer}.downsample.{0 if prefix == 'res' else 1}"
    index = "abc".index(branch[1]) + 1
    return f"{layer}.{'conv' if prefix == 'res' else 'bn'}{index}"


def keras_resnet_state_dict(weights: dict[str, np.ndarray]) -> StateDict:
    """Map Keras ResNet names (``res2a_branch2a/kernel``, ``bn2a_branch1/gamma``...) onto our ResNet."""
    state: StateDict = {}
    for name, value in weights.items():
        layer, _, param = name.rpartition("/")
        if layer in ("conv1", "fc1000"):
            module = "conv1" if layer == "conv1" else "fc"
            if param == "kernel":
                tensor = _keras_conv(value) if value.ndim == 4 else torch.from_numpy(value.T.copy())
            else:
                tensor = torch.from_numpy(value)
            state[f"{module}.{'weight' if param == 'kernel' else 'bias'}"] = tensor
        elif layer == "bn_conv1":
            state[f"bn1.{_BN_KERAS_TO_TORCH[param]}"] = torch.from_numpy(value)
        elif match := _KERAS_BLOCK.match(name):
            prefix, stage, block, branch, param = match.groups()
            module = _keras_module_name(prefix, stage, block, branch)
            if prefix == "res":
                tensor = _keras_conv(value) if param == "kernel" else torch.from_numpy(value)
                state[f"{module}.{'weight' if param == 'kernel' else 'bias'}"] = tensor
            else:
                state[f"{module}.{_BN_KERAS_TO_TORCH[param]}"] = torch.from_numpy(value)
        else:
            raise WeightsError(f"unexpected Keras weight {name!r}")
    return state


def convert_keras_tfjs(path: Path) -> StateDict:
    return keras_resnet_state_dict(read_tfjs_layers_model(path))


def load_torch_file(path: Path) -> dict:
    """``torch.load`` restricted to tensors and plain containers (``weights_only=True``)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError... for bad files
        raise WeightsError(f"{path}: cannot be read as a weights-only torch file ({exc})") from exc


def convert_torchvision(path: Path) -> StateDict:
    state = load_torch_file(path)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path}: expected a plain state dict of tensors")
    return dict(state)


_CIRTORCH_RESNET_CHILDREN = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]


def cirtorch_state_dict(state: StateDict, arch: str) -> StateDict:
    """cirtorch keeps the backbone as ``features.<i>`` (children of the torchvision net); map back."""
    out: StateDict = {}
    for key, value in state.items():
        head, _, rest = key.partition(".")
        if head == "features" and arch.startswith("resnet"):
            index, _, tail = rest.partition(".")
            out[f"{_CIRTORCH_RESNET_CHILDREN[int(index)]}.{tail}"] = value
        else:
            out[key] = value
    return out


def _numpy_array_globals() -> list:
    """The numpy callables a pickled ndarray needs; allow-listed for ``weights_only`` loading only."""
    from numpy.core.multiarray import _reconstruct  # type: ignore[attr-defined]

    return [_reconstruct, np.ndarray, np.dtype, type(np.dtype("float32")), type(np.dtype("float64"))]


def cirtorch_whitening(meta: dict) -> StateDict:
    """Post-hoc learned whitening stored in ``meta['Lw'][dataset]['ss'|'ms'] = {'m': D×1, 'P': D×D}``."""
    state: StateDict = {}
    for learned in (meta.get("Lw") or {}).values():
        for scales, pair in learned.items():
            state[f"lw_{scales}.mean"] = torch.as_tensor(np.asarray(pair["m"], "f4").reshape(-1))
            state[f"lw_{scales}.projection"] = torch.as_tensor(np.asarray(pair["P"], "f4"))
        break
    return state


def convert_cirtorch(path: Path, arch: str) -> StateDict:
    with torch.serialization.safe_globals(_numpy_array_globals()):
        checkpoint = load_torch_file(path)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise WeightsError(f"{path}: not a cirtorch checkpoint (no 'state_dict')")
    meta = checkpoint.get("meta") or {}
    for key, expected in (("mean", [0.485, 0.456, 0.406]), ("std", [0.229, 0.224, 0.225])):
        if key in meta and not np.allclose(meta[key], expected, atol=1e-3):
            raise WeightsError(f"{path}: normalisation {key}={meta[key]} differs from the registry's")
    return {**cirtorch_state_dict(checkpoint["state_dict"], arch), **cirtorch_whitening(meta)}


def convert_efficientnet_lite0(path: Path) -> StateDict:
    from lookalike.backbones.efficientnet import convert_efficientnet_lite0 as convert

    return convert(convert_torchvision(path))


def convert_resmem(path: Path) -> StateDict:
    from lookalike.backbones.resmem import convert_resmem as convert

    return convert(load_torch_file(path))


def convert_xfeat(path: Path) -> StateDict:
    from lookalike.local.xfeat import convert_xfeat as convert

    return convert(convert_torchvision(path))


def convert_lookalike(path: Path) -> StateDict:
    """Weights published by ``lookalike train``: a safetensors file already keyed by our module names."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise WeightsError(f"{path}: not a readable safetensors file ({exc})") from exc


CONVERTERS: dict[str, Callable[[Path, str], StateDict]] = {
    "keras-tfjs": lambda path, arch: convert_keras_tfjs(path),
    "torchvision": lambda path, arch: convert_torchvision(path),
    "cirtorch": convert_cirtorch,
    "efficientnet-lite0": lambda path, arch: convert_efficientnet_lite0(path),
    "resmem": lambda path, arch: convert_resmem(path),
    "lookalike": lambda path, arch: convert_lookalike(path),
    "xfeat": lambda path, arch: convert_xfeat(path),
}


def convert(weights_format: str, path: Path, arch: str) -> StateDict:
    try:
        converter = CONVERTERS[weights_format]
    except KeyError:
        raise WeightsError(f"no converter for weights format {weights_format!r}") from None
    state, seen = {}, set()
    for key, value in converter(path, arch).items():
        value = (value.float() if value.is_floating_point() else value).contiguous()
        if value.data_ptr() in seen:
            value = value.clone()
        seen.add(value.data_ptr())
        state[key] = value
    return state
