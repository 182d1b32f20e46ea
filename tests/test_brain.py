"""Simulated subjects: anatomy, NSD ROI coding, the pixel-only encoding model, noise, sessions, rest runs."""

import json

import numpy as np
import torch
import pytest

from fmrirecon.data import brain as B
from fmrirecon.data import world as W
from fmrirecon.errors import ConfigError


@pytest.fixture(scope="module")
def subjects():
    return B.make_subjects(3, seed=0, n_voxels_base=800)


@pytest.fixture(scope="module")
def subject(subjects):
    return subjects[0]


@pytest.fixture(scope="module")
def scenes():
    return W.make_world(240, image_size=64, seed=21)


def _column_corr(a, b):
    a, b = a - a.mean(0), b - b.mean(0)
    return (a * b).sum(0) / np.sqrt((a * a).sum(0) * (b * b).sum(0))


# ------------------------------------------------------------------------------------------- anatomy
def test_voxel_counts_and_grids_differ_pairwise(subjects):
    counts = [s.n_voxels for s in subjects]
    assert len(set(counts)) == len(counts)
    assert [s.subject for s in subjects] == [1, 2, 3]
    # NSD's subj01..03 nsdgeneral ratios (15724 : 14278 : 15226).
    assert counts == [800, round(800 * 14278 / 15724), round(800 * 15226 / 15724)]
    assert len({s.grid_shape for s in subjects}) == len(subjects)
    for s in subjects:
        assert s.voxel_ijk.shape == (s.n_voxels, 3) and s.sheet_xy.shape == (s.n_voxels, 2)


def test_default_counts_are_in_the_thousands():
    counts = B.subject_voxel_counts(8)
    assert len(set(counts)) == 8 and min(counts) >= 1000 and max(counts) <= 3000
    assert len(set(B.subject_voxel_counts(20, 1000))) == 20


def test_affine_is_lpi_identity_like_with_origin_at_slab_centre(subject):
    a = subject.affine
    np.testing.assert_allclose(a[:3, :3], np.eye(3) * 1.8)
    centre = (np.array(subject.grid_shape) - 1) / 2
    np.testing.assert_allclose(a[:3, :3] @ centre + a[:3, 3], 0, atol=1e-9)


def test_voxels_are_the_nsdgeneral_mask_in_volume_order(subject):
    general = subject.roi_volume("nsdgeneral")
    assert set(np.unique(general)) == {-1.0, 0.0, 1.0}
    # The order `volume[mask]` gives, so an NSD reader extracts betas in the same column order.
    np.testing.assert_array_equal(np.argwhere(general == 1), subject.voxel_ijk)
    # Cortex continues outside nsdgeneral (value 0), and all cortex lies inside the brain mask.
    mask = subject.brainmask_volume()
    assert mask.dtype == bool and mask.shape == subject.grid_shape
    assert (general == 0).sum() > 0
    assert mask[general >= 0].all() and (mask & (general < 0)).sum() > 0


@pytest.mark.parametrize("name", list(B.ROI_LABELS))
def test_roi_volumes_use_nsd_coding_and_label_names(subject, name):
    labels = subject.roi_labels(name)
    assert tuple(labels) == B.ROI_LABELS[name]
    volume = subject.roi_volume(name)
    assert volume.shape == subject.grid_shape
    values = set(np.unique(volume).astype(int))
    assert values <= {-1, 0, *range(1, len(labels) + 1)}
    # Every label is drawn for this subject (inside the cortex).
    assert set(range(1, len(labels) + 1)) <= values
    # Same -1 (non-cortex) footprint in every ROI file.
    np.testing.assert_array_equal(volume < 0, subject.roi_volume("nsdgeneral") < 0)


def test_roi_names_match_the_nsd_table():
    assert B.ROI_LABELS["prf-visualrois"] == ("V1v", "V1d", "V2v", "V2d", "V3v", "V3d", "hV4")
    assert B.ROI_LABELS["floc-faces"] == ("OFA", "FFA-1", "FFA-2", "mTL-faces", "aTL-faces")
    assert B.ROI_LABELS["floc-bodies"] == ("EBA", "FBA-1", "FBA-2", "mTL-bodies")
    assert B.ROI_LABELS["floc-places"] == ("OPA", "PPA", "RSC")
    assert B.ROI_LABELS["floc-words"] == ("OWFA", "VWFA-1", "VWFA-2", "mfs-words", "mTL-words")


