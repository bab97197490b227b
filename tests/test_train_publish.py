"""Trained models as local registry entries: published, listed, loaded through the sha256-checked weights
path, republished, refused when damaged or shadowing; the crash-safe pair writing behind them."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from lookalike import backbones, registry
from lookalike.errors import ChecksumError, ConfigError, LocalModelError, UnknownModelError
from lookalike.network import build_descriptor_net
from lookalike.pooling import gem_power
from lookalike.registry import (
    UNIT_RGB_PREPROCESS,
    ModelConfig,
    check_local_name,
    get_model_config,
    list_models,
)
from lookalike.train.checkpoint import commit_pair, pending_name, settle_pair
from lookalike.train.publish import WEIGHTS_FILE, publish_model, published_epoch
from lookalike.train.settings import TrainSettings
from lookalike.weights import cache_path, load_weights
from tests.test_train_loop import TinyBackbone, randomised_statistics, tiny_net

BASE = ModelConfig("tiny.base", "tiny", "lookalike", UNIT_RGB_PREPROCESS, 16, "MIT (tiny test weights)", (),
                   "a tiny test network", has_classifier=False, pooling="gem")  # fmt: skip


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LOOKALIKE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("LOOKALIKE_OFFLINE", raising=False)
    monkeypatch.setitem(backbones.ARCHITECTURES, "tiny", TinyBackbone)
    return tmp_path / "home"


def published(
    home: Path, name: str = "mine", epoch: int = 1, **parts: bool
) -> tuple[ModelConfig, torch.nn.Module]:
    net = tiny_net(**parts).eval()
    if parts.get("soa"):
        randomised_statistics(net.features)
    settings = TrainSettings(data="/data/objects", backbone=BASE.name, soa=parts.get("soa", False))
    return publish_model(home / "models" / name, net, BASE, settings, epoch), net


def images() -> torch.Tensor:
    return torch.rand(3, 3, 24, 32, generator=torch.Generator().manual_seed(0))


def test_a_published_model_is_a_registry_entry_that_loads_like_the_trained_net(home: Path) -> None:
    config, net = published(home, soa=True, whiten=True)
    assert get_model_config("mine") == config
    assert (config.arch, config.pooling, config.attention, config.learned_whitening) == (
        "tiny",
        "gem",
        True,
        True,
    )
    assert config.licence == BASE.licence and config.preprocess == BASE.preprocess
    assert config.description == "fine-tuned from tiny.base with ap (+SOA) on /data/objects, epoch 1"
    (source,) = config.sources
    assert source.locator == (home / "models" / "mine" / WEIGHTS_FILE).as_uri()
    assert "mine" in [c.name for c in list_models()]
    built = build_descriptor_net(config, "gem")
    with torch.no_grad():
        assert torch.equal(built(images()), net(images()))
    assert cache_path(config).exists() and published_epoch(home / "models" / "mine") == 1


def test_gem_p_is_published_as_training_uses_it() -> None:
    net = tiny_net().eval()
    with torch.no_grad():
        net.pool.p.fill_(0.4)  # below LearnableGeM's floor of 1: training pools with p = 1
    config = publish_model(Path(registry.models_folder()) / "low", net, BASE, TrainSettings(data="d"), 1)
    assert config.gem_p == 1.0
    with torch.no_grad():
        assert torch.equal(build_descriptor_net(config, "gem")(images()), net(images()))


def test_republishing_replaces_the_cached_copy_of_an_earlier_epoch(home: Path) -> None:
    config, _ = published(home)
    build_descriptor_net(config, "gem")
    first_copy = cache_path(config).read_bytes()
    net = tiny_net().eval()
    with torch.no_grad():
        net.pool.p.fill_(2.0)
    second = publish_model(home / "models" / "mine", net, BASE, TrainSettings(data="d"), 2)
    assert second.sources[0].sha256 != config.sources[0].sha256 and not cache_path(second).exists()
    assert gem_power(build_descriptor_net(second, "gem").pool) == 2.0
    cache_path(second).write_bytes(first_copy)  # an earlier epoch's copy left behind: converted again
    assert float(load_weights(second)["pool.p"]) == 2.0


def test_tampered_weights_are_refused_by_their_sha256(home: Path) -> None:
    config, _ = published(home)
    weights = home / "models" / "mine" / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match="does not match"):
        load_weights(get_model_config("mine"))
    assert not cache_path(config).exists()


def test_a_local_model_loads_offline(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config, _ = published(home)
    monkeypatch.setenv("LOOKALIKE_OFFLINE", "1")
    assert set(load_weights(config)) >= {"pool.p", "stem.0.weight"}


def test_a_damaged_local_entry_is_reported_not_a_crash(home: Path, caplog) -> None:
    published(home)
    for name, text in (("garbled", "{not json"), ("other", json.dumps({"format": "something else"}))):
        (home / "models" / name).mkdir(parents=True)
        (home / "models" / name / "model.json").write_text(text)
    record = json.loads((home / "models" / "mine" / "model.json").read_text())
    for name, change in (("typed", {"feature_dim": "16", "name": "typed"}), ("moved", {"name": "elsewhere"})):
        shutil.copytree(home / "models" / "mine", home / "models" / name)
        (home / "models" / name / "model.json").write_text(json.dumps({**record, **change}))
    with caplog.at_level(logging.WARNING, logger="lookalike.registry"):
        names = [c.name for c in list_models()]
    assert "mine" in names and not {"garbled", "other", "typed", "moved"} & set(names)
    assert "garbled left out" in caplog.text
    problems = dict((folder.name, why) for folder, why in registry.local_models()[1])
    assert "unreadable" in problems["garbled"] and "not a lookalike model" in problems["other"]
    assert "'feature_dim' is missing or not an integer" in problems["typed"]
    assert "its folder is 'moved'" in problems["moved"]
    with pytest.raises(LocalModelError, match="unreadable"):
        get_model_config("garbled")
    (home / "models" / "mine" / WEIGHTS_FILE).unlink()
    with pytest.raises(LocalModelError, match="is missing"):
        get_model_config("mine")


def test_a_local_folder_cannot_shadow_a_built_in_model(home: Path) -> None:
    published(home)
    record = json.loads((home / "models" / "mine" / "model.json").read_text())
    shadow = home / "models" / "resnet50.keras-imagenet"
    shutil.copytree(home / "models" / "mine", shadow)
    (shadow / "model.json").write_text(json.dumps({**record, "name": shadow.name}))
    assert get_model_config(shadow.name) is registry.MODELS[shadow.name]
    assert [c for c in list_models() if c.name == shadow.name] == [registry.MODELS[shadow.name]]
    assert "shadow the built-in" in dict(registry.local_models()[1])[shadow]


def test_local_names_are_folder_names_and_no_built_in_one() -> None:
    assert check_local_name("my-model_2.v1") == "my-model_2.v1"
    for bad in ("", ".hidden", "a/b", "../up", "x" * 101, "sp ace"):
        with pytest.raises(ConfigError, match="a model name is"):
            check_local_name(bad)
    with pytest.raises(ConfigError, match="built-in"):
        check_local_name("efficientnet-lite0.imagenet")


def test_an_unknown_name_lists_the_local_models_too(home: Path) -> None:
    published(home)
    with pytest.raises(UnknownModelError, match="mine"):
        get_model_config("nothing-like-it")


def pair(folder: Path, value: float) -> str:
    tensors = {"x": torch.full((3,), value)}
    return commit_pair(
        folder, "t.safetensors", "t.json", tensors, {}, lambda sha: {"sha256": sha, "v": value}
    )


def test_a_pair_survives_a_crash_before_its_commit_point(tmp_path: Path) -> None:
    sha = pair(tmp_path, 1.0)
    (tmp_path / pending_name("t.safetensors")).write_bytes(b"half-written tensors of the next epoch")
    assert settle_pair(tmp_path, "t.safetensors", sha) == tmp_path / "t.safetensors"
    assert not (tmp_path / pending_name("t.safetensors")).exists()


def test_a_pair_survives_a_crash_after_its_commit_point(tmp_path: Path) -> None:
    pair(tmp_path, 1.0)
    old = (tmp_path / "t.safetensors").read_bytes()
    sha = pair(tmp_path, 2.0)
    new = (tmp_path / "t.safetensors").read_bytes()
    (tmp_path / pending_name("t.safetensors")).write_bytes(new)  # the JSON names it; the rename never came
    (tmp_path / "t.safetensors").write_bytes(old)
    assert json.loads((tmp_path / "t.json").read_text())["sha256"] == sha
    settle_pair(tmp_path, "t.safetensors", sha)
    assert (tmp_path / "t.safetensors").read_bytes() == new
    assert np.array_equal(np.frombuffer(new[-12:], "<f4"), [2.0, 2.0, 2.0])
