"""Training sets, epoch sampling, hard-negative mining and positives, against naive loops."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lookalike.errors import ConfigError, DatasetError, TrainingSetError
from lookalike.train.tuples import (
    EpochSample,
    build_tuples,
    choose_positives,
    images_from_csv,
    images_from_folder,
    mine_hard_negatives,
    sample_epoch,
    sample_pool,
    tuple_targets,
)


def write_image(path: Path, colour: tuple[int, int, int] = (200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 12), colour).save(path)
    return path


def unit_rows(n: int, d: int, rng: np.random.Generator) -> np.ndarray:
    x = rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


# ---- training sets ---------------------------------------------------------------------------------------


def test_folder_classes_are_sub_folders_and_unreadable_files_are_skipped(tmp_path, caplog):
    write_image(tmp_path / "cats" / "a.jpg")
    write_image(tmp_path / "cats" / "deeper" / "b.png")
    write_image(tmp_path / "dogs" / "c.jpg")
    write_image(tmp_path / "dogs" / "d.jpg")
    (tmp_path / "dogs" / "broken.jpg").write_bytes(b"not an image at all")
    write_image(tmp_path / "loose.jpg")
    with caplog.at_level(logging.WARNING, logger="lookalike.train.tuples"):
        images = images_from_folder(tmp_path)
    assert images.classes == ("cats", "dogs")
    assert [p.name for p in images.paths] == ["a.jpg", "b.png", "c.jpg", "d.jpg"]
    assert images.labels.tolist() == [0, 0, 1, 1]
    assert {p.name for p, _ in images.skipped} == {"broken.jpg", "loose.jpg"}
    assert "2 files skipped" in caplog.text


def test_a_class_of_one_image_is_an_error_naming_it(tmp_path):
    for name in ("a.jpg", "b.jpg"):
        write_image(tmp_path / "cats" / name)
    write_image(tmp_path / "dogs" / "only.jpg")
    write_image(tmp_path / "owls" / "only.jpg")
    with pytest.raises(TrainingSetError, match="2 have one: dogs, owls") as error:
        images_from_folder(tmp_path)
    assert error.value.classes == ("dogs", "owls")
    assert isinstance(error.value, DatasetError)


def test_a_class_left_with_one_readable_image_is_an_error(tmp_path):
    for cls in ("cats", "dogs"):
        write_image(tmp_path / cls / "a.jpg")
        write_image(tmp_path / cls / "b.jpg")
    (tmp_path / "dogs" / "b.jpg").write_bytes(b"")
    with pytest.raises(TrainingSetError, match="dogs"):
        images_from_folder(tmp_path)


def test_fewer_than_two_classes_is_an_error(tmp_path):
    write_image(tmp_path / "cats" / "a.jpg")
    write_image(tmp_path / "cats" / "b.jpg")
    with pytest.raises(TrainingSetError, match="at least 2 classes, found only cats"):
        images_from_folder(tmp_path)
    with pytest.raises(TrainingSetError, match="no readable images"):
        images_from_folder(tmp_path / "cats")


def test_csv_with_header_relative_paths_and_a_missing_file(tmp_path):
    for name in ("x1.jpg", "x2.jpg", "y1.jpg", "y2.jpg"):
        write_image(tmp_path / "img" / name)
    (tmp_path / "list.csv").write_text(
        "path,label\nimg/x1.jpg,x\nimg/x2.jpg, x\n\nimg/y1.jpg,y\nimg/y2.jpg,y\nimg/gone.jpg,y\n"
    )
    images = images_from_csv(tmp_path / "list.csv")
    assert images.classes == ("x", "y")
    assert images.labels.tolist() == [0, 0, 1, 1]
    assert [(p.name, why) for p, why in images.skipped] == [("gone.jpg", "file not found")]
    unchecked = images_from_csv(tmp_path / "list.csv", check_images=False)
    assert len(unchecked) == 4 and len(unchecked.skipped) == 1


def test_csv_malformed_row_names_its_line(tmp_path):
    (tmp_path / "list.csv").write_text("a.jpg,x\nb.jpg\n")
    with pytest.raises(TrainingSetError, match="line 2"):
        images_from_csv(tmp_path / "list.csv")


# ---- mining ----------------------------------------------------------------------------------------------


def naive_negatives(q_desc, p_desc, q_labels, p_labels, n):
    """cirtorch's walk down the pool, ties to the lower index."""
    out = []
    for q in range(len(q_desc)):
        scores = [
            float(np.dot(q_desc[q].astype(np.float64), p_desc[j].astype(np.float64)))
            for j in range(len(p_desc))
        ]
        order = sorted(range(len(p_desc)), key=lambda j: (-scores[j], j))
        taken, classes = [], set()
        for j in order:
            if p_labels[j] != q_labels[q] and p_labels[j] not in classes:
                taken.append(j)
                classes.add(p_labels[j])
            if len(taken) == n:
                break
        out.append(taken + [-1] * (n - len(taken)))
    return np.array(out)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mining_equals_the_naive_walk(seed):
    rng = np.random.default_rng(seed)
    pool_labels = rng.integers(0, 9, size=60)
    query_labels = rng.integers(0, 9, size=12)
    q, p = unit_rows(12, 6, rng), unit_rows(60, 6, rng)
    got = mine_hard_negatives(q, p, query_labels, pool_labels, 5)
    np.testing.assert_array_equal(got, naive_negatives(q, p, query_labels, pool_labels, 5))
    for row, label in zip(got, query_labels, strict=True):
        assert label not in pool_labels[row] and len(set(pool_labels[row])) == 5


