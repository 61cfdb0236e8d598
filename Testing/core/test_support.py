"""Support selection: the bracketing rule the method was calibrated with, labeled slices, the
ensemble subsets and external support."""

import numpy as np
import pytest

from UniverSegLogic.core.support import (
    ExternalSupport,
    bracketing_order,
    ensemble_subsets,
    labeled_slices_of,
    select_support,
)
from UniverSegLogic.errors import SupportError


def test_the_two_slices_that_enclose_a_target_come_first():
    # 10, 11, 12 are all nearer to 9 than 0 is, but 0 encloses 9 from below
    labeled = [0, 10, 11, 12]
    assert bracketing_order(9, labeled)[:2] == [0, 10]
    assert select_support(9, labeled, 2) == (0, 10)
    # nearest-first after the pair
    assert bracketing_order(9, labeled) == [0, 10, 11, 12]
    assert select_support(9, labeled, 3) == (0, 10, 11)


def test_beyond_the_painted_range_the_nearest_slices_serve():
    labeled = [4, 8, 20]
    assert select_support(2, labeled, 2) == (4, 8)
    assert select_support(25, labeled, 2) == (8, 20)
    assert select_support(25, labeled, 1) == (20,)
    assert select_support(6, labeled, 8) == (4, 8, 20)  # never more than there are


def test_support_size_must_be_positive():
    with pytest.raises(SupportError):
        select_support(3, [1, 5], 0)


def test_labeled_slices_are_the_painted_ones_plus_the_listed_ones():
    stack = np.zeros((10, 4, 4), bool)
    stack[2, 1, 1] = stack[7, 2, 2] = True
    assert labeled_slices_of(stack) == [2, 7]
    assert labeled_slices_of(stack, [9]) == [2, 7, 9]  # 9 is labeled background
    assert labeled_slices_of(stack, [7]) == [2, 7]  # 2 is painted: never dropped
    with pytest.raises(SupportError, match="outside 0..9"):
        labeled_slices_of(stack, [10])
    with pytest.raises(SupportError, match="not a slice number"):
        labeled_slices_of(stack, ["3"])
    with pytest.raises(SupportError, match="no labeled slice"):
        labeled_slices_of(np.zeros((3, 2, 2), bool))


def test_ensemble_subsets_keep_the_bracketing_pair():
    support = (3, 7, 1, 12, 15)
    subsets = ensemble_subsets(support, 4, seed=1)
    assert subsets[0] == support and len(subsets) == 4
    assert all(len(s) == 4 for s in subsets[1:])  # round(0.75 * 5)
    assert ensemble_subsets((3, 7), 5) == [(3, 7)]  # nothing to drop from a pair
    assert ensemble_subsets(support, 4, seed=1) == subsets  # seeded


def test_external_support_picks_the_nearest_relative_positions():
    ext = ExternalSupport(
        np.zeros((4, 1, 8, 8)), np.zeros((4, 1, 8, 8)), np.array([0.1, 0.4, 0.5, 0.9])
    )
    assert list(ext.nearest(0.45, 2)) == [1, 2]
    assert list(ext.nearest(1.0, 1)) == [3]
