"""The training loop on a tiny backbone: the loss falls, gradients reach every trainable part, checkpoints
round-trip bit-exactly, undecodable images are skipped, bf16 falls back to fp32 when the losses disagree."""

from __future__ import annotations

import io
import itertools
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from lookalike import backbones
from lookalike.attention import with_attention
from lookalike.backbones.base import Backbone
from lookalike.errors import CheckpointError, ConfigError, TrainingSetError, WeightsError
from lookalike.network import (
    DescriptorNet,
    InferenceNet,
    descriptor_net_from_state,
    descriptor_state,
    fold_batchnorm,
    load_descriptor_state,
)
from lookalike.registry import UNIT_RGB_PREPROCESS, ModelConfig
from lookalike.train import loop
from lookalike.train.checkpoint import load_checkpoint, save_checkpoint
from lookalike.train.describe import same_class_pairs
from lookalike.train.heads import LearnableGeM, WhiteningLayer
from lookalike.train.loop import Trainer, bf16_disagreement
from lookalike.train.settings import TrainSettings, build_loss
from lookalike.train.sources import AugmentedTuples, HardNegativeTuples, TupleSource, images_unlabelled
from lookalike.train.tuples import EpochSample, TrainingImages, images_from_folder
from lookalike.whitening import fit_pca_whitening


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny tensors gain nothing from threads, and lose much on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class TinyBackbone(Backbone):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.out_channels = 16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(self.stem(x))

    def stages(self) -> list[nn.Module]:
        return [self.stem, self.block]


