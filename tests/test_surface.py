"""2-D activation maps: the voxel -> template projection and the Gaussian-splat SheetProjector."""

import numpy as np
import pytest
import torch

from fmrirecon.data import surface as S
from fmrirecon.data.brain import make_subjects
from fmrirecon.errors import SubjectMismatchError


@pytest.fixture(scope="module")
def subjects():
    return make_subjects(2, seed=4, n_voxels_base=700)


def test_polar_template_round_trip():
    rng = np.random.default_rng(0)
    hemi = rng.choice([-1, 1], 200)
    rho, psi = rng.uniform(0, 1.1, 200), rng.uniform(-np.pi, np.pi, 200)
    xy = S.template_from_polar(hemi, rho, psi)
    assert (xy[hemi == -1, 0] < 0).all() and (xy[hemi == 1, 0] > 0).all()
    h2, rho2, psi2 = S.polar_from_template(xy)
    np.testing.assert_array_equal(h2, hemi)
    np.testing.assert_allclose(rho2, rho, atol=1e-12)
    np.testing.assert_allclose(np.angle(np.exp(1j * (psi2 - psi))), 0, atol=1e-9)
    # Dorsal (psi = +pi/2) is up, lateral points away from the midline in both hemispheres.
    np.testing.assert_allclose(
        S.template_from_polar([1, -1], np.array([1.0, 1.0]), np.array([0.0, 0.0])),
        [[S.HEMISPHERE_OFFSET + 1, 0], [-S.HEMISPHERE_OFFSET - 1, 0]],
    )


def test_fit_sphere_recovers_a_noisy_cap():
    rng = np.random.default_rng(1)
    centre, radius = np.array([12.0, -5.0, 3.0]), 17.0
    theta = rng.uniform(0, 1.2, 500)
    phi = rng.uniform(-np.pi, np.pi, 500)
    direction = np.stack([np.sin(theta) * np.cos(phi), -np.cos(theta), np.sin(theta) * np.sin(phi)], 1)
    points = centre + (radius + rng.normal(0, 0.3, 500))[:, None] * direction
    fitted_centre, fitted_radius = S.fit_sphere(points)
    np.testing.assert_allclose(fitted_centre, centre, atol=0.5)
    assert abs(fitted_radius - radius) < 0.5


def test_projection_recovers_the_simulated_sheet_layout(subjects):
    for subject in subjects:
        xy = S.project_to_template(subject.voxel_ijk, subject.affine)
        assert xy.shape == (subject.n_voxels, 2)
        # Hemispheres land on the right sides and the layout matches sheet_xy up to the subject warp.
        np.testing.assert_array_equal(np.sign(xy[:, 0]), subject.hemisphere)
        assert np.corrcoef(xy[:, 0], subject.sheet_xy[:, 0])[0, 1] > 0.98
        assert np.corrcoef(xy[:, 1], subject.sheet_xy[:, 1])[0, 1] > 0.98
        assert np.median(np.linalg.norm(xy - subject.sheet_xy, axis=1)) < 0.1


def test_projection_does_not_depend_on_where_the_slab_starts(subjects):
    subject = subjects[0]
    shifted = subject.affine.copy()
    shifted[:3, 3] += [7.0, -3.0, 11.0]
    np.testing.assert_allclose(
        S.project_to_template(subject.voxel_ijk, shifted),
        S.project_to_template(subject.voxel_ijk, subject.affine),
        atol=1e-6,
    )


def test_maps_have_the_documented_shape_and_grid(subjects):
    subject = subjects[0]
    projector = S.SheetProjector(subject.sheet_xy)
    betas = np.random.default_rng(0).normal(size=(3, subject.n_voxels)).astype(np.float32)
    maps = projector(betas)
    assert maps.shape == (3, 1, 256, 256) and maps.dtype == np.float32
    # Zero outside the cortical footprint, which covers both hemispheres but not the whole square.
    assert (maps[:, 0][:, ~projector.footprint] == 0).all()
    assert 0.2 < projector.footprint.mean() < 0.95
    assert projector.footprint[:, :128].any() and projector.footprint[:, 128:].any()
    grid = S.template_grid(256)
    assert grid[0, 0, 1] > grid[-1, 0, 1] and grid[0, 0, 0] < grid[0, -1, 0]  # row 0 dorsal, column 0 left


