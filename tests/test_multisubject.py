"""Multi-subject trials and their collation (fmrirecon.data.multisubject)."""

import numpy as np
import pytest
import torch

from fmrirecon.data.multisubject import MultiSubjectTrials, collate_subjects


def _parts():
    rng = np.random.default_rng(0)
    return [
        (1, rng.standard_normal((3, 5)).astype(np.float32), np.array([10, 30, 20])),
        (2, rng.standard_normal((2, 7)).astype(np.float32), np.array([30, 10])),
    ]


def test_items_pair_each_trial_with_its_image_target():
    targets, ids = torch.arange(3.0)[:, None] * 100, np.array([10, 20, 30])  # row r = image ids[r]
    data = MultiSubjectTrials(_parts(), targets, ids)
    assert len(data) == 5
    item = data[1]  # subject 1, trial 1: image 30 -> target row 2
    assert item["subject"] == 1 and item["target"].item() == 200.0 and item["betas"].shape == (5,)
    assert data[4]["subject"] == 2 and data[4]["target"].item() == 0.0 and data[4]["betas"].shape == (7,)


def test_collate_stacks_one_subject_and_keeps_a_list_for_mixed_voxel_counts():
    data = MultiSubjectTrials(_parts(), torch.zeros(3, 4), np.array([10, 20, 30]))
    same = collate_subjects([data[0], data[1]])
    assert same["betas"].shape == (2, 5) and same["target"].shape == (2, 4)
    mixed = collate_subjects([data[0], data[3]])
    assert isinstance(mixed["betas"], list) and [b.shape[0] for b in mixed["betas"]] == [5, 7]
    assert mixed["subject"].tolist() == [1, 2]


def test_a_trial_without_a_target_is_refused():
    with pytest.raises(ValueError, match=r"subj01: no target for image ids \[30\] \(of 1\)"):
        MultiSubjectTrials(_parts(), torch.zeros(2, 1), np.array([10, 20]))