def write_photo(path: Path, colour: int, rng: np.random.Generator, size: tuple[int, int] = (32, 24)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.zeros((size[1], size[0], 3))
    pixels[..., colour % 3] = 120 + 40 * (colour // 3)
    noise = rng.integers(0, 70, pixels.shape)
    Image.fromarray(np.clip(pixels + noise, 0, 255).astype(np.uint8)).save(path)
    return path


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    """4 classes of 3 small noisy photos, one class in landscape, one in portrait."""
    rng = np.random.default_rng(0)
    for c in range(4):
        for i in range(3):
            size = (24, 32) if c == 3 and i == 0 else (32, 24)
            write_photo(tmp_path / "data" / f"class{c}" / f"{i}.png", c, rng, size)
    return tmp_path / "data"


def settings_for(folder: Path, **changes: object) -> TrainSettings:
    base = {"data": str(folder), "loss": "triplet", "negatives": 2, "query_count": 8, "pool_size": 12,
            "imsize": 32, "lr": 1e-3, "batch_tuples": 3, "precision": "fp32"}  # fmt: skip
    return TrainSettings(**{**base, **changes})  # type: ignore[arg-type]


def tiny_net(soa: bool = False, whiten: bool = False, seed: int = 0) -> DescriptorNet:
    torch.manual_seed(seed)
    features: Backbone = with_attention(TinyBackbone()) if soa else TinyBackbone()
    layer = (
        WhiteningLayer(fit_pca_whitening(np.random.default_rng(seed).random((40, 16)), dim=8))
        if whiten
        else None
    )
    return DescriptorNet(features, LearnableGeM(3.0), layer)


def trainer_for(settings: TrainSettings, source: TupleSource | None = None, **net: bool) -> Trainer:
    images = images_from_folder(settings.data)
    source = source or HardNegativeTuples(images, settings.negatives)
    return Trainer(tiny_net(**net), build_loss(settings), source, UNIT_RGB_PREPROCESS, settings)


def fixed_batch(images: TrainingImages) -> np.ndarray:
    """One tuple per class: two of its images, then one image of each of two other classes."""
    rows = []
    for c in range(len(images.classes)):
        mine = np.flatnonzero(images.labels == c)
        others = [np.flatnonzero(images.labels == (c + k) % 4)[0] for k in (1, 2)]
        rows.append([mine[0], mine[1], *others])
    return np.array(rows)


def test_the_loss_decreases_on_a_fixed_batch(folder: Path) -> None:
    settings = settings_for(folder, loss="contrastive", lr=3e-3)
    trainer = trainer_for(settings)
    batch = fixed_batch(trainer.source.images)
    losses = [trainer.step(batch).loss for _ in range(6)]
    assert losses[-1] < 0.8 * losses[0]
    assert all(b < a for a, b in itertools.pairwise(losses))


def test_gradients_reach_gem_p_the_attention_block_and_the_whitening_layer(folder: Path) -> None:
    trainer = trainer_for(settings_for(folder, loss="contrastive"), soa=True, whiten=True)
    net, batch = trainer.net, fixed_batch(trainer.source.images)
    attention = net.features.attention  # type: ignore[union-attr]

    def reached(parameter: torch.Tensor) -> bool:
        return parameter.grad is not None and bool(parameter.grad.abs().sum() > 0)

    trainer.step(batch)
    assert reached(net.pool.p) and reached(net.whiten.weight) and reached(attention.v.weight)  # type: ignore[union-attr]
    assert not reached(attention.f[0].weight)  # V starts at zero: only V learns on the first step
    trainer.step(batch)
    assert all(reached(p) for p in (attention.f[0].weight, attention.g[0].weight, attention.h.weight))


def test_frozen_stages_get_no_gradient_and_no_optimiser_state(folder: Path) -> None:
    trainer = trainer_for(settings_for(folder, freeze=1))
    trainer.step(fixed_batch(trainer.source.images))
    stem, block = trainer.net.features.stem, trainer.net.features.block  # type: ignore[union-attr]
    assert all(p.grad is None and not p.requires_grad for p in stem.parameters())
    assert all(p.grad is not None for p in block.parameters())
    optimised = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert not optimised & {id(p) for p in stem.parameters()}
    with pytest.raises(ConfigError, match="cannot freeze 3 stages"):
        trainer_for(settings_for(folder, freeze=3))


def test_gem_p_learns_ten_times_faster_without_weight_decay(folder: Path) -> None:
    trainer = trainer_for(settings_for(folder, lr=1e-4, weight_decay=1e-5), whiten=True)
    groups = trainer.optimizer.param_groups
    assert [(g["lr"], g["weight_decay"]) for g in groups] == [(1e-4, 1e-5), (1e-3, 0.0), (1e-4, 1e-5)]
    assert groups[1]["params"] == [trainer.net.pool.p]


def test_an_epoch_reports_its_statistics_and_decays_the_rate(folder: Path) -> None:
    trainer = trainer_for(settings_for(folder, lr_decay=0.5))
    events: list[loop.TrainProgress] = []
    stats = trainer.run_epoch(events.append)
    assert stats.epoch == trainer.epoch == 1 and stats.tuples == 8 and stats.lr == 1e-3
    assert 0 < stats.positive_distance < 2 and 0 < stats.negative_distance <= 2 and 0 <= stats.active <= 1
    assert stats.train_images_per_second > 0 and stats.describe_images_per_second > 0
    assert [e.stage for e in events][:1] == ["describe"] and events[-1].stage == "train"
    assert events[-1].done == events[-1].total == 8 and events[-1].loss is not None
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * np.exp(-0.5))
    assert json.loads(json.dumps(trainer.history)) == [stats.record()]


def test_a_checkpoint_round_trips_bit_exactly_and_resumes_as_if_never_stopped(
    folder: Path, tmp_path: Path
) -> None:
    settings = settings_for(folder, soa=True)
    straight = trainer_for(settings, soa=True, whiten=True)
    for _ in range(2):
        straight.run_epoch()
    stopped = trainer_for(settings, soa=True, whiten=True)
    stopped.run_epoch()
    saved = stopped.state()
    save_checkpoint(tmp_path / "run", saved)
    loaded = load_checkpoint(tmp_path / "run")
    assert loaded is not None and loaded.tensors.keys() == saved.tensors.keys()
    assert all(torch.equal(loaded.tensors[k], saved.tensors[k]) for k in saved.tensors)
    assert all(loaded.tensors[k].dtype == saved.tensors[k].dtype for k in saved.tensors)
    assert loaded.record == json.loads(json.dumps(saved.record))
    resumed = trainer_for(settings, soa=True, whiten=True, seed=7)  # other initial weights: all restored
    resumed.restore(loaded)
    assert resumed.epoch == 1 and resumed.history == stopped.history
    resumed.run_epoch()
    final, expected = resumed.state(), straight.state()
    assert all(torch.equal(final.tensors[k], expected.tensors[k]) for k in expected.tensors)
    assert final.record["rng"] == expected.record["rng"]


def test_restoring_refuses_other_settings_but_not_more_epochs(folder: Path) -> None:
    trainer = trainer_for(settings_for(folder))
    trainer.run_epoch()
    state = trainer.state()
    more = trainer_for(settings_for(folder, epochs=20))
    more.restore(state)
    assert more.epoch == 1
    with pytest.raises(CheckpointError, match=r"loss: 'triplet' → 'contrastive'"):
        trainer_for(settings_for(folder, loss="contrastive")).restore(state)
    with pytest.raises(CheckpointError, match="does not fit"):
        trainer_for(settings_for(folder), soa=True).restore(state)


def test_a_damaged_checkpoint_is_a_clear_error(folder: Path, tmp_path: Path) -> None:
    trainer = trainer_for(settings_for(folder))
    save_checkpoint(tmp_path / "run", trainer.state())
    tensors = tmp_path / "run" / "checkpoint.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(CheckpointError, match="damaged"):
        load_checkpoint(tmp_path / "run")
    (tmp_path / "run" / "checkpoint.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable"):
        load_checkpoint(tmp_path / "run")
    assert load_checkpoint(tmp_path / "nothing") is None


def truncated_jpeg(path: Path) -> Path:
    """The first half of a JPEG: the header reads, the pixels do not decode."""
    buffer = io.BytesIO()
    pixels = np.random.default_rng(1).integers(0, 255, (96, 128, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, "JPEG")
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    return path


def test_an_image_that_fails_to_decode_mid_epoch_is_left_out_and_reported(folder: Path, caplog) -> None:
    broken = truncated_jpeg(folder / "class0" / "broken.jpg")  # its header reads: it passes the listing
    settings = settings_for(folder, query_count=13, pool_size=13)
    trainer = trainer_for(settings)
    assert broken in trainer.source.images.paths
    with caplog.at_level(logging.WARNING, logger="lookalike.train.loop"):
        first = trainer.run_epoch()
    assert [path for path, _ in first.skipped] == [str(broken)] and "truncated" in first.skipped[0][1]
    assert "left out of training" in caplog.text
    assert first.tuples == 12
    second = trainer.run_epoch()
    assert second.skipped == () and second.tuples == 12
    assert trainer.state().record["failed"] == [[str(broken), first.skipped[0][1]]]


def test_a_tuple_with_an_undecodable_image_is_skipped_not_fatal(folder: Path) -> None:
    trainer = trainer_for(settings_for(folder))
    images = trainer.source.images
    batch = fixed_batch(images)
    truncated_jpeg(Path(images.paths[batch[0, 1]]))
    failures: dict[int, str] = {}
    step = trainer.step(batch, failures=failures)
    assert step.tuples == 3 and list(failures) == [batch[0, 1]]


def test_bf16_falls_back_to_fp32_when_its_loss_disagrees(folder: Path, monkeypatch, caplog) -> None:
    monkeypatch.setattr(loop, "cpu_info", lambda: SimpleNamespace(has_bf16=True))
    real = loop.forward_descriptors

    def garbled(net: DescriptorNet, x: torch.Tensor, precision: str) -> torch.Tensor:
        out = real(net, x, "fp32")
        return out.flip(0) if precision == "bf16" else out

    monkeypatch.setattr(loop, "forward_descriptors", garbled)
    trainer = trainer_for(settings_for(folder, precision="auto"))
    assert trainer.precision is None
    with caplog.at_level(logging.WARNING, logger="lookalike.train.loop"):
        stats = trainer.run_epoch()
    assert trainer.precision == stats.precision == "fp32" and len(trainer.bf16_checks) == 1
    assert "differs from the fp32 loss" in trainer.precision_reason and "training in fp32" in caplog.text


def test_bf16_is_kept_when_its_loss_agrees_on_the_first_batches(folder: Path, monkeypatch) -> None:
    monkeypatch.setattr(loop, "cpu_info", lambda: SimpleNamespace(has_bf16=True))
    real = loop.forward_descriptors
    monkeypatch.setattr(loop, "forward_descriptors", lambda net, x, precision: real(net, x, "fp32"))
    trainer = trainer_for(settings_for(folder, precision="auto"))
    trainer.run_epoch()
    assert trainer.precision == "bf16" and len(trainer.bf16_checks) == loop.BF16_CHECK_BATCHES


def test_auto_precision_without_native_bf16_is_fp32_at_once(folder: Path, monkeypatch) -> None:
    monkeypatch.setattr(loop, "cpu_info", lambda: SimpleNamespace(has_bf16=False))
    trainer = trainer_for(settings_for(folder, precision="auto"))
    assert trainer.precision == "fp32" and "no native bf16" in trainer.precision_reason


def test_bf16_disagreement_is_relative_with_an_absolute_floor() -> None:
    assert bf16_disagreement(1.0, 1.04) is None
    assert "differs" in (bf16_disagreement(1.0, 1.06) or "")
    assert bf16_disagreement(0.0, 5e-4) is None and bf16_disagreement(0.0, 2e-3) is not None
    assert bf16_disagreement(1.0, float("nan")) is not None


def test_the_unlabelled_source_trains_on_augmented_copies(folder: Path) -> None:
    images = images_unlabelled(folder)
    assert len(images.classes) == len(images) == 12 and images.labels.tolist() == list(range(12))
    settings = settings_for(folder, unlabelled=True, negatives=3)
    source = AugmentedTuples(images, 3)
    trainer = trainer_for(settings, source=source)
    stats = trainer.run_epoch()
    assert stats.tuples == 8 and np.isfinite(stats.loss)
    photo = Image.open(images.paths[0]).convert("RGB")
    assert source.render(photo, 1, 5).tobytes() != photo.tobytes()
    assert source.render(photo, 1, 5).tobytes() == source.render(photo, 1, 5).tobytes()
    assert source.render(photo, 2, 5) is photo
    assert AugmentedTuples(images, 3, augment_query=False).render(photo, 0, 5) is photo


def test_unlabelled_tuples_pair_each_query_with_itself() -> None:
    images = TrainingImages(tuple(Path(f"{i}.jpg") for i in range(5)), np.arange(5), tuple("abcde"))
    desc = np.eye(5, 4, dtype=np.float32)
    desc[4] = desc[0]
    sample = EpochSample(np.array([0, 2]), np.arange(5))
    tuples = AugmentedTuples(images, 2).tuples(sample, desc[[0, 2]], desc, np.random.default_rng(0))
    assert tuples[:, 0].tolist() == tuples[:, 1].tolist() == [0, 2]
    assert tuples[0, 2] == 4  # photo 0's nearest other photo
    assert not (tuples[:, 2:] == tuples[:, :1]).any()


def test_too_few_classes_for_the_negatives_is_refused_before_training(folder: Path, tmp_path: Path) -> None:
    images = images_from_folder(folder)
    with pytest.raises(TrainingSetError, match="at least 5 classes"):
        HardNegativeTuples(images, 4)
    single = write_photo(tmp_path / "single" / "a.png", 0, np.random.default_rng(0)).parent
    with pytest.raises(TrainingSetError, match="at least 2 readable photos"):
        images_unlabelled(single)


def test_same_class_pairs_are_every_pair_of_a_class() -> None:
    labels = np.array([1, 0, 1, 2, 1, 0])
    naive = [(i, j) for i in range(6) for j in range(i + 1, 6) if labels[i] == labels[j]]
    pairs = same_class_pairs(labels, np.random.default_rng(0), limit=100)
    assert [tuple(p) for p in pairs.tolist()] == naive
    few = same_class_pairs(labels, np.random.default_rng(0), limit=2)
    assert len(few) == 2 and {tuple(p) for p in few.tolist()} <= set(naive)


def randomised_statistics(module: nn.Module) -> None:
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for bn in (m for m in module.modules() if isinstance(m, nn.BatchNorm2d)):
            bn.running_mean.copy_(torch.randn(bn.running_mean.shape, generator=g) * 0.1)
            bn.running_var.copy_(torch.rand(bn.running_var.shape, generator=g) + 0.5)
            bn.weight.copy_(torch.rand(bn.weight.shape, generator=g) + 0.5)
        for p in module.attention.v.parameters():  # type: ignore[union-attr]
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def test_batch_norm_folds_through_an_attention_block_without_changing_it() -> None:
    net = tiny_net(soa=True).eval()
    randomised_statistics(net.features)
    folded = fold_batchnorm(net.features)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in net.features.modules()) == 4  # the original intact
    x = torch.rand(2, 3, 24, 32)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), net.features(x), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(InferenceNet(net, "fp32")(x), net(x), rtol=1e-5, atol=1e-6)


