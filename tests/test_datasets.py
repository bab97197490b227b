"""Dataset readers: labelled folders and splits, revisitop pickles (safely), JSON, Oxford text, Holidays, UKBench."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from lookalike.errors import ConfigError, DatasetError
from lookalike.evaluate.datasets import (
    GroundTruth,
    holidays_groups,
    load_gnd_json,
    load_oxford_text_gnd,
    load_revisitop_gnd,
    save_gnd_json,
    ukbench_groups,
)
from lookalike.evaluate.metrics import compute_map, revisited_protocol
from lookalike.labels import labelled_folder, split_labelled

from .conftest import SHARED_DATA

# ---- labelled folders ------------------------------------------------------------------------------------


@pytest.fixture()
def labelled_root(tmp_path: Path) -> Path:
    """cats (2), dogs (3), clutter (2 + a file without extension), a stray file at the top."""
    for folder, names in {
        "cats": ["c1.jpg", "c2.png"],
        "dogs": ["d1.jpg", "d2.jpg", "d3.jpeg"],
        "clutter": ["x1.jpg", "x2.jpg", "tmp"],
    }.items():
        (tmp_path / folder).mkdir()
        for name in names:
            (tmp_path / folder / name).write_bytes(b"\xff\xd8\xff")
    (tmp_path / "stray.jpg").write_bytes(b"\xff\xd8\xff")
    return tmp_path


def test_labelled_folder_labels_by_sub_folder(labelled_root):
    dataset = labelled_folder(labelled_root)
    assert len(dataset) == 7  # the extensionless clutter/tmp and the top-level stray.jpg are skipped
    assert dataset.classes == ["cats", "clutter", "dogs"]
    assert dataset.labels.count("dogs") == 3
    assert not any(dataset.is_distractor)
    assert all(path.name != "tmp" for path in dataset.paths)


def test_labelled_folder_flags_the_distractor_class(labelled_root):
    dataset = labelled_folder(labelled_root, distractor="clutter")
    assert dataset.known_classes == ["cats", "dogs"]
    flagged = [p.name for p, d in zip(dataset.paths, dataset.is_distractor, strict=True) if d]
    assert flagged == ["x1.jpg", "x2.jpg"]
    with pytest.raises(ConfigError):
        labelled_folder(labelled_root, distractor="BACKGROUND_Google")


def test_split_by_image_is_stratified_seeded_and_keeps_distractors_out_of_train(labelled_root):
    dataset = labelled_folder(labelled_root, distractor="clutter")
    train, test = split_labelled(dataset, 0.5, seed=1)
    # per class floor(n/2 + 1/2): cats 2 → 1, dogs 3 → 2 (1.5 rounds up)
    assert sorted(train.labels) == ["cats", "dogs", "dogs"]
    assert sorted(test.labels) == ["cats", "clutter", "clutter", "dogs"]
    assert set(train.paths).isdisjoint(test.paths) and len(train) + len(test) == len(dataset)
    assert train.distractor == "clutter" and not any(train.is_distractor)
    assert list(train.paths) == sorted(train.paths, key=dataset.paths.index)  # original order kept
    again, _ = split_labelled(dataset, 0.5, seed=1)
    assert again.paths == train.paths
    assert len({split_labelled(dataset, 0.5, seed=s)[0].paths for s in range(20)}) > 1
    # an int is a count per class; a class smaller than it goes to train entirely
    train, _ = split_labelled(dataset, 1)
    assert sorted(train.labels) == ["cats", "dogs"]
    train, test = split_labelled(dataset, 5)
    assert len(train) == 5 and set(test.labels) == {"clutter"}


def test_split_by_class_holds_out_whole_classes(labelled_root):
    dataset = labelled_folder(labelled_root, distractor="clutter")
    for seed in range(5):
        train, test = split_labelled(dataset, 1, by="class", seed=seed)
        assert len(set(train.labels)) == 1 and "clutter" not in train.labels
        assert set(train.labels).isdisjoint(set(test.labels) - {"clutter"})
        assert test.labels.count("clutter") == 2
    train, _ = split_labelled(dataset, 0.5, by="class")  # half of 2 classes → 1
    assert len(set(train.labels)) == 1


@pytest.mark.parametrize(
    ("size", "by"), [(1.5, "image"), (-1, "image"), (4, "class"), (True, "image"), (0.5, "x")]
)
def test_split_refuses_bad_options(labelled_root, size, by):
    with pytest.raises(ConfigError):
        split_labelled(labelled_folder(labelled_root), size, by=by)


def test_caltech101_in_place():
    root = SHARED_DATA / "caltech101"
    if not root.is_dir():
        pytest.skip(f"{root} is not here")
    dataset = labelled_folder(root, distractor="BACKGROUND_Google")
    background = [n for n in os.listdir(root / "BACKGROUND_Google") if not n.startswith(".")]
    assert len(dataset.classes) == 102 and len(dataset.known_classes) == 101
    # BACKGROUND_Google/tmp is a JPEG without an extension: skipped like any extensionless file
    assert "tmp" in background
    assert sum(dataset.is_distractor) == len(background) - 1 == 466
    assert all(p.name != "tmp" for p in dataset.paths)


# ---- revisitop pickles -----------------------------------------------------------------------------------


def small_gnd() -> dict:
    return {
        "imlist": ["all_souls_000001", "all_souls_000002", "radcliffe_camera_000003", "x", "y"],
        "qimlist": ["all_souls_000001", "x"],
        "gnd": [
            {
                "bbx": np.array([1.5, 2.0, 30.0, 40.5]),
                "easy": np.array([1]),
                "hard": [2],
                "junk": np.array([0]),
            },
            {"bbx": [0.0, 0.0, 9.0, 9.0], "easy": [], "hard": np.array([4], np.int32), "junk": [3]},
        ],
    }


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_revisitop_pickle_with_numpy_arrays_loads(tmp_path, protocol):
    path = tmp_path / "gnd_test.pkl"
    path.write_bytes(pickle.dumps(small_gnd(), protocol=protocol))
    truth = load_revisitop_gnd(path)
    assert truth.images[2] == "radcliffe_camera_000003" and truth.queries == ("all_souls_000001", "x")
    np.testing.assert_array_equal(truth.gnd[0]["bbx"], [1.5, 2.0, 30.0, 40.5])
    assert truth.gnd[0]["easy"].tolist() == [1] and truth.gnd[0]["easy"].dtype == np.int64
    assert truth.gnd[1]["easy"].size == 0 and truth.gnd[1]["hard"].tolist() == [4]
    # it feeds the metrics as it is; q0 ranking 0 1 2 3 4 → Easy: junk 0, 2 → 1 at rank 0 → AP 1
    results = revisited_protocol(np.tile(np.arange(5), (2, 1)), truth.gnd)
    assert results["easy"].map == 1.0


class Payload:
    """Unpickling this runs a shell command that would create ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