def test_mining_breaks_ties_by_pool_index_and_pads_when_classes_run_out():
    q = np.array([[1.0, 0.0]])
    pool = np.array([[0.0, 1.0], [1.0, 0.0], [1.0, 0.0], [0.6, 0.8]])
    labels = np.array([7, 3, 4, 3])
    got = mine_hard_negatives(q, pool, np.array([9]), labels, 4)
    np.testing.assert_array_equal(got, [[1, 2, 0, -1]])  # 1 and 2 tie; 3 repeats class 3; only 3 classes
    assert mine_hard_negatives(q, pool, np.array([3]), labels, 2).tolist() == [[2, 0]]


def test_mining_refuses_bad_shapes():
    with pytest.raises(ConfigError):
        mine_hard_negatives(np.zeros((2, 3)), np.zeros((4, 2)), np.zeros(2), np.zeros(4), 1)
    with pytest.raises(ConfigError):
        mine_hard_negatives(np.full((1, 2), np.nan), np.zeros((4, 2)), np.zeros(1), np.zeros(4), 1)


def test_nearest_positive_is_the_most_similar_classmate_other_than_itself():
    labels = np.array([0, 0, 0, 1, 1])
    desc = np.array([[1.0, 0.0], [0.0, 1.0], [0.8, 0.6], [1.0, 0.0], [0.6, 0.8]])
    described = np.array([0, 1, 2, 3, 4])
    got = choose_positives(np.array([0, 3]), desc[[0, 3]], described, desc, labels, "nearest")
    assert got.tolist() == [2, 4]


def test_random_positives_are_classmates_and_a_missing_classmate_falls_back_to_random():
    labels = np.array([0, 0, 0, 1, 1, 1])
    rng = np.random.default_rng(0)
    queries = np.array([0, 1, 3, 4, 5] * 20)
    got = choose_positives(queries, None, np.array([]), None, labels, "random", rng)
    assert (labels[got] == labels[queries]).all() and (got != queries).all()
    assert set(got[queries == 3].tolist()) == {4, 5}
    desc = np.eye(6)[:, :3].astype(np.float32)
    fallback = choose_positives(
        np.array([3]), desc[[3]], np.array([0, 1]), desc[[0, 1]], labels, "nearest", rng
    )
    assert fallback[0] in (4, 5)


# ---- epochs ----------------------------------------------------------------------------------------------


def test_epoch_sampling_is_seeded_distinct_and_sized():
    labels = np.repeat(np.arange(10), 6)
    a = sample_epoch(labels, 8, 25, np.random.default_rng(42))
    b = sample_epoch(labels, 8, 25, np.random.default_rng(42))
    c = sample_epoch(labels, 8, 25, np.random.default_rng(43))
    np.testing.assert_array_equal(a.queries, b.queries)
    np.testing.assert_array_equal(a.pool, b.pool)
    assert not (np.array_equal(a.queries, c.queries) and np.array_equal(a.pool, c.pool))
    assert len(set(a.queries)) == 8 and len(set(a.pool)) == 25
    assert set(labels[a.pool]) == set(range(10))  # every class in the pool
    assert sample_epoch(labels, 100, 100, np.random.default_rng(0)).queries.size == 60


def test_small_pool_is_uniform_and_full_pool_is_everything():
    labels = np.repeat(np.arange(10), 3)
    assert sample_pool(labels, 4, np.random.default_rng(0)).size == 4
    np.testing.assert_array_equal(sample_pool(labels, 99, np.random.default_rng(0)), np.arange(30))


def test_build_tuples_end_to_end():
    rng = np.random.default_rng(5)
    labels = np.repeat(np.arange(6), 4)
    desc = unit_rows(24, 8, rng)
    sample = sample_epoch(labels, 5, 18, rng)
    tuples = build_tuples(sample, desc[sample.queries], desc[sample.pool], labels, 3, "nearest", rng)
    assert tuples.shape == (5, 5)
    np.testing.assert_array_equal(tuples[:, 0], sample.queries)
    assert (labels[tuples[:, 1]] == labels[tuples[:, 0]]).all() and (tuples[:, 1] != tuples[:, 0]).all()
    expected = naive_negatives(
        desc[sample.queries], desc[sample.pool], labels[sample.queries], labels[sample.pool], 3
    )
    np.testing.assert_array_equal(tuples[:, 2:], sample.pool[expected])
    targets = tuple_targets(tuples, labels)
    assert targets.tuple_size == 5 and targets.labels.tolist() == labels[tuples.ravel()].tolist()


def test_build_tuples_refuses_too_many_negatives_and_too_small_pools():
    labels = np.repeat(np.arange(3), 2)
    desc = np.eye(6, dtype=np.float32)
    everything = EpochSample(np.arange(6), np.arange(6))
    with pytest.raises(ConfigError, match="at least 4 classes"):
        build_tuples(everything, desc, desc, labels, 3)
    narrow = EpochSample(np.array([0]), np.array([1, 2, 3]))  # classes 0, 1, 1: one other class
    with pytest.raises(TrainingSetError, match="enlarge the pool"):
        build_tuples(narrow, desc[[0]], desc[[1, 2, 3]], labels, 2)
