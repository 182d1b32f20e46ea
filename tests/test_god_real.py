"""Real GOD as users hold it: BData + imageID tables + ImageNet JPEGs in sub-folders (no images.hdf5), and
the MinD-Vis npz release. The prepared stores are compared with the one prepared from the same data through
the synthetic world's images.hdf5.

JPEG loss (stated): stimuli are saved at quality 95 without chroma subsampling; after decoding, centre crop
and (no-op or shared) resize, each image differs from the images.hdf5 one by at most 4/255 on average per
image, 40/255 at any pixel, and by PSNR >= 33 dB (measured: mean 2.4/255, max 20/255, min PSNR 36 dB at
32 px). A crop one pixel off lets the noise border in (per-image mean >= 8/255, max >= 187/255), so these
bounds check the crop.
"""

from __future__ import annotations

import json
import shutil

import h5py
import numpy as np
import pytest
from PIL import Image

from fmrirecon.cli import main
from fmrirecon.data.god import prepare_god, read_god, subject_file, write_synthetic_god
from fmrirecon.data.god_stimuli import (
    center_crop_resize,
    load_stimulus,
    read_class_names,
    read_image_table,
    read_stimulus_labels,
)
from fmrirecon.data.store import PreparedStore
from fmrirecon.errors import DatasetLayoutError

SIZE = 32  # the world's image side
BORDER = 16  # noise border of the JPEG canvases (a multiple of the 8 px JPEG block: no bleed into the crop)
JPEG_MEAN_TOL, JPEG_MAX_TOL, JPEG_PSNR_MIN = 4.0, 40.0, 33.0


def _rows_by_id(images_ids, ids):
    return np.array([int(np.argmin(np.abs(images_ids - i))) for i in ids])


@pytest.fixture(scope="module")
def god_user(tmp_path_factory):
    """(base, world root with images.hdf5, user folder without it, stimulus folder, class table)."""
    base = tmp_path_factory.mktemp("god_real")
    root = write_synthetic_god(
        base / "world",
        n_subjects=2,
        n_train=40,
        n_test=6,
        test_repeats=4,
        run_length=12,
        image_size=SIZE,
        n_voxels_base=250,
        progress=False,
    )
    with h5py.File(root / "images.hdf5", "r") as f:
        world_images, world_ids = f["images"][()], f["stimulus_id"][()]
    user, stimuli = base / "user", base / "stimuli"
    user.mkdir()
    for path in root.glob("Subject*.h5"):
        shutil.copy(path, user / path.name)
    rng = np.random.default_rng(0)
    wnids = set()
    for split in ("training", "test"):
        shutil.copy(root / f"imageID_{split}.csv", user)
        ids, names = read_image_table(root / f"imageID_{split}.csv")
        for k, (row, name) in enumerate(zip(_rows_by_id(world_ids, ids), names)):
            # ImageNet-like: landscape and portrait pictures, one folder per WordNet id
            wide = k % 2 == 0
            shape = (SIZE, SIZE + 2 * BORDER, 3) if wide else (SIZE + 2 * BORDER, SIZE, 3)
            canvas = rng.integers(0, 256, shape, dtype=np.uint8)
            if wide:
                canvas[:, BORDER : BORDER + SIZE] = world_images[row]
            else:
                canvas[BORDER : BORDER + SIZE] = world_images[row]
            wnid = name.split("_")[0]
            wnids.add(wnid)
            folder = stimuli / split / wnid
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(canvas).save(folder / name, format="JPEG", quality=95, subsampling=0)
    table = base / "synset_words.txt"
    table.write_text("".join(f"{w} class of {w}, a test name\n" for w in sorted(wnids)))
    assert not (user / "images.hdf5").exists()
    return base, root, user, stimuli, table


def _store_arrays(path):
    store = PreparedStore(path)
    subjects = {}
    for s in store.subjects:
        with h5py.File(path / f"subj{s:02d}.hdf5", "r") as f:
            subjects[s] = {
                "betas": f["betas"][()],
                **{f"trials/{k}": f["trials"][k][()] for k in f["trials"]},
                "voxel_ijk": f["voxel_ijk"][()],
                "affine": f["affine"][()],
                **{f"rois/{k}": f["rois"][k][()] for k in f["rois"]},
            }
    with h5py.File(path / "stimuli.hdf5", "r") as f:
        images = f["images"][()]
        captions = f["captions"].asstr()[()]
    return store, subjects, images, captions, read_stimulus_labels(path)


