"""Spatial verification (``sv``) as a re-ranking stage: its options as chain text, its score formula against a
loop, and on real photos — an edited copy found among look-alikes that the global scores rank low, what has
no pixels or no keypoints left as it was, DBA before it, and the Holidays sample with XFeat."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from lookalike.errors import ConfigError
from lookalike.images import load_image
from lookalike.local import LocalDescriber, LocalFeatures, local_describer
from lookalike.local.cache import FileLocalFeatures
from lookalike.rerank import (
    ArrayDatabase,
    Ranking,
    SpatialVerification,
    parse_chain,
    verified_scores,
    verify_pair,
)
from tests.conftest import SAMPLE, require_weights, unit_rows
from tests.test_local_features import CALTECH, HOLIDAYS, edited, flat_grey

SIFT = "sv:features=sift"
ORIGINAL = SAMPLE / "motorcycle-left.jpg"
LOOK_ALIKES = sorted((CALTECH / "Motorbikes").glob("*.jpg"))[:5]  # other motorbikes, side on
OTHER_CLASSES = sorted(p.name for p in CALTECH.iterdir() if p.name not in ("BACKGROUND_Google", "Motorbikes"))


class PhotoDatabase(ArrayDatabase):
    """Vectors in memory whose ids name image files: an ArrayDatabase with FileLocalFeatures."""

    def __init__(self, xb: np.ndarray, ids: np.ndarray, paths: dict[int, Path | None]) -> None:
        super().__init__(xb, ids)
        self.files = FileLocalFeatures(paths.get)

    def local_features(self, ids: Sequence[int], describer: LocalDescriber) -> list[LocalFeatures | None]:
        return self.files.local_features(ids, describer)


@dataclass
class Photos:
    database: PhotoDatabase
    paths: dict[int, Path | None]
    true: int  # the id of ORIGINAL
    odd: dict[str, int]  # ids whose image gives no features: corrupt, missing, grey, unnamed
    query: np.ndarray  # (1, D): a global descriptor that ranks the true match low
    pixels: Image.Image  # the edited copy of ORIGINAL the query describes


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Photos:
    """30 real photos (ORIGINAL, 5 look-alike motorbikes, 24 Caltech classes) and 4 entries without features,
    with random global descriptors; the query's descriptor is the mean of 10 others', so the true match ranks
    low until its geometry is checked."""
    odd_folder = tmp_path_factory.mktemp("odd")
    corrupt, grey = odd_folder / "corrupt.jpg", odd_folder / "grey.png"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0" + os.urandom(4000))
    flat_grey((320, 240)).save(grey)
    files: list[Path | None] = [ORIGINAL, *LOOK_ALIKES]
    files += [sorted((CALTECH / name).glob("*.jpg"))[0] for name in OTHER_CLASSES[:24]]
    files += [corrupt, odd_folder / "gone.jpg", grey, None]
    ids = 1000 + 7 * np.arange(len(files), dtype=np.int64)  # ids are not rows
    xb = unit_rows(len(files), 32, seed=11)
    query = xb[[1, 2, 3, 4, 5, 6, 7, 30, 31, 32]].sum(axis=0)  # the look-alikes and the odd ones first
    query = (query / np.linalg.norm(query)).astype(np.float32)[None]
    paths = {int(i): f for i, f in zip(ids, files, strict=True)}
    names = ("corrupt", "missing", "grey", "unnamed")
    return Photos(
        PhotoDatabase(xb, ids, paths),
        paths,
        int(ids[0]),
        dict(zip(names, map(int, ids[-4:]), strict=True)),
        query,
        edited(load_image(ORIGINAL)),
    )


@pytest.fixture(scope="module")
def before(photos: Photos) -> Ranking:
    return parse_chain("none").search(photos.database, photos.query, k=len(photos.database))


@pytest.fixture(scope="module")
def after(photos: Photos) -> Ranking:
    return parse_chain(SIFT).search(
        photos.database, photos.query, len(photos.database), pixels=[photos.pixels]
    )


def score_of(ranking: Ranking, image_id: int, row: int = 0) -> float:
    return float(ranking.scores[row][list(ranking.ids[row]).index(image_id)])


def rank_of(ranking: Ranking, image_id: int, row: int = 0) -> int:
    return list(ranking.ids[row]).index(image_id) + 1


def assert_same_ranking(first: Ranking, second: Ranking) -> None:
    np.testing.assert_array_equal(first.ids, second.ids)
    np.testing.assert_array_equal(first.scores, second.scores)


# -- the stage as text -----------------------------------------------------------------------------------


def test_sv_is_built_from_chain_text() -> None:
    chain = parse_chain("sv:top=50,features=sift")
    assert chain.stages == (SpatialVerification(top=50, features="sift"),)
    assert str(chain) == "sv:top=50,features=sift"
    assert parse_chain(str(chain)) == chain
    assert (chain.depth(10), chain.depth(80)) == (50, 80)
    assert chain.needs_pixels and parse_chain("dba,sv").needs_pixels
    assert not parse_chain("dba,aqe").needs_pixels and not parse_chain("none").needs_pixels
    full = parse_chain(
        "sv:model=affine,threshold=3.5,min_inliers=20,half=10,mirror=yes,keypoints=512,size=320"
    )
    assert full.stages == (
        SpatialVerification(
            model="affine", threshold=3.5, min_inliers=20, half=10.0, mirror=True, keypoints=512, size=320
        ),
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("sv:top=0", "sv needs top from 1 to 1000"),
        ("sv:top=1001", "sv needs top from 1 to 1000"),
        ("sv:features=foo", "sv: features are one of xfeat, sift or auto, got 'foo'"),
        ("sv:model=bar", "sv: model is one of homography, affine, got 'bar'"),
        ("sv:threshold=0", "sv: threshold is a reprojection error of 0.5 to 50 pixels"),
        ("sv:threshold=nan", "threshold"),
        ("sv:min_inliers=3", "sv: min_inliers is 4 to 10000"),
        ("sv:half=0", "sv: half must be above 0"),
        ("sv:min_similarity=1", "sv: min_similarity is a cosine from -1 to 1"),
        ("sv:keypoints=8", "sv: keypoints are 16 to 16384"),
        ("sv:size=32", "sv: the working size is 64 to 4096"),
        ("sv:mirror=maybe", "mirror must be true or false"),
        ("sv:topp=5", "sv has no option 'topp'"),
    ],
)
def test_bad_sv_options_are_config_errors(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_chain(text)


# -- the score -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("min_inliers", "half"), [(15, 20.0), (4, 1.0), (100, 5.0)])
def test_verified_scores_equal_the_loop(min_inliers: int, half: float) -> None:
    rng = np.random.default_rng(min_inliers)
    scores = rng.uniform(-1, 1, (3, 40)).astype(np.float32)
    scores[2, 30:] = -np.inf  # a shortlist shorter than asked
    inliers = rng.integers(0, 200, (3, 40))
    ours = np.stack([verified_scores(s, n, min_inliers, half) for s, n in zip(scores, inliers, strict=True)])
    naive = np.array(
        [
            [s + (n / (n + half) if n >= min_inliers else 0.0) for s, n in zip(row_s, row_n, strict=True)]
            for row_s, row_n in zip(scores.tolist(), inliers.tolist(), strict=True)
        ]
    )
    np.testing.assert_allclose(ours, naive, atol=1e-6)
    assert ours.dtype == np.float32
    assert (verified_scores(scores[0], np.full(40, min_inliers), min_inliers, half) > scores[0]).all()
    np.testing.assert_array_equal(
        verified_scores(scores[0], np.full(40, min_inliers - 1), min_inliers, half), scores[0]
    )


# -- on real photos --------------------------------------------------------------------------------------


def test_sv_moves_an_edited_copy_to_the_top(photos: Photos, before: Ranking, after: Ranking) -> None:
    assert rank_of(before, photos.true) > 10  # the global scores put it low
    assert rank_of(after, photos.true) == 1
    assert sorted(after.ids[0].tolist()) == sorted(before.ids[0].tolist())  # re-ordered, nothing lost
    assert (np.diff(after.scores[0]) <= 0).all()
    describer = local_describer("sift")
    original = photos.database.local_features([photos.true], describer)[0]
    assert original is not None
    inliers = verify_pair(describer.describe(photos.pixels), original).inliers
    assert inliers >= 30
    expected = score_of(before, photos.true) + inliers / (inliers + 20.0)
    assert score_of(after, photos.true) == pytest.approx(expected, abs=1e-6)


def test_look_alikes_and_entries_without_features_keep_their_scores(
    photos: Photos, before: Ranking, after: Ranking
) -> None:
    """A motorbike that is not *the* motorbike gains nothing; nor does a corrupt, missing or featureless file,
    or an id without a file — and none of them breaks the stage."""
    kept = [int(i) for i in before.ids[0] if i != photos.true]
    assert set(photos.odd.values()) <= set(kept)
    for image_id in kept:
        assert score_of(after, image_id) == score_of(before, image_id), photos.paths[image_id]


def test_a_query_without_pixels_or_own_id_keeps_its_ranking(photos: Photos) -> None:
    k = len(photos.database)
    other = unit_rows(1, 32, seed=3)
    queries = np.vstack([photos.query, other])
    plain = parse_chain("none").search(photos.database, queries, k)
    assert_same_ranking(parse_chain(SIFT).search(photos.database, queries, k), plain)
    mixed = parse_chain(SIFT).search(photos.database, queries, k, pixels=[photos.pixels, None])
    assert rank_of(mixed, photos.true, 0) == 1
    np.testing.assert_array_equal(mixed.ids[1], plain.ids[1])
    np.testing.assert_array_equal(mixed.scores[1], plain.scores[1])


def test_a_query_without_keypoints_keeps_its_ranking(photos: Photos, before: Ranking) -> None:
    grey = parse_chain(SIFT).search(photos.database, photos.query, len(photos.database), pixels=[flat_grey()])
    assert_same_ranking(grey, before)


def test_only_the_first_top_candidates_are_verified(photos: Photos, before: Ranking) -> None:
    asked: list[int] = []

    class Spy(PhotoDatabase):
        def local_features(self, ids: Sequence[int], describer: LocalDescriber) -> list[LocalFeatures | None]:
            asked.extend(int(i) for i in ids)
            return photos.database.local_features(ids, describer)

    spy = Spy(photos.database.xb, photos.database.ids, photos.paths)
    top = rank_of(before, photos.true) - 1  # the true match just out of reach
    k = len(photos.database)  # a shortlist deeper than top
    ranking = parse_chain(f"{SIFT},top={top}").search(spy, photos.query, k, pixels=[photos.pixels])
    assert asked == before.ids[0, :top].tolist()
    assert rank_of(ranking, photos.true) == top + 1
    np.testing.assert_array_equal(ranking.ids[0, top:], before.ids[0, top:])
    reached = parse_chain(f"{SIFT},top={top + 1}").search(spy, photos.query, 3, pixels=[photos.pixels])
    assert reached.ids.shape == (1, 3) and reached.ids[0, 0] == photos.true  # k < top: as deep as top


def test_a_mirrored_copy_is_found_only_when_asked(photos: Photos, before: Ranking) -> None:
    mirrored = ImageOps.mirror(photos.pixels)
    k = len(photos.database)
    plain = parse_chain(SIFT).search(photos.database, photos.query, k, pixels=[mirrored])
    assert rank_of(plain, photos.true) == rank_of(before, photos.true)
    both = parse_chain(f"{SIFT},mirror=true").search(photos.database, photos.query, k, pixels=[mirrored])
    assert rank_of(both, photos.true) == 1


def test_an_indexed_query_is_verified_with_its_own_features(photos: Photos, tmp_path: Path) -> None:
    """A query that is a database entry and comes without pixels: its stored features are matched."""
    copy = tmp_path / "copy.jpg"
    photos.pixels.save(copy, quality=90)
    files = [ORIGINAL, *LOOK_ALIKES, copy]
    ids = np.arange(len(files), dtype=np.int64) + 1
    xb = unit_rows(len(files), 32, seed=5)
    # the copy's descriptor a little less like the original's than any look-alike's is
    rest = xb[-1] - (xb[-1] @ xb[0]) * xb[0]
    alike = float((xb[1:-1] @ xb[0]).min()) - 0.05
    xb[-1] = alike * xb[0] + np.sqrt(1 - alike**2) * rest / np.linalg.norm(rest)
    database = PhotoDatabase(xb, ids, dict(zip(ids.tolist(), files, strict=True)))
    plain = parse_chain("none").search(database, xb[:1], len(files), own=np.array([1]))
    assert rank_of(plain, 7) == len(files)
    verified = parse_chain(SIFT).search(database, xb[:1], len(files), own=np.array([1]))
    assert verified.ids[0, :2].tolist() == [1, 7]  # itself, then its edited copy
    no_identity = parse_chain(SIFT).search(database, xb[:1], len(files))
    assert_same_ranking(no_identity, plain)


def test_sv_reads_the_local_features_the_ranking_names(photos: Photos, before: Ranking) -> None:
    plain = ArrayDatabase(photos.database.xb, photos.database.ids)
    with pytest.raises(ConfigError, match="no local features"):
        parse_chain(SIFT).search(plain, photos.query, 5, pixels=[photos.pixels])
    ranking = Ranking(
        photos.query,
        before.scores,
        before.ids,
        plain,
        pixels=[photos.pixels],
        local=FileLocalFeatures(photos.paths.get),
    )
    assert parse_chain(SIFT).rerank(ranking).ids[0, 0] == photos.true


def test_dba_then_sv_still_finds_the_local_features(photos: Photos) -> None:
    ranking = parse_chain(f"dba,{SIFT}").search(photos.database, photos.query, 5, pixels=[photos.pixels])
    assert ranking.local is photos.database  # DBA handed on another database, the features stayed
    assert ranking.database is not photos.database
    assert ranking.ids[0, 0] == photos.true
    dba = parse_chain("dba").search(photos.database, photos.query, len(photos.database))
    assert rank_of(dba, photos.true) > 3  # it was sv that moved it


# -- Holidays, with XFeat --------------------------------------------------------------------------------

OUTDOOR = ("joshua_tree", "bonsai", "BACKGROUND_Google", "pagoda", "minaret", "pyramid", "ketch", "schooner")
DISTRACTORS = [p for name in OUTDOOR for p in sorted((CALTECH / name).glob("*.jpg"))[:3]]


@pytest.mark.weights
@pytest.mark.parametrize("query", sorted(p.name for p in HOLIDAYS.glob("*.jpg")))
def test_holidays_matches_come_first_with_xfeat(query: str) -> None:
    """Each Holidays sample image as the query (the protocol leaves it out of the database), its group's other
    images and 24 outdoor and object photos as the shortlist, all with equal scores, the matches last."""
    require_weights("xfeat.verlab")
    group = query[:4]
    matches = [p for p in sorted(HOLIDAYS.glob("*.jpg")) if p.name != query]
    assert matches and all(p.name[:4] == group for p in matches)
    files = [*DISTRACTORS, *matches]
    ids = np.arange(len(files), dtype=np.int64)
    true = {int(i) for i, f in zip(ids, files, strict=True) if f in matches}
    ranking = Ranking(
        queries=unit_rows(1, 8),
        scores=np.zeros((1, len(files)), np.float32),
        ids=ids[None],
        database=ArrayDatabase(unit_rows(len(files), 8), ids),
        pixels=[load_image(HOLIDAYS / query)],
        local=FileLocalFeatures(dict(zip(ids.tolist(), files, strict=True)).get),
    )
    reranked = parse_chain("sv:features=xfeat").rerank(ranking)
    assert int(reranked.ids[0, 0]) in true, [files[i].name for i in reranked.ids[0, :3]]
    assert reranked.scores[0, 0] > 0.5  # verified: more inliers than half
