"""Evaluation runner: protocols from real sample data, variant extraction equal to the other paths, cache."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lookalike.errors import ConfigError
from lookalike.evaluate import protocols
from lookalike.evaluate.extraction import POOLINGS, extract_variants, multiscale_power
from lookalike.evaluate.run import Variant, all_variants, evaluate, variant_vectors
from lookalike.extract import MULTI_SCALES, DescriptorSettings, Extractor
from lookalike.images import load_image
from lookalike.network import build_descriptor_net
from lookalike.pooling import build_pooling
from lookalike.registry import get_model_config
from tests.conftest import SAMPLE, SHARED_DATA, json_lines, require_weights, run_cli, succeeded
from tests.test_cli import TERMINAL

UKBENCH = SHARED_DATA / "ukbench-sample"
HOLIDAYS = SHARED_DATA / "holidays-sample"


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("LOOKALIKE_HOME", str(tmp_path / "home"))
    real = Path.home() / ".cache" / "lookalike" / "weights"
    (tmp_path / "home").mkdir()
    if real.exists():
        (tmp_path / "home" / "weights").symlink_to(real)


@pytest.fixture(scope="module")
def extractor() -> Extractor:
    require_weights("resnet50.keras-imagenet")
    return Extractor(DescriptorSettings(pooling="gem", imsize=160, scales=MULTI_SCALES, precision="fp32"))


def test_ukbench_protocol_groups_and_excludes_the_query() -> None:
    if not UKBENCH.exists():
        pytest.skip("shared ukbench sample missing")
    evalset = protocols.ukbench(UKBENCH)
    assert len(evalset.images) == 10 and evalset.query_count == 10
    assert list(evalset.gnd[0]["ok"]) == [1, 2, 3] and list(evalset.gnd[0]["junk"]) == [0]
    assert list(evalset.gnd[9]["ok"]) == [8]


def test_caltech_heldout_split_keeps_whitening_data_disjoint(tmp_path) -> None:
    for label, count in (("a", 3), ("b", 3), ("c", 2), ("d", 2), ("BACKGROUND_Google", 2)):
        (tmp_path / label).mkdir()
        for i in range(count):
            Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(tmp_path / label / f"{i}.jpg")
    evalset = protocols.caltech101(tmp_path, split="heldout")
    train_classes = set(evalset.train_labels)
    test_labels = {p.parent.name for p in evalset.images}
    assert train_classes and not train_classes & test_labels
    assert "BACKGROUND_Google" in test_labels
    query_labels = {evalset.images[q].parent.name for q in evalset.query_ids}
    assert "BACKGROUND_Google" not in query_labels
    for q, truth in zip(evalset.query_ids, evalset.gnd, strict=True):
        assert q not in truth["ok"] and list(truth["junk"]) == [q]
        assert all(evalset.images[i].parent.name == evalset.images[q].parent.name for i in truth["ok"])
    everything = protocols.caltech101(tmp_path, split="all")
    assert everything.query_count == 10 and not everything.train


@pytest.mark.weights
def test_variant_extraction_equals_the_extractor_and_the_eager_network(extractor, real_photos) -> None:
    paths = real_photos[:3]
    variants = extract_variants(extractor, paths, use_cache=False)
    config = get_model_config("resnet50.keras-imagenet")
    eager = build_descriptor_net(config, "gem")
    for index, path in enumerate(paths):
        image = load_image(path)
        scale_one = extractor.describe_tensors(extractor.scaled_inputs(image)[0][None])[0]
        np.testing.assert_allclose(variants.single("gem")[index], scale_one, atol=1e-4)
        power = multiscale_power("gem", extractor)
        np.testing.assert_allclose(
            variants.multi("gem", power)[index : index + 1][0], extractor.describe(image), atol=1e-4
        )
        scaled = extractor.scaled_inputs(image)[0][None]
        with torch.no_grad():
            fmap = eager.features(scaled)
            for name in POOLINGS:
                pool = eager.pool if name == "gem" else build_pooling(name)
                reference = torch.nn.functional.normalize(pool(fmap), dim=-1)[0].numpy()
                np.testing.assert_allclose(variants.single(name)[index], reference, atol=1e-4)
    assert set(variants.pooling_seconds) == set(POOLINGS)


@pytest.mark.weights
def test_multiscale_gem_on_an_rmac_model_is_what_indexing_with_pooling_gem_gives(real_photos) -> None:
    """Issue 12: evaluation combined GeM's scales with power 1 (the R-MAC default's rule), indexing with p."""
    require_weights("resnet50.keras-imagenet")
    settings = DescriptorSettings(imsize=160, scales=MULTI_SCALES, precision="fp32")
    evaluation = Extractor(settings)  # the model's own pooling, as evaluate() builds it
    assert evaluation.settings.pooling == "rmac"
    indexing = Extractor(replace(settings, pooling="gem"))  # `index --pooling gem --scales ms`
    assert multiscale_power("gem", evaluation) == indexing.scale_power == 3.0
    assert multiscale_power("rmac", evaluation) == multiscale_power("mac", indexing) == 1.0
    paths = real_photos[:3]
    extracted = extract_variants(evaluation, paths, use_cache=False)
    multi = variant_vectors(extracted, Variant("gem", multiscale=True), evaluation)
    for index, path in enumerate(paths):
        np.testing.assert_allclose(multi[index], indexing.describe(load_image(path)), atol=1e-4)


@pytest.mark.weights
def test_evaluate_on_real_samples_and_cache_reuse(monkeypatch) -> None:
    require_weights("resnet50.keras-imagenet")
    if not UKBENCH.exists():
        pytest.skip("shared ukbench sample missing")
    evalset = protocols.ukbench(UKBENCH)
    variants = all_variants(("none",))
    results = evaluate(evalset, "resnet50.keras-imagenet", variants, imsize=256, precision="fp32")
    assert [r.variant for r in results] == variants
    best = max(r.map for r in results)
    assert best > 0.9
    gem = next(r for r in results if r.variant == Variant("gem", False, "none"))
    assert gem.ukbench_ns is not None and gem.ukbench_ns > 3.0 and gem.extract_ms_per_image > 0

    import lookalike.evaluate.extraction as extraction

    def no_decoding(*args, **kwargs):
        raise AssertionError("cached descriptors were extracted again")

    monkeypatch.setattr(extraction, "load_image", no_decoding)
    again = evaluate(evalset, "resnet50.keras-imagenet", variants, imsize=256, precision="fp32")
    assert [r.map for r in again] == [r.map for r in results]
    monkeypatch.undo()

    single = all_variants(("none",), multiscale=False)
    assert [v.pooling for v in single] == ["mac", "spoc", "rmac", "gem"]
    assert not any(v.multiscale for v in single)
    alone = evaluate(evalset, "resnet50.keras-imagenet", single, 256, "fp32", scales=(1.0,))
    by_variant = {r.variant: r.map for r in results}
    assert [r.map for r in alone] == pytest.approx([by_variant[v] for v in single], abs=1e-6)

    reranked = [Variant("rmac", False, "none", r) for r in ("aqe", "dba", "dba,aqe")]
    for result in evaluate(evalset, "resnet50.keras-imagenet", reranked, 256, "fp32"):
        assert result.variant.label.startswith("rmac/ss/none/")
        assert result.map > 0.9  # expanding with true neighbours keeps the groups on top
    with pytest.raises(ConfigError, match="rerank"):
        Variant("rmac", False, "none", "magic")


@pytest.mark.weights
def test_evaluate_retrieval_from_the_command_line(tmp_path) -> None:
    """One JSON line per variant when piped (and in --out), a table in a terminal."""
    require_weights("resnet50.keras-imagenet")
    if not UKBENCH.exists():
        pytest.skip("shared ukbench sample missing")
    out = tmp_path / "ukbench.json"
    args = ("evaluate", "retrieval", "ukbench", "--data", str(UKBENCH), "--pooling", "gem")
    args += ("--scales", "single", "--scales", "ms", "--imsize", "128", "--precision", "fp32")
    rows = json_lines(succeeded(run_cli(*args, "-o", str(out))).stdout)
    assert [r["variant"] for r in rows] == ["gem/ss/none", "gem/ms/none"]
    assert rows == json.loads(out.read_text())
    assert all(r["protocol"] == "ukbench" and r["ukbench_ns"] > 3.0 for r in rows)
    table = succeeded(run_cli(*args, env=TERMINAL)).stdout  # the descriptors are cached now
    assert "gem/ms/none" in table and "N-S" in table and "{" not in table


@pytest.mark.weights
def test_holidays_sample_and_whitening_needs_disjoint_training_data(tmp_path) -> None:
    require_weights("resnet50.keras-imagenet")
    if not HOLIDAYS.exists():
        pytest.skip("shared holidays sample missing")
    evalset = protocols.holidays(HOLIDAYS)
    assert evalset.query_count == 1
    (result,) = evaluate(evalset, "resnet50.keras-imagenet", [Variant()], imsize=256, precision="fp32")
    assert result.map == pytest.approx(1.0)
    from lookalike.errors import ConfigError

    with pytest.raises(ConfigError, match="disjoint"):
        evaluate(evalset, "resnet50.keras-imagenet", [Variant(whitening="pca")], imsize=256, precision="fp32")


@pytest.mark.weights
def test_caltech_style_protocol_with_whitening_runs_end_to_end(tmp_path) -> None:
    require_weights("resnet50.keras-imagenet")
    photos = sorted(SAMPLE.glob("*.jpg"))
    for label, members in (("cat", [0, 1]), ("coffee", [2, 3]), ("moto", [4, 5]), ("space", [6, 7])):
        (tmp_path / label).mkdir()
        for m in members:
            image = Image.open(photos[m])
            image.save(tmp_path / label / f"{m}.jpg")
            image.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(tmp_path / label / f"{m}-flip.jpg")
    (tmp_path / "BACKGROUND_Google").mkdir()
    shutil.copy(photos[8], tmp_path / "BACKGROUND_Google" / "x.jpg")
    evalset = protocols.caltech101(tmp_path)
    variants = [Variant("gem", False, w) for w in ("none", "pca", "learned")]
    results = evaluate(evalset, "resnet50.keras-imagenet", variants, imsize=128, precision="fp32")
    assert all(0 <= r.map <= 1 for r in results)
    assert len({round(r.map, 6) for r in results}) >= 1


def test_cache_fingerprint_names_files_by_their_resolved_path(tmp_path, monkeypatch) -> None:
    from lookalike.evaluate.extraction import fingerprint

    photo = tmp_path / "a.jpg"
    photo.write_bytes(b"x")
    monkeypatch.chdir(tmp_path)
    assert fingerprint([Path("a.jpg")], None) == fingerprint([photo], None)
    assert fingerprint([Path("a.jpg")], None) != fingerprint([photo], [(0, 0, 1, 1)])


@pytest.mark.weights
def test_every_pooling_from_one_pass_equals_indexing_with_each_pooling(real_photos) -> None:
    """One extraction path: evaluation's multi-pooling forward is the product's network, pooling by pooling."""
    require_weights("resnet50.keras-imagenet")
    settings = DescriptorSettings(imsize=128, precision="fp32")
    shared = Extractor(settings)
    batch = shared.scaled_inputs(load_image(real_photos[0]))[0][None]
    pooled = shared.describe_poolings(batch, shared.pooling_modules(POOLINGS))
    assert set(pooled) == set(POOLINGS)
    for name in POOLINGS:
        alone = Extractor(replace(settings, pooling=name))
        assert shared.resolved_as(name).identity() == alone.resolved.identity()
        np.testing.assert_allclose(pooled[name], alone.describe_tensors(batch), atol=1e-5)