class Custom:
    """An innocent class of the test module: still not something a ground truth may hold."""

    def __init__(self) -> None:
        self.value = 1


def test_pickle_with_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "ran"
    data = small_gnd()
    data["gnd"][0]["easy"] = Payload(marker)
    raw = pickle.dumps(data)
    assert b"system" in raw  # the payload really names os.system
    path = tmp_path / "evil.pkl"
    path.write_bytes(raw)
    with pytest.raises(DatasetError, match="system"):
        load_revisitop_gnd(path)
    assert not marker.exists()


def test_pickle_with_a_custom_class_or_builtin_is_refused(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "custom.pkl"
    path.write_bytes(pickle.dumps({"imlist": [], "qimlist": [], "gnd": [], "extra": Custom()}))
    with pytest.raises(DatasetError, match="Custom"):
        load_revisitop_gnd(path)

    class Exec:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').close()",))

    path.write_bytes(pickle.dumps([Exec()]))
    with pytest.raises(DatasetError, match="exec"):
        load_revisitop_gnd(path)
    assert not marker.exists()


def test_broken_or_misshapen_pickles_are_dataset_errors(tmp_path):
    path = tmp_path / "gnd.pkl"
    raw = pickle.dumps(small_gnd())
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DatasetError):
        load_revisitop_gnd(path)
    path.write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(DatasetError, match="imlist"):
        load_revisitop_gnd(path)
    bad = small_gnd()
    bad["gnd"][1]["junk"] = [5]  # only 5 images: id 5 is out of range
    path.write_bytes(pickle.dumps(bad))
    with pytest.raises(DatasetError, match="outside"):
        load_revisitop_gnd(path)
    bad = small_gnd()
    bad["gnd"].pop()
    path.write_bytes(pickle.dumps(bad))
    with pytest.raises(DatasetError, match="one entry per query"):
        load_revisitop_gnd(path)
    with pytest.raises(DatasetError):
        load_revisitop_gnd(tmp_path / "missing.pkl")