def test_hemisphere_volumes_combine_like_nsd(subject):
    lh, rh, both = (subject.roi_volume(p + "prf-visualrois") for p in ("lh.", "rh.", ""))
    assert (lh >= 0).sum() > 0 and (rh >= 0).sum() > 0
    assert not ((lh >= 0) & (rh >= 0)).any()
    # NSD's combined file: the LH volume with its -1 voxels filled from the RH volume.
    np.testing.assert_array_equal(np.where(lh >= 0, lh, rh), both)


def test_visual_areas_and_receptive_fields(subject):
    masks = subject.visual_area_masks()
    assert all(masks[a].sum() > 10 for a in ("V1", "V2", "V3", "V4", "higher"))
    sizes = [np.mean(subject.rf_sigma[masks[a]]) for a in ("V1", "V2", "V3", "V4")]
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1] / 1.5
    # Contralateral hemifield: the left hemisphere sees the right side of the image.
    retino = subject.voxel_class == 0
    assert (subject.rf_xy[retino & (subject.hemisphere == -1), 0] > 0).all()
    assert (subject.rf_xy[retino & (subject.hemisphere == 1), 0] < 0).all()
    # RF centres vary smoothly on the sheet: V1 neighbours (< 0.1 template units) have close centres.
    v1 = np.flatnonzero(masks["V1"])
    xy, rf = subject.sheet_xy[v1], subject.rf_xy[v1]
    dist = np.linalg.norm(xy[:, None] - xy[None], axis=-1)
    rf_dist = np.linalg.norm(rf[:, None] - rf[None], axis=-1)
    assert rf_dist[(dist > 0) & (dist < 0.1)].mean() < 0.3 * rf_dist.mean()