def _assert_jpeg_close(a, b):
    a, b = a.astype(np.float64), b.astype(np.float64)
    assert a.shape == b.shape
    diff = np.abs(a - b)
    psnr = 10 * np.log10(255.0**2 / np.maximum(((a - b) ** 2).mean(axis=(1, 2, 3)), 1e-12))
    assert diff.mean(axis=(1, 2, 3)).max() <= JPEG_MEAN_TOL
    assert diff.max() <= JPEG_MAX_TOL
    assert psnr.min() >= JPEG_PSNR_MIN


@pytest.mark.parametrize("image_size", [SIZE, 24])
def test_store_from_jpeg_folder_equals_store_from_images_hdf5(god_user, image_size):
    base, root, user, stimuli, table = god_user
    ref = prepare_god(
        root, base / f"ref{image_size}", image_size=image_size, class_names=table, progress=False
    )
    got = prepare_god(
        user,
        base / f"jpg{image_size}",
        images=stimuli,
        image_size=image_size,
        class_names=table,
        progress=False,
    )
    ref_store, ref_subjects, ref_images, _, ref_labels = _store_arrays(ref)
    got_store, got_subjects, got_images, got_captions, got_labels = _store_arrays(got)
    assert got_store.subjects == ref_store.subjects == [1, 2]
    assert got_store.manifest["sessions"] == ref_store.manifest["sessions"]
    # betas, trial tables, voxels and ROIs are the same arrays, bit for bit
    for s in ref_subjects:
        assert ref_subjects[s].keys() == got_subjects[s].keys()
        for key, value in ref_subjects[s].items():
            np.testing.assert_array_equal(got_subjects[s][key], value, err_msg=f"subject {s} {key}")
    # every image carries the same labels; the pixels differ only by JPEG loss
    for key in ("ids_73k", "stimulus_id", "file_name", "wnid", "class_name"):
        np.testing.assert_array_equal(got_labels[key], ref_labels[key], err_msg=key)
    assert got_images.shape == (46, image_size, image_size, 3)
    _assert_jpeg_close(got_images, ref_images)
    assert (got_captions == "").all()  # GOD has no captions
    assert got_store.manifest["stimuli"]["image_size"] == image_size


def test_bdpy_variants_of_the_bdata_layout_prepare_the_same_store(god_user):
    """Per-sample columns before the voxels, variable-length string keys, /header and /vmap groups: the
    column order and extras bdpy files may carry change nothing in the store."""
    base, root, user, stimuli, _ = god_user
    variant = base / "bdpy_variant"
    shutil.copytree(user, variant)
    for s in (1, 2):
        with h5py.File(user / f"Subject{s}.h5", "r") as f:
            dataset, keys = f["dataset"][()], [k.decode() for k in f["metadata/key"][()]]
            description, value = f["metadata/description"][()], f["metadata/value"][()]
        voxel = value[keys.index("VoxelData")] == 1
        order = np.concatenate([np.flatnonzero(~voxel), np.flatnonzero(voxel)])  # samples first
        with h5py.File(variant / f"Subject{s}.h5", "w") as f:
            f["dataset"] = dataset[:, order]
            f.create_dataset("metadata/key", data=np.array(keys, dtype=object), dtype=h5py.string_dtype())
            f["metadata/description"] = description
            f["metadata/value"] = value[:, order]
            f["header/ctime"] = b"2017-01-01 00:00:00"
            f["vmap/stimulus_id/1"] = b"n01518878_5958.JPEG"
    ref = _store_arrays(prepare_god(root, base / "bdpy_ref", image_size=16, progress=False))
    got = _store_arrays(
        prepare_god(variant, base / "bdpy_got", images=stimuli, image_size=16, progress=False)
    )
    for s in (1, 2):
        for key, array in ref[1][s].items():
            np.testing.assert_array_equal(got[1][s][key], array, err_msg=f"subject {s} {key}")


def test_store_labels_are_the_wordnet_ids_of_the_tables(god_user):
    base, _, user, stimuli, table = god_user
    out = prepare_god(user, base / "labels", images=stimuli, image_size=16, class_names=table, progress=False)
    labels = read_stimulus_labels(out)
    rows = []
    for split in ("training", "test"):
        rows += [line.split(",") for line in (user / f"imageID_{split}.csv").read_text().splitlines()]
    names = [r[1].strip('"') for r in rows]
    assert labels["file_name"].tolist() == names
    assert labels["wnid"].tolist() == [n.split("_")[0] for n in names]
    np.testing.assert_allclose(labels["stimulus_id"], [float(r[0]) for r in rows], atol=0)
    assert labels["class_name"].tolist() == [f"class of {n.split('_')[0]}, a test name" for n in names]
    # without a class table the names are empty, the WordNet ids stay
    bare = read_stimulus_labels(prepare_god(user, base / "bare", images=stimuli, progress=False))
    assert (bare["class_name"] == "").all() and bare["wnid"].tolist() == labels["wnid"].tolist()
    assert PreparedStore(base / "bare").image_shape == (256, 256, 3)  # the default size