def test_gnd_json_round_trip(tmp_path):
    pickled = tmp_path / "gnd.pkl"
    pickled.write_bytes(pickle.dumps(small_gnd()))
    truth = load_revisitop_gnd(pickled)
    save_gnd_json(truth, tmp_path / "gnd.json")
    again = load_gnd_json(tmp_path / "gnd.json")
    assert again.images == truth.images and again.queries == truth.queries
    for a, b in zip(truth.gnd, again.gnd, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
            assert a[key].dtype == b[key].dtype


def test_gnd_json_refuses_other_files(tmp_path):
    path = tmp_path / "gnd.json"
    path.write_text('{"imlist": [], "qimlist": [], "gnd": []}')
    with pytest.raises(DatasetError, match=r"not a lookalike\.gnd"):
        load_gnd_json(path)
    path.write_text('{"format": "lookalike.gnd", "version": 99, "imlist": [], "qimlist": [], "gnd": []}')
    with pytest.raises(DatasetError, match="version"):
        load_gnd_json(path)
    path.write_text("{not json")
    with pytest.raises(DatasetError):
        load_gnd_json(path)


# ---- Oxford / Paris text files ---------------------------------------------------------------------------


@pytest.fixture()
def oxford_folder(tmp_path: Path) -> Path:
    files = {
        "all_souls_1_query.txt": "oxc1_all_souls_000013 136.5 34.1 648.5 955.9\n",
        "all_souls_1_good.txt": "all_souls_000013\nall_souls_000026\n",
        "all_souls_1_ok.txt": "all_souls_000040\n",
        "all_souls_1_junk.txt": "all_souls_000051\n",
        "all_souls_10_query.txt": "oxc1_all_souls_000026 1 2 3 4\n",
        "all_souls_10_good.txt": "all_souls_000026\n",
        "all_souls_10_ok.txt": "",
        "all_souls_10_junk.txt": "\n",
        "all_souls_2_query.txt": "oxc1_all_souls_000040 5 6 7 8\n",
        "all_souls_2_good.txt": "",
        "all_souls_2_ok.txt": "all_souls_000013\n",
        "all_souls_2_junk.txt": "",
        "ashmolean_1_query.txt": "oxc1_ashmolean_000007 0 0 10 10\n",
        "ashmolean_1_good.txt": "ashmolean_000007\n",
        "ashmolean_1_ok.txt": "",
        "ashmolean_1_junk.txt": "all_souls_000013\n",
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    return tmp_path


def test_oxford_text_ground_truth(oxford_folder):
    truth = load_oxford_text_gnd(oxford_folder)
    assert truth.query_names == ("all_souls_1", "all_souls_2", "all_souls_10", "ashmolean_1")
    assert truth.queries == ("all_souls_000013", "all_souls_000040", "all_souls_000026", "ashmolean_000007")
    # database: the sorted names the files mention
    assert truth.images == (
        "all_souls_000013",
        "all_souls_000026",
        "all_souls_000040",
        "all_souls_000051",
        "ashmolean_000007",
    )
    first = truth.gnd[0]
    np.testing.assert_allclose(first["bbx"], [136.5, 34.1, 648.5, 955.9])
    assert first["ok"].tolist() == [0, 1, 2]  # good (13, 26) + ok (40)
    assert first["junk"].tolist() == [3]
    assert truth.gnd[2]["junk"].size == 0
    # every query finds its positives first: AP 1 each (junk 51 and 13 skipped where listed)
    ranks = np.array([[0, 1, 2, 3, 4], [0, 2, 1, 3, 4], [1, 0, 2, 3, 4], [4, 0, 1, 2, 3]])
    assert compute_map(ranks, truth.gnd).map == 1.0


def test_oxford_text_with_a_database_list(oxford_folder):
    images = [
        "zzz",
        "all_souls_000051",
        "all_souls_000040",
        "all_souls_000026",
        "all_souls_000013",
        "ashmolean_000007",
    ]
    truth = load_oxford_text_gnd(oxford_folder, images=images)
    assert truth.images == tuple(images)
    assert truth.gnd[0]["ok"].tolist() == [4, 3, 2] and truth.gnd[0]["junk"].tolist() == [1]
    with pytest.raises(DatasetError, match="not in the database"):
        load_oxford_text_gnd(oxford_folder, images=images[:-1])


def test_oxford_text_refuses_a_bad_folder(oxford_folder, tmp_path_factory):
    (oxford_folder / "ashmolean_1_query.txt").write_text("oxc1_ashmolean_000007 0 0 10\n")
    with pytest.raises(DatasetError, match="x1 y1 x2 y2"):
        load_oxford_text_gnd(oxford_folder)
    (oxford_folder / "ashmolean_1_query.txt").write_text("oxc1_ashmolean_000007 0 0 10 10\n")
    (oxford_folder / "ashmolean_1_junk.txt").unlink()
    with pytest.raises(DatasetError, match="cannot read"):
        load_oxford_text_gnd(oxford_folder)
    with pytest.raises(DatasetError, match=r"no \*_query\.txt"):
        load_oxford_text_gnd(tmp_path_factory.mktemp("empty"))


# ---- Holidays and UKBench --------------------------------------------------------------------------------


def test_holidays_groups_from_names():
    paths = ["a/100000.jpg", "a/100001.jpg", "a/100100.jpg", "a/100101.jpg", "a/100102.jpg", "a/100201.jpg"]
    truth = holidays_groups(paths)
    assert isinstance(truth, GroundTruth)
    assert truth.images == tuple(paths)
    assert truth.queries == ("a/100000.jpg", "a/100100.jpg")  # group 1002 has no …00 image: no query
    assert truth.query_names == ("1000", "1001")
    assert truth.gnd[0]["ok"].tolist() == [1] and truth.gnd[0]["junk"].tolist() == [0]
    assert truth.gnd[1]["ok"].tolist() == [3, 4] and truth.gnd[1]["junk"].tolist() == [2]
    # the query ranked first is junk, so positives right after it give AP 1
    ranks = np.array([[0, 1, 2, 3, 4, 5], [2, 4, 3, 0, 1, 5]])
    assert compute_map(ranks, truth.gnd).map == 1.0


@pytest.mark.parametrize(
    "paths", [["holiday.jpg"], ["10000.jpg"], ["100000.jpg", "x/100000.png"], ["100001.jpg"]]
)
def test_holidays_refuses_bad_names(paths):
    with pytest.raises(DatasetError):
        holidays_groups(paths)


def test_holidays_sample_in_place():
    folder = SHARED_DATA / "holidays-sample"
    if not folder.is_dir():
        pytest.skip(f"{folder} is not here")
    paths = sorted(folder.glob("*.jpg"))
    truth = holidays_groups(paths)
    assert [Path(q).name for q in truth.queries] == ["100000.jpg"]
    assert [Path(truth.images[i]).name for i in truth.gnd[0]["ok"]] == ["100001.jpg", "100002.jpg"]
    assert [Path(truth.images[i]).name for i in truth.gnd[0]["junk"]] == ["100000.jpg"]


def test_ukbench_groups():
    assert ukbench_groups(["ukbench00000.jpg", "d/ukbench00007.jpg", "ukbench10199.jpg"]).tolist() == [
        0,
        1,
        2549,
    ]
    with pytest.raises(DatasetError):
        ukbench_groups(["image00001.jpg"])


def test_ukbench_sample_in_place():
    folder = SHARED_DATA / "ukbench-sample"
    if not folder.is_dir():
        pytest.skip(f"{folder} is not here")
    assert ukbench_groups(sorted(folder.glob("*.jpg"))).tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2]