def test_descriptor_state_round_trips_through_the_inference_builder(monkeypatch) -> None:
    monkeypatch.setitem(backbones.ARCHITECTURES, "tiny", TinyBackbone)
    net = tiny_net(soa=True, whiten=True).eval()
    randomised_statistics(net.features)
    with torch.no_grad():
        net.pool.p.fill_(2.5)
    state = descriptor_state(net)
    assert {"pool.p", "whiten.weight", "whiten.bias", "attention.v.weight", "stem.0.weight"} <= set(state)
    config = ModelConfig("tiny.test", "tiny", "lookalike", UNIT_RGB_PREPROCESS, 16, "MIT", (), "test",
                         has_classifier=False, pooling="gem", learned_whitening=True, attention=True)  # fmt: skip
    built = descriptor_net_from_state(config, state, "gem")
    x = torch.rand(3, 3, 24, 32)
    with torch.no_grad():
        assert torch.equal(built(x), net(x))
    copy = tiny_net(soa=True, whiten=True, seed=5)
    load_descriptor_state(copy, state)
    with torch.no_grad():
        assert torch.equal(copy.eval()(x), net(x))
    plain = {k: v for k, v in state.items() if not k.startswith("attention.")}
    with pytest.raises(WeightsError, match="has no attention"):
        descriptor_net_from_state(config, plain, "gem")
    with pytest.raises(WeightsError, match="has attention"):
        descriptor_net_from_state(ModelConfig(**{**config.__dict__, "attention": False}), state, "gem")