def test_center_crop_matches_slicing_and_pil():
    rng = np.random.default_rng(3)
    wide = rng.integers(0, 256, (7, 12, 3), dtype=np.uint8)
    np.testing.assert_array_equal(center_crop_resize(wide, None), wide[:, 2:9])  # floor((12 - 7) / 2) = 2
    tall = rng.integers(0, 256, (13, 6, 3), dtype=np.uint8)
    np.testing.assert_array_equal(center_crop_resize(tall, None), tall[3:9])
    expected = np.asarray(Image.fromarray(np.ascontiguousarray(wide[:, 2:9])).resize((5, 5), Image.BICUBIC))
    np.testing.assert_array_equal(center_crop_resize(wide, 5), expected)
    grey = rng.integers(0, 256, (6, 6), dtype=np.uint8)
    out = center_crop_resize(grey, None)
    assert out.shape == (6, 6, 3) and all((out[..., c] == grey).all() for c in range(3))


def test_grey_and_cmyk_jpegs_decode_to_rgb(tmp_path):
    grey = np.tile(np.arange(0, 256, 16, dtype=np.uint8), (16, 1))
    Image.fromarray(grey, "L").save(tmp_path / "grey.JPEG", quality=100)
    out = load_stimulus(tmp_path / "grey.JPEG", None)
    assert out.shape == (16, 16, 3) and (out[..., 0] == out[..., 2]).all()
    assert np.abs(out[..., 0].astype(int) - grey).max() <= 3
    Image.new("CMYK", (20, 10), (0, 255, 255, 0)).save(tmp_path / "cmyk.JPEG")  # pure red in CMYK
    red = load_stimulus(tmp_path / "cmyk.JPEG", 4)
    assert red.shape == (4, 4, 3) and red[..., 0].min() > 200 and red[..., 1:].max() < 60


def test_class_name_tables(tmp_path):
    mindvis = tmp_path / "imagenet_class_index.json"
    mindvis.write_text(
        json.dumps({"0": ["n01440764", "tench"], "34": ["n01665541", "n01664990", "leatherback"]})
    )
    assert read_class_names(mindvis) == {
        "n01440764": "tench",
        "n01665541": "leatherback",
        "n01664990": "leatherback",
    }
    words = tmp_path / "words.txt"
    words.write_text("n00001740\tentity\nn01518878 ostrich, Struthio camelus\n")
    assert read_class_names(words) == {"n00001740": "entity", "n01518878": "ostrich, Struthio camelus"}
    (tmp_path / "empty.txt").write_text("nothing here\n")
    with pytest.raises(DatasetLayoutError, match="no WordNet id"):
        read_class_names(tmp_path / "empty.txt")


def _copy_user(god_user, name):
    base, _, user, stimuli, _ = god_user
    target = base / name
    shutil.copytree(user, target / "user")
    shutil.copytree(stimuli, target / "stimuli")
    return target / "user", target / "stimuli"


def test_missing_stimuli_are_named_and_counted(god_user):
    user, stimuli = _copy_user(god_user, "missing")
    files = sorted(stimuli.rglob("*.JPEG"))
    for path in files[:7]:
        path.unlink()
    with pytest.raises(
        DatasetLayoutError, match=r"7 of 46 stimulus images named in imageID_training\.csv"
    ) as err:
        prepare_god(user, user.parent / "store", images=stimuli, progress=False)
    message = str(err.value)
    assert files[0].name in message and "..." in message and str(stimuli) in message
    assert not (user.parent / "store").exists()


def test_other_suffix_is_found_by_stem(god_user):
    user, stimuli = _copy_user(god_user, "suffix")
    path = next(stimuli.rglob("*.JPEG"))
    path.rename(path.with_suffix(".jpg"))
    store = prepare_god(user, user.parent / "store", images=stimuli, image_size=8, progress=False)
    assert PreparedStore(store).image_shape == (8, 8, 3)


def test_table_whose_ids_match_no_sample(god_user):
    user, stimuli = _copy_user(god_user, "wrong_table")
    lines = (user / "imageID_test.csv").read_text().splitlines()
    wrong = [f'{9000000 + k}.000001,"n{9000000 + k:08d}_1.JPEG"' for k in range(len(lines))]
    (user / "imageID_test.csv").write_text("\n".join(wrong) + "\n")
    for k in range(len(lines)):
        folder = stimuli / "test" / f"n{9000000 + k:08d}"
        folder.mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(folder / f"n{9000000 + k:08d}_1.JPEG")
    with pytest.raises(
        DatasetLayoutError, match=r"imageID_test\.csv: none of its 6 stimulus ids .*Subject1\.h5"
    ):
        prepare_god(user, user.parent / "store", images=stimuli, progress=False)


