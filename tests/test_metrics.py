"""CMC / mAP under the Market-1501 protocol, on an example worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from chatreid.metrics import compute_distmat, evaluate_rank

# Five gallery images: (pid, camera)
G_PIDS = np.array([1, 1, 2, 3, 1])
G_CAMS = np.array([0, 1, 1, 1, 2])


def test_hand_computed_cmc_and_map() -> None:
    q_pids, q_cams = np.array([1, 2, 9, 3]), np.array([0, 0, 0, 1])
    distmat = np.array([
        # query pid 1, camera 0. Ranked: g0 (same pid and camera: dropped), g2 x, g3 x,
        # g1 hit at rank 3, g4 hit at rank 4 -> CMC 0 0 1 1 (1), AP = (1/3 + 2/4) / 2
        [0.1, 0.4, 0.2, 0.3, 0.5],
        # query pid 2, camera 0. Ranked: g3 x, g1 x, g0 x, g4 x, g2 hit at rank 5 (another
        # camera: kept) -> CMC 0 0 0 0 1, AP = 1/5
        [0.3, 0.2, 0.6, 0.1, 0.4],
        # pid 9 is not in the gallery: skipped
        [0.5, 0.4, 0.3, 0.2, 0.1],
        # pid 3 appears only in its own camera: skipped
        [0.5, 0.4, 0.3, 0.2, 0.1],
    ])
    cmc, mean_ap = evaluate_rank(distmat, q_pids, G_PIDS, q_cams, G_CAMS, max_rank=50)
    assert cmc.tolist() == pytest.approx([0.0, 0.0, 0.5, 0.5, 1.0])  # capped at 5 entries
    assert mean_ap == pytest.approx(((1 / 3 + 2 / 4) / 2 + 1 / 5) / 2)


def test_a_perfect_ranking_scores_one_and_ties_keep_gallery_order() -> None:
    q_pids, q_cams = np.array([1]), np.array([5])
    cmc, mean_ap = evaluate_rank(np.array([[0.0, 0.0, 0.9, 0.9, 0.0]]), q_pids, G_PIDS,
                                 q_cams, G_CAMS, max_rank=3)
    assert cmc.tolist() == [1.0, 1.0, 1.0] and mean_ap == 1.0
    # all distances equal: the stable order is the gallery order, so g2 (pid 2) is rank 3
    cmc, mean_ap = evaluate_rank(np.zeros((1, 5)), np.array([2]), G_PIDS, np.array([0]),
                                 G_CAMS, max_rank=5)
    assert cmc.tolist() == [0.0, 0.0, 1.0, 1.0, 1.0] and mean_ap == pytest.approx(1 / 3)


def test_no_valid_query_and_shape_errors() -> None:
    with pytest.raises(ValueError, match="no query has a valid match"):
        evaluate_rank(np.zeros((1, 5)), np.array([9]), G_PIDS, np.array([0]), G_CAMS)
    with pytest.raises(ValueError, match="labels say"):
        evaluate_rank(np.zeros((1, 4)), np.array([1]), G_PIDS, np.array([0]), G_CAMS)


def test_compute_distmat_is_cosine_distance() -> None:
    q = np.array([[1.0, 0.0], [3.0, 4.0]])
    g = np.array([[2.0, 0.0], [0.0, 5.0], [-1.0, 0.0]])
    assert compute_distmat(q, g) == pytest.approx(np.array([[0.0, 1.0, 2.0],
                                                            [0.4, 0.2, 1.6]]), abs=1e-6)
    with pytest.raises(ValueError, match="feature sizes differ"):
        compute_distmat(q, np.ones((2, 3)))
    with pytest.raises(ValueError, match="all-zero rows"):
        compute_distmat(np.zeros((1, 2)), g)
