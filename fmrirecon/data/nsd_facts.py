"""Facts about the Natural Scenes Dataset (Allen et al. 2022), one table (STYLE.md §16).

Sources: ``reference/dataset-formats.md`` §1.0 (core sessions, NSD technical notes) and §1.9 (nsdgeneral
voxel counts at func1pt8mm, hard-coded in MindEye1 ``Train_MindEye.py``, printed in MindEyeV2 Train.ipynb).
Code that needs a count for a real subject reads it here; a prepared store's own files always win over this
table (it is for defaults, size presets and simulated subjects that mimic NSD's spread).
"""

from __future__ import annotations

__all__ = ["NSD_SUBJECTS", "NSDGENERAL_VOXELS", "SESSIONS", "SHARED_IMAGES_SEEN"]

NSD_SUBJECTS = (1, 2, 3, 4, 5, 6, 7, 8)

# nsdgeneral ROI voxel counts (func1pt8mm, mask == 1) per subject (dataset-formats.md §1.9).
NSDGENERAL_VOXELS: dict[int, int] = {
    1: 15724,
    2: 14278,
    3: 15226,
    4: 13153,
    5: 13039,
    6: 17907,
    7: 12682,
    8: 14386,
}

# Core scan sessions completed per subject (dataset-formats.md §1.0; MindEyeV2 ``nsessions_allsubj``).
SESSIONS: dict[int, int] = {1: 40, 2: 40, 3: 32, 4: 30, 5: 40, 6: 32, 7: 40, 8: 30}

# Shared (shared1000) images each subject saw at least once over all sessions (dataset-formats.md §1.9).
SHARED_IMAGES_SEEN: dict[int, int] = {1: 1000, 2: 1000, 3: 930, 4: 907, 5: 1000, 6: 930, 7: 1000, 8: 907}