def test_undecodable_and_truncated_images(god_user):
    user, stimuli = _copy_user(god_user, "broken")
    files = sorted(stimuli.rglob("*.JPEG"))
    original = files[3].read_bytes()
    files[3].write_bytes(b"not a jpeg at all" * 10)
    with pytest.raises(DatasetLayoutError, match=rf"cannot decode stimulus image .*{files[3].name}"):
        prepare_god(user, user.parent / "store", images=stimuli, progress=False)
    files[3].write_bytes(original)
    files[5].write_bytes(files[5].read_bytes()[:200])  # a valid header, the data cut short
    with pytest.raises(DatasetLayoutError, match=rf"cannot decode stimulus image .*{files[5].name}"):
        prepare_god(user, user.parent / "store", images=stimuli, progress=False)
    assert not (user.parent / "store").exists()


def test_layout_errors_name_what_is_missing(god_user):
    base, _, user, stimuli, _ = god_user
    with pytest.raises(DatasetLayoutError, match=r"has no ROI 'ROI_XYZ'; found \[.*'ROI_VC'"):
        prepare_god(user, base / "noroi", images=stimuli, roi="ROI_XYZ", progress=False)
    with pytest.raises(DatasetLayoutError, match=r"pass --images DIR"):
        prepare_god(user, base / "noimages", progress=False)
    bare = base / "no_tables"
    bare.mkdir()
    shutil.copy(user / "Subject1.h5", bare)
    with pytest.raises(DatasetLayoutError, match=r"missing GOD image table imageID_training\.csv"):
        prepare_god(bare, base / "notables", images=stimuli, progress=False)
    bad = base / "bad_name"
    shutil.copytree(user, bad)
    text = (bad / "imageID_test.csv").read_text().splitlines()
    sid = text[0].split(",")[0]
    text[0] = f'{sid},"n09999999_1.JPEG"'
    (bad / "imageID_test.csv").write_text("\n".join(text) + "\n")
    with pytest.raises(DatasetLayoutError, match="disagrees with its stimulus_id"):
        prepare_god(bad, base / "badname", images=stimuli, progress=False)


def test_cli_prepares_real_god_layout(god_user, capsys):
    base, _, user, stimuli, table = god_user
    out = base / "cli_store"
    args = ["prepare", "god", "--root", str(user), "--images", str(stimuli), "--out", str(out)]
    assert main([*args, "--image-size", "16", "--class-names", str(table), "--no-progress"]) == 0
    assert PreparedStore(out).image_shape == (16, 16, 3)
    assert read_stimulus_labels(out)["class_name"][0].startswith("class of n")
    # same settings: nothing to do; other settings: refused without --force
    assert main([*args, "--image-size", "16", "--class-names", str(table), "--no-progress"]) == 0
    assert main([*args, "--image-size", "8", "--no-progress"]) == 2
    assert "--force" in capsys.readouterr().err


# ---- MinD-Vis npz ------------------------------------------------------------------------------------------


def _write_mindvis(god_user, folder, *, single_trials=True, images_as="float 0-255"):
    """MinD-Vis' data/Kamitani/npz from the same synthetic GOD (the SelfSuperReconst arrangement)."""
    base, root, user, _, _ = god_user
    folder.mkdir()
    with h5py.File(root / "images.hdf5", "r") as f:
        world_images, world_ids = f["images"][()], f["stimulus_id"][()]
    train_ids, _ = read_image_table(user / "imageID_training.csv")
    test_ids, _ = read_image_table(user / "imageID_test.csv")
    train_images = world_images[_rows_by_id(world_ids, train_ids)]
    test_images = world_images[_rows_by_id(world_ids, test_ids)]
    convert = {
        "float 0-255": lambda x: x.astype(np.float32),  # MinD-Vis divides by 255
        "float 0-1": lambda x: x.astype(np.float32) / 255,  # SelfSuperReconst's images_112.npz
        "uint8": lambda x: x,
    }[images_as]
    np.savez(folder / "images_256.npz", train_images=convert(train_images), test_images=convert(test_images))
    shutil.copy(user / "imageID_training.csv", folder / "imagenet_training_label.csv")
    shutil.copy(user / "imageID_test.csv", folder / "imagenet_testing_label.csv")
    wnids = sorted({f"n{int(i):08d}" for i in np.concatenate([train_ids, test_ids])})
    index = {str(k): [w, f"name {w}"] for k, w in enumerate(wnids)}
    (folder / "imagenet_class_index.json").write_text(json.dumps(index))
    raw = {}
    for s in (1, 2):
        data = read_god(subject_file(user, s))
        train, test = data.data_type == 1, data.data_type == 2
        arrays = {
            "arr_0": data.betas[train],
            "arr_2": np.stack(
                [
                    data.betas[test][_rows_by_id(test_ids, data.stimulus_id[test]) == k].mean(0)
                    for k in range(test_ids.size)
                ]
            ),  # fmt: skip
            "arr_3": _rows_by_id(train_ids, data.stimulus_id[train]),
            "arr_5": np.zeros(data.betas.shape[1]),
            "arr_6": np.zeros(data.betas.shape[1]),
        }
        if single_trials:
            arrays["arr_1"] = data.betas[test]
            arrays["arr_4"] = _rows_by_id(test_ids, data.stimulus_id[test])
        arrays.update({k[len("ROI_") :]: v for k, v in data.rois.items()})
        np.savez(folder / f"sbj_{s}.npz", **arrays)
        raw[s] = arrays
    return raw