def test_a_name_being_trained_is_locked_against_a_second_run(
    folder: Path, tmp_path: Path, monkeypatch
) -> None:
    import fcntl

    from lookalike.train.run import LOCK_FILE, TrainingRun

    monkeypatch.setenv("LOOKALIKE_HOME", str(tmp_path / "home"))
    busy = tmp_path / "home" / "models" / "busy"
    busy.mkdir(parents=True)
    with open(busy / LOCK_FILE, "ab") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(CheckpointError, match="another `lookalike train` is training busy"):
            TrainingRun.open(settings_for(folder), "busy")
    with pytest.raises(TrainingSetError):
        TrainingRun.open(settings_for(folder / "class0"), "fresh")  # one class: refused before any epoch
    assert not (tmp_path / "home" / "models" / "fresh").exists()


@pytest.mark.parametrize("arch", ["resnet50", "efficientnet-lite0", "vgg16", "alexnet"])
def test_every_backbone_names_stages_that_cover_its_features_once(arch: str) -> None:
    backbone = backbones.build_backbone(arch)
    stages = backbone.stages()
    in_stages = [id(p) for stage in stages for p in stage.parameters()]
    features = [
        id(p) for name, p in backbone.named_parameters() if not name.startswith(("fc.", "classifier."))
    ]
    assert (
        len(stages) >= 3 and sorted(in_stages) == sorted(features) and len(set(in_stages)) == len(in_stages)
    )