def test_splatting_is_a_normalised_average(subjects):
    subject = subjects[0]
    projector = S.SheetProjector(subject.sheet_xy, size=128)
    maps = projector(np.full((1, subject.n_voxels), 2.5, np.float32))
    np.testing.assert_allclose(maps[0, 0][projector.footprint], 2.5, rtol=1e-5)
    # A field linear in template x comes back as the pixel's template x (within the splat width).
    x_field = subject.sheet_xy[:, 0][None].astype(np.float32)
    maps = projector(x_field)[0, 0]
    pixel_x = S.template_grid(128)[..., 0]
    err = np.abs(maps - pixel_x)[projector.footprint]
    assert np.median(err) < projector.sigma


def test_same_grid_for_every_subject(subjects):
    # The same smooth template field seen through two subjects' voxels gives matching maps.
    def field(xy):
        return np.sin(3 * xy[:, 0]) + np.cos(4 * xy[:, 1])

    maps = []
    footprints = []
    for subject in subjects:
        projector = S.SheetProjector(subject.sheet_xy, size=96)
        maps.append(projector(field(subject.sheet_xy)[None].astype(np.float32))[0, 0])
        footprints.append(projector.footprint)
    both = footprints[0] & footprints[1]
    assert both.sum() > 0.6 * footprints[0].sum()
    assert np.corrcoef(maps[0][both], maps[1][both])[0, 1] > 0.95


def test_activation_map_function_and_torch_input(subjects):
    subject = subjects[1]
    betas = np.random.default_rng(2).normal(size=(2, subject.n_voxels)).astype(np.float32)
    expected = S.SheetProjector(subject.sheet_xy, size=64)(betas)
    np.testing.assert_allclose(S.activation_map(betas, subject.sheet_xy, size=64), expected)
    out = S.SheetProjector(subject.sheet_xy, size=64)(torch.from_numpy(betas))
    assert isinstance(out, torch.Tensor) and out.shape == (2, 1, 64, 64) and out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), expected)


def test_wrong_voxel_count_raises_subject_mismatch(subjects):
    projector = S.SheetProjector(subjects[0].sheet_xy, size=32)
    with pytest.raises(SubjectMismatchError, match=f"\\(B, {subjects[0].n_voxels}\\)"):
        projector(np.zeros((1, subjects[1].n_voxels), np.float32))
    with pytest.raises(ValueError, match=r"\(V, 2\)"):
        S.SheetProjector(np.zeros((10, 3)))


def test_projector_from_voxels_matches_the_projection(subjects):
    subject = subjects[0]
    projector = S.SheetProjector.from_voxels(subject.voxel_ijk, subject.affine, size=48)
    reference = S.SheetProjector(S.project_to_template(subject.voxel_ijk, subject.affine), size=48)
    betas = np.random.default_rng(3).normal(size=(2, subject.n_voxels)).astype(np.float32)
    np.testing.assert_allclose(projector(betas), reference(betas))


def test_flat_voxel_sets_fall_back_to_the_centroid():
    # A flat slab per hemisphere: a sphere fit degenerates, the projection must still give finite coordinates.
    ijk = np.array([(i, 0, k) for i in list(range(0, 6)) + list(range(10, 16)) for k in range(6)])
    xy = S.project_to_template(ijk, np.diag([1.8, 1.8, 1.8, 1.0]))
    assert np.isfinite(xy).all()
    np.testing.assert_array_equal(xy[:, 0] < 0, ijk[:, 0] < 8)
