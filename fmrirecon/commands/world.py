"""`fmrirecon world make`: write the synthetic world in the real NSD layout (the embedded default dataset)."""

from __future__ import annotations

import argparse

WORLD_DESCRIPTION = (
    "Generate the synthetic world: scenes, captions and simulated subjects, written in the real NSD "
    "on-disk layout so that `fmrirecon prepare nsd` reads it with the real NSD reader."
)

MAKE_DESCRIPTION = (
    "Write nsd_expdesign.mat, nsd_stim_info_merged.csv, nsd_stimuli.hdf5, COCO-style captions, ROI and "
    "brain-mask NIfTIs and betas_sessionNN.nii.gz/.hdf5 per subject, plus the sidecar "
    "fmrirecon_world.json (world parameters and subject specs; not part of NSD). Shared images (seen by "
    "every subject, 3 times) form the test split; subjects complete different numbers of sessions in "
    "NSD's proportions. Re-running with the same settings does nothing; other settings need --force."
)

GOD_DESCRIPTION = (
    "Write the synthetic world in the GOD (Horikawa & Kamitani 2017) bdpy BData layout: SubjectN.h5 with "
    "/dataset and /metadata (VoxelData, ROI_V1 ... ROI_VC, voxel_x/y/z, DataType, Run, Block, stimulus_id), "
    "imageID_training.csv / imageID_test.csv, and images.hdf5 (images and captions; not part of GOD). "
    "Read it back with `fmrirecon prepare god`."
)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "world",
        help="generate the synthetic world (scenes + simulated subjects) in the NSD layout",
        description=WORLD_DESCRIPTION,
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION")
    make = actions.add_parser(
        "make",
        help="write the synthetic NSD tree under --out",
        description=MAKE_DESCRIPTION,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    make.add_argument("--out", default=None, help="output folder (default: $FMRIRECON_DATA/world)")
    make.add_argument("--subjects", type=int, default=4, help="number of simulated subjects")
    make.add_argument("--image-size", type=int, default=64, help="image side in pixels")
    make.add_argument("--seed", type=int, default=0, help="seed of the world, the subjects and the design")
    make.add_argument(
        "--shared", type=int, default=100, help="shared images seen by every subject (test split)"
    )
    make.add_argument("--unique", type=int, default=500, help="images seen by one subject only")
    make.add_argument("--repeats", type=int, default=3, help="presentations of each image")
    make.add_argument(
        "--sessions", type=int, default=15, help="sessions of the subjects who complete them all"
    )
    make.add_argument(
        "--voxels", type=int, default=2000, help="nsdgeneral voxels of subject 1 (others differ)"
    )
    make.add_argument(
        "--betas-format", choices=("nifti", "hdf5", "both"), default="both", help="which betas files to write"
    )
    make.add_argument("--force", action="store_true", help="replace an existing folder")
    make.add_argument("--no-progress", action="store_true", help="hide progress bars")
    make.set_defaults(func=_make)
    god = actions.add_parser(
        "make-god",
        help="write the synthetic world as GOD BData files (SubjectN.h5) under --out",
        description=GOD_DESCRIPTION,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    god.add_argument("--out", required=True, help="output folder")
    god.add_argument("--subjects", type=int, default=2, help="number of simulated subjects")
    god.add_argument("--train", type=int, default=200, help="training images, shown once (1200 in GOD)")
    god.add_argument("--test", type=int, default=10, help="test images (50 in GOD)")
    god.add_argument(
        "--test-repeats", type=int, default=10, help="presentations of each test image (35 in GOD)"
    )
    god.add_argument("--run-length", type=int, default=50, help="samples per run")
    god.add_argument("--image-size", type=int, default=64, help="image side in pixels")
    god.add_argument("--seed", type=int, default=0, help="seed of the world and the subjects")
    god.add_argument("--voxels", type=int, default=2000, help="visual-cortex voxels of subject 1")
    god.add_argument("--force", action="store_true", help="replace an existing folder")
    god.add_argument("--no-progress", action="store_true", help="hide progress bars")
    god.set_defaults(func=_make_god)
    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])


def _make(args) -> int:
    from fmrirecon.data.nsd import BETAS_FORMATS
    from fmrirecon.data.synthetic import write_synthetic_nsd
    from fmrirecon.paths import data_home

    out = data_home(args.out) if args.out else data_home() / "world"
    formats = BETAS_FORMATS if args.betas_format == "both" else (args.betas_format,)
    path = write_synthetic_nsd(
        out,
        n_subjects=args.subjects,
        image_size=args.image_size,
        seed=args.seed,
        n_shared=args.shared,
        n_unique=args.unique,
        n_repeats=args.repeats,
        max_sessions=args.sessions,
        n_voxels_base=args.voxels,
        formats=formats,
        force=args.force,
        progress=not args.no_progress,
    )
    print(f"synthetic world in NSD layout: {path}")
    return 0


def _make_god(args) -> int:
    from fmrirecon.data.god import write_synthetic_god

    path = write_synthetic_god(
        args.out,
        n_subjects=args.subjects,
        n_train=args.train,
        n_test=args.test,
        test_repeats=args.test_repeats,
        run_length=args.run_length,
        image_size=args.image_size,
        seed=args.seed,
        n_voxels_base=args.voxels,
        force=args.force,
        progress=not args.no_progress,
    )
    print(f"synthetic world in GOD layout: {path}")
    return 0