# ------------------------------------------------------------------------------------------- encoding
def test_response_is_deterministic_pixel_only_and_batch_independent(subject, scenes):
    images = scenes.images[:40]
    r = subject.response(images)
    assert r.shape == (40, subject.n_voxels) and r.dtype == np.float32
    np.testing.assert_array_equal(r, subject.response(images))
    np.testing.assert_allclose(subject.response(images[::-1]), r[::-1], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(subject.response(images[[7, 7]]), r[[7, 7]], rtol=1e-5, atol=1e-5)
    # Same pixels -> same response, whatever scene graph produced them.
    copy = np.ascontiguousarray(images.copy())
    np.testing.assert_array_equal(subject.response(copy), r)


def test_response_magnitudes_are_psc_like(subject, scenes):
    r = subject.response(scenes.images)
    assert np.isfinite(r).all()
    assert 0.3 < r.mean() < 3.0 and np.abs(r).max() < 40


def test_changing_the_category_moves_category_voxels_more_than_low_level_ones(subject):
    rng = np.random.default_rng(0)
    first, second = [], []
    for _ in range(40):
        spec = W.sample_scene(rng)
        obj = spec.objects[0]
        other = str(rng.choice([c for c in W.CATEGORIES if c != obj.category]))
        swapped = W.SceneSpec(
            spec.background,
            (W.ObjectSpec(other, obj.colour, obj.size, obj.x, obj.y), *spec.objects[1:]),
            spec.ground,
            spec.texture_seed,
        )
        first.append(W.render_scene(spec))
        second.append(W.render_scene(swapped))
    change = np.abs(subject.response(np.stack(first)) - subject.response(np.stack(second))).mean(0)
    change /= subject.amplitude  # in units of each voxel's signal SD
    retinotopic = change[subject.voxel_class == 0].mean()
    category = change[subject.voxel_class == 1].mean()
    assert category > 2 * retinotopic


def test_floc_face_voxels_prefer_faces(subject, scenes):
    r = subject.response(scenes.images)
    has_face = scenes.things[:, W.CATEGORIES.index("face")]
    has_sign = scenes.things[:, W.CATEGORIES.index("sign")]
    faces = (subject.roi_vector("floc-faces") > 0) & (subject.voxel_class == 1)
    words = (subject.roi_vector("floc-words") > 0) & (subject.voxel_class == 1)
    face_effect = (r[has_face].mean(0) - r[~has_face].mean(0)) / subject.amplitude
    sign_effect = (r[has_sign].mean(0) - r[~has_sign].mean(0)) / subject.amplitude
    assert face_effect[faces].mean() > 0.8 and face_effect[faces].mean() > 3 * abs(face_effect[words].mean())
    assert sign_effect[words].mean() > 0.8 and sign_effect[words].mean() > 3 * abs(sign_effect[faces].mean())


def test_retinotopic_voxels_respond_to_their_receptive_field(subject):
    ecc = np.hypot(*subject.rf_xy.T)
    voxels = np.flatnonzero(subject.visual_area_masks()["V1"] & (ecc > 0.3) & (ecc < 0.8))[:40]
    assert len(voxels) >= 10
    yy, xx = np.mgrid[:64, :64]
    images = []
    for v in voxels:
        for sign in (1, -1):  # a white disc at the RF centre, then at the point-mirrored position
            cx, cy = (sign * subject.rf_xy[v] + 1) * 32
            img = np.full((64, 64, 3), 128, np.uint8)
            img[np.hypot(xx - cx, yy - cy) < 6] = 255
            images.append(img)
    r = subject.response(np.stack(images)).reshape(len(voxels), 2, -1)
    rows = np.arange(len(voxels))
    assert (r[rows, 0, voxels] > r[rows, 1, voxels]).mean() >= 0.9


# ------------------------------------------------------------------------------------------- measurement
def test_session_effects_shift_raw_means_and_zscoring_removes_them(subject, scenes):
    images = scenes.images[:120]
    rng = np.random.default_rng(1)
    s1 = subject.measure(images, np.ones(120, int), rng)
    s2 = subject.measure(images, np.full(120, 2), rng)
    s1_again = subject.measure(images, np.ones(120, int), rng)
    between = np.abs(s1.mean(0) - s2.mean(0)).mean()
    within = np.abs(s1.mean(0) - s1_again.mean(0)).mean()
    assert between > 4 * within

    def zscore(x):
        return (x - x.mean(0)) / x.std(0)

    # After per-session z-scoring, sessions agree as well as repeats within a session do.
    signal = subject.snr > 1.0
    across = np.median(_column_corr(zscore(s1), zscore(s2))[signal])
    same = np.median(_column_corr(zscore(s1), zscore(s1_again))[signal])
    assert across > 0.8 * same
    # Session effects are fixed per subject and session, not drawn from the trial rng: a rebuilt subject that
    # first measures with another trial stream gets the same effects.
    rebuilt = B.SimulatedSubject.from_spec(subject.spec)
    rebuilt.measure(images[:5], np.full(5, 3), np.random.default_rng(99))
    for session in (2, 3):
        for mine, theirs in zip(rebuilt.session_effects(session), subject.session_effects(session)):
            np.testing.assert_array_equal(mine, theirs)
    scale, offset = subject.session_effects(3)
    assert scale.shape == offset.shape == (subject.n_voxels,) and (scale > 0).all()


def test_trial_noise_is_independent_per_repeat_and_seeded(subject, scenes):
    images = scenes.images[:30]
    sessions = np.ones(30, int)
    a = subject.measure(images, sessions, np.random.default_rng(5))
    b = subject.measure(images, sessions, np.random.default_rng(5))
    c = subject.measure(images, sessions, np.random.default_rng(6))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    noise = (a - c).std(0) / np.sqrt(2)
    np.testing.assert_allclose(np.median(noise / subject.noise_sd), 1.0, atol=0.15)


def test_low_snr_voxels_have_low_test_retest_reliability(subject, scenes):
    rng = np.random.default_rng(2)
    sessions = np.ones(len(scenes), int)
    rep1 = subject.measure(scenes.images, sessions, rng)
    rep2 = subject.measure(scenes.images, sessions, rng)
    reliability = _column_corr(rep1, rep2)
    noise_only = subject.snr < 0.05
    strong = subject.snr > 1.5
    assert noise_only.sum() > 20 and strong.sum() > 20
    assert abs(reliability[noise_only].mean()) < 0.05
    assert reliability[strong].mean() > 0.5
    assert np.corrcoef(np.log(subject.snr), reliability)[0, 1] > 0.6


def test_rest_runs_are_spatially_smooth_and_temporally_correlated(subject):
    rest = subject.rest_run(200, np.random.default_rng(3))
    assert rest.shape == (200, subject.n_voxels) and rest.dtype == np.float32
    corr = np.corrcoef(rest.T)
    dist = np.linalg.norm(subject.sheet_xy[:, None] - subject.sheet_xy[None], axis=-1)
    near = corr[(dist > 0) & (dist < 0.08)].mean()
    far = corr[dist > 0.6].mean()
    assert near > 0.5 and abs(far) < 0.1
    lag1 = np.mean(_column_corr(rest[:-1], rest[1:]))
    assert 0.3 < lag1 < 0.8
    np.testing.assert_array_equal(rest, subject.rest_run(200, np.random.default_rng(3)))


# ------------------------------------------------------------------------------------------- spec / errors
def test_spec_round_trip_rebuilds_the_identical_subject(subject, scenes):
    spec = json.loads(json.dumps(subject.spec))
    rebuilt = B.SimulatedSubject.from_spec(spec)
    assert rebuilt.grid_shape == subject.grid_shape and rebuilt.n_voxels == subject.n_voxels
    np.testing.assert_array_equal(rebuilt.voxel_ijk, subject.voxel_ijk)
    np.testing.assert_array_equal(rebuilt.sheet_xy, subject.sheet_xy)
    np.testing.assert_array_equal(rebuilt.roi_volume("floc-places"), subject.roi_volume("floc-places"))
    np.testing.assert_array_equal(rebuilt.response(scenes.images[:10]), subject.response(scenes.images[:10]))
    np.testing.assert_array_equal(rebuilt.session_effects(4)[0], subject.session_effects(4)[0])


def _assert_same_state(a, b, where):
    """Every array, tensor, number and string of two subjects' state is equal (recursing into containers)."""
    assert type(a) is type(b), where
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _assert_same_state(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_state(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, np.ndarray):
        np.testing.assert_array_equal(a, b, err_msg=where)
    elif callable(a):
        return  # bound helpers (the warp function) are rebuilt from the compared seed and parameters
    else:
        assert a == b, where


def test_same_seed_same_subjects_other_seed_other_anatomy(subjects):
    again = B.make_subjects(1, seed=0, n_voxels_base=800)[0]
    # two fresh builds (the fixture's subject may have filled its lazy session cache in other tests)
    _assert_same_state(vars(again), vars(B.make_subjects(1, seed=0, n_voxels_base=800)[0]), "subject")
    np.testing.assert_array_equal(again.voxel_ijk, subjects[0].voxel_ijk)
    other = B.make_subjects(1, seed=1, n_voxels_base=800)[0]
    assert other.n_voxels == subjects[0].n_voxels
    assert not np.allclose(other.sheet_xy, subjects[0].sheet_xy)


def test_bad_inputs_raise_errors_that_say_what_was_expected(subject):
    with pytest.raises(ConfigError, match="unknown ROI 'floc-cars'"):
        subject.roi_volume("floc-cars")
    with pytest.raises(ValueError, match=r"uint8 \(N, H, W, 3\)"):
        subject.response(np.zeros((2, 64, 64), np.uint8))
    with pytest.raises(ValueError, match="dtype float32"):
        subject.response(np.zeros((2, 64, 64, 3), np.float32))
    with pytest.raises(ValueError, match="sessions are 1-based"):
        subject.measure(np.zeros((1, 64, 64, 3), np.uint8), np.array([0]), np.random.default_rng(0))
    with pytest.raises(ConfigError, match="format"):
        B.SimulatedSubject.from_spec({"format": "something-else", "version": 1})
    with pytest.raises(ConfigError, match="invalid simulated-subject spec"):
        B.SimulatedSubject.from_spec({**subject.spec, "colour": "blue"})
    with pytest.raises(ConfigError, match="n_voxels"):
        B.SimulatedSubject(1, 10, seed=0)