def _zscore(x):
    x = x.astype(np.float64)
    return (x - x.mean(0)) / x.std(0)


def test_mindvis_npz_prepares_the_same_images_and_trials(god_user):
    base = god_user[0]
    folder = base / "mindvis"
    raw = _write_mindvis(god_user, folder)
    store_path = prepare_god(folder, base / "mv_store", format="mindvis", progress=False)
    ref_path = base / "mv_ref"
    prepare_god(god_user[1], ref_path, progress=False)
    store, subjects, images, _, labels = _store_arrays(store_path)
    ref_store, ref_subjects, ref_images, _, ref_labels = _store_arrays(ref_path)
    np.testing.assert_array_equal(images, ref_images)  # lossless: npz values are the world's pixels
    for key in ("ids_73k", "stimulus_id", "file_name", "wnid"):
        np.testing.assert_array_equal(labels[key], ref_labels[key], err_msg=key)
    assert labels["class_name"].tolist() == [f"name {w}" for w in labels["wnid"]]  # from the json beside it
    for s in (1, 2):
        # the same presentations (image per trial, test flag), in the npz's order
        np.testing.assert_array_equal(
            subjects[s]["trials/image_id_73k"], ref_subjects[s]["trials/image_id_73k"]
        )
        np.testing.assert_array_equal(subjects[s]["trials/shared"], ref_subjects[s]["trials/shared"])
        # z-scored within the training block and within the test block, per voxel of ROI VC
        vc = raw[s]["VC"]
        expected = np.concatenate([_zscore(raw[s]["arr_0"][:, vc]), _zscore(raw[s]["arr_1"][:, vc])])
        np.testing.assert_allclose(subjects[s]["betas"], expected, atol=2e-5)
        assert store.manifest["sessions"][str(s)] == 2
        np.testing.assert_array_equal(subjects[s]["rois/ROI_V1"], raw[s]["V1"][vc].astype(np.int16))


def test_mindvis_averaged_test_only_and_errors(god_user):
    base = god_user[0]
    folder = base / "mindvis_avg"
    raw = _write_mindvis(god_user, folder, single_trials=False, images_as="float 0-1")
    store = PreparedStore(
        prepare_god(folder, base / "mv_avg", format="mindvis", subjects=[2], progress=False)
    )
    subject = store.subject(2)
    with h5py.File(god_user[1] / "images.hdf5", "r") as f:
        np.testing.assert_array_equal(store.images(np.arange(46)), f["images"][()])  # [0, 1] floats rescaled
    assert subject.split_rows("test").size == 6 and subject.split_ids("test").tolist() == list(range(40, 46))
    np.testing.assert_allclose(subject.betas(subject.split_rows("test")), _zscore(raw[2]["arr_2"]), atol=2e-5)
    with pytest.raises(DatasetLayoutError, match=r"sbj_1\.npz has no ROI 'FOO'"):
        prepare_god(folder, base / "mv_bad", format="mindvis", roi="FOO", progress=False)
    (folder / "imagenet_testing_label.csv").write_text(
        "\n".join((folder / "imagenet_testing_label.csv").read_text().splitlines()[:-1]) + "\n"
    )
    with pytest.raises(
        DatasetLayoutError, match="list 40 training and 5 test images but images_256.npz holds"
    ):
        prepare_god(folder, base / "mv_bad2", format="mindvis", progress=False)
