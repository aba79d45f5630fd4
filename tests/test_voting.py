"""Component voting: the voted centre minimises the summed Hamming distance (App. A.1); tie rule +1; merged
centres are distinct and never an empty cluster's."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from autossvh.clustering import ClusteringResult, kmeans
from autossvh.config import ClusterConfig
from autossvh.losses import ClusterTargets, voted_p2set_loss
from autossvh.voting import merge_centers, vote_centers


def _all_pm1(nbits: int) -> np.ndarray:
    """Every vector of {-1, +1}^nbits, shape (2^nbits, nbits)."""
    bits = (np.arange(2**nbits)[:, None] >> np.arange(nbits)) & 1
    return (2 * bits - 1).astype(np.int64)


@st.composite
def _members(draw, values: tuple[int, ...]) -> np.ndarray:
    nbits = draw(st.integers(1, 8))
    m = draw(st.integers(0, 12))
    return draw(arrays(np.int8, (m, nbits), elements=st.sampled_from(values)))


def _check_minimiser(members: np.ndarray) -> None:
    nbits = members.shape[1]
    center = vote_centers(members, np.zeros(len(members), dtype=np.int64), 1)[0]
    assert center.dtype == np.int8 and set(np.unique(center)) <= {-1, 1}
    # Per-bit distance |c - b| / 2 (0.5 for a 0 bit), summed over members: an independent form of the cost.
    cands = _all_pm1(nbits)
    costs = np.abs(cands[:, None, :] - members[None, :, :].astype(np.int64)).sum(axis=(1, 2)) / 2
    own = np.abs(center[None, :].astype(np.int64) - members).sum() / 2
    assert own == costs.min()  # no other ±1 vector does better
    # Among the minimisers, the voted one takes +1 wherever the member sum ties at 0.
    sums = members.astype(np.int64).sum(0)
    np.testing.assert_array_equal(center, np.where(sums >= 0, 1, -1))


@settings(max_examples=300, deadline=None)
@given(_members((-1, 1)))
def test_voted_center_minimises_summed_hamming(members: np.ndarray) -> None:
    _check_minimiser(members)


@settings(max_examples=300, deadline=None)
@given(_members((-1, 0, 1)))
def test_voted_center_minimises_summed_hamming_with_zero_bits(members: np.ndarray) -> None:
    _check_minimiser(members)


def test_tie_rule_gives_plus_one() -> None:
    members = np.array([[1, -1, 1, 0], [-1, 1, 1, 0], [0, -1, -1, 0]])
    # bit sums: 0, -1, 1, 0 -> ties (bits 0 and 3) give +1
    np.testing.assert_array_equal(vote_centers(members, [0, 0, 0], 1), [[1, -1, 1, 1]])


def test_empty_cluster_gives_all_plus_one() -> None:
    codes = -np.ones((4, 5))
    centers = vote_centers(codes, np.array([0, 0, 2, 2]), 4)
    np.testing.assert_array_equal(centers, [[-1] * 5, [1] * 5, [-1] * 5, [1] * 5])
    np.testing.assert_array_equal(vote_centers(np.zeros((0, 3)), np.zeros(0, dtype=int), 2), np.ones((2, 3)))


def test_many_clusters_match_a_per_cluster_loop() -> None:
    rng = np.random.default_rng(0)
    codes = rng.choice([-1, 0, 1], size=(2000, 16), p=[0.45, 0.1, 0.45]).astype(np.float32)
    assignment = rng.integers(0, 60, 2000)
    assignment[assignment == 7] = 8  # cluster 7 is empty
    centers = vote_centers(codes, assignment, 60)
    assert centers.shape == (60, 16) and centers.dtype == np.int8
    for c in range(60):
        sums = codes[assignment == c].sum(0)
        np.testing.assert_array_equal(centers[c], np.where(sums >= 0, 1, -1))
    np.testing.assert_array_equal(centers[7], np.ones(16))
    from_torch = vote_centers(torch.from_numpy(codes), torch.from_numpy(assignment), 60)
    np.testing.assert_array_equal(from_torch, centers)


@pytest.mark.parametrize(
    ("codes", "assignment", "n_clusters", "message"),
    [
        (np.ones((3, 4)), [0, 1, 3], 3, r"must lie in \[0, 3\)"),
        (np.ones((3, 4)), [0, -1, 2], 3, r"must lie in \[0, 3\)"),
        (np.ones((3, 4)), [0, 1], 3, r"must have shape \(3,\)"),
        (np.ones((3, 4)), [0.0, 1.0, 2.0], 3, "integer cluster ids"),
        (np.ones(4), [0, 1, 2, 0], 3, "2-D"),
        (2 * np.ones((3, 4)), [0, 1, 2], 3, "not in"),
        (np.ones((3, 4)), [0, 1, 2], 0, "n_clusters must be a positive integer"),
    ],
)
def test_vote_centers_rejects_bad_inputs(codes, assignment, n_clusters, message) -> None:
    with pytest.raises(ValueError, match=message):
        vote_centers(codes, np.asarray(assignment), n_clusters)


@st.composite
def _clusterings(draw) -> tuple[np.ndarray, np.ndarray, int]:
    """Codes of few bits (so votes collide) and assignments that leave some clusters empty."""
    nbits = draw(st.integers(1, 6))
    n = draw(st.integers(1, 40))
    k = draw(st.integers(1, 30))
    codes = draw(arrays(np.int8, (n, nbits), elements=st.sampled_from((-1, 0, 1))))
    assignment = draw(arrays(np.int64, (n,), elements=st.integers(0, k - 1)))
    return codes, assignment, k


@settings(max_examples=300, deadline=None)
@given(_clusterings())
def test_merged_centers_are_distinct_non_empty_votes_and_every_video_keeps_its_vote(clustering) -> None:
    codes, assignment, k = clustering
    voted = vote_centers(codes, assignment, k)
    centers, im2center = merge_centers(voted, assignment)
    assert len(np.unique(centers, axis=0)) == len(centers)  # never two identical centres
    assert len(centers) <= len(np.unique(assignment))  # at most one per non-empty cluster
    np.testing.assert_array_equal(centers[im2center], voted[assignment])  # each video's target is its vote
    used = {tuple(c) for c in voted[np.unique(assignment)]}
    assert {tuple(c) for c in centers} == used  # no empty cluster's all-(+1) vote unless a used cluster has it


@settings(max_examples=100, deadline=None)
@given(_clusterings())
def test_p2set_logits_cover_exactly_the_distinct_centres(clustering) -> None:
    codes, assignment, k = clustering
    centers, im2center = merge_centers(vote_centers(codes, assignment, k), assignment)
    tensors = [torch.as_tensor(a) for a in (assignment, centers.astype(np.float32), im2center)]
    targets = ClusterTargets([tensors[0]], [tensors[1]], [], [], [tensors[2]])
    z = torch.randn(len(codes), codes.shape[1], requires_grad=True)
    loss = voted_p2set_loss(z, torch.arange(len(codes)), targets, 0.2)
    assert torch.isfinite(loss)
    if len(centers) == 1:
        assert loss.item() == 0.0  # one centre: nothing to push away from
    loss.backward()


def test_clustering_merges_coinciding_votes() -> None:
    rng = np.random.default_rng(0)
    prototypes = np.where(rng.random((3, 8)) < 0.5, -1, 1)
    codes = prototypes[rng.integers(0, 3, 300)].astype(np.int8)
    features = codes / np.sqrt(8) + 0.01 * rng.standard_normal(codes.shape)
    result = ClusteringResult.empty()
    cfg = ClusterConfig(num_cluster=[12], nredo=1)
    result.add_granularity(codes, kmeans(features.astype(np.float32), 12, 0, cfg), 0.2)
    assert result.num_distinct == [3]  # 12 k-means clusters over 3 codes: three distinct centres
    np.testing.assert_array_equal(result.centers[0][result.im2center[0]], codes)
