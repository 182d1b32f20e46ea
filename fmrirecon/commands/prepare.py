"""`fmrirecon prepare nsd|god`: native dataset layout -> prepared store (HDF5 per subject + stimuli)."""

from __future__ import annotations

import argparse

PREPARE_DESCRIPTION = (
    "Read a dataset in its native layout and write a prepared store: per subject an HDF5 file with "
    "ROI-masked betas z-scored per voxel within each session, the trial table, voxel coordinates and ROI "
    "labels; plus the shared stimuli and captions. Works session by session, writes atomically, and does "
    "nothing when the store already exists with the same settings (use --force to rebuild)."
)

NSD_DESCRIPTION = (
    "Prepare the NSD native layout (nsddata/, nsddata_betas/, nsddata_stimuli/) under --root. The test "
    "split is the shared images seen in the selected sessions: --sessions 37 gives the 982-image test set "
    "of the 37-session papers, 40 the full shared1000."
)

GOD_DESCRIPTION = (
    "Prepare Generic Object Decoding data under --root into a store. --format bdata (default): the bdpy "
    "BData files SubjectN.h5; DataType 1 (training perception) becomes the train split, DataType 2 (test "
    "perception) the test split; betas are z-scored per voxel within each run. Stimuli: with --images DIR, "
    "the ImageNet files named in imageID_training.csv / imageID_test.csv (GenericObjectDecoding's tables, in "
    "--root or DIR) are found in any sub-folder of DIR, centre-cropped and resized to --image-size (default "
    "256); without it, the images.hdf5 of the synthetic world. --format mindvis: MinD-Vis' sbj_N.npz + "
    "images_256.npz + imagenet_*_label.csv. Each image's WordNet id is stored; --class-names FILE "
    "(imagenet_class_index.json or 'n01440764 tench' lines) adds class names."
)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "prepare",
        help="turn a dataset in its native layout into a prepared store",
        description=PREPARE_DESCRIPTION,
    )
    sources = parser.add_subparsers(dest="source", metavar="SOURCE")
    nsd = sources.add_parser(
        "nsd",
        help="Natural Scenes Dataset layout (real NSD or `fmrirecon world make` output)",
        description=NSD_DESCRIPTION,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    nsd.add_argument("--root", default=None, help="NSD root folder (default: $FMRIRECON_DATA/world)")
    nsd.add_argument("--out", default=None, help="store folder (default: $FMRIRECON_DATA/store)")
    nsd.add_argument("--subjects", type=int, nargs="+", default=None, help="1-based subjects (default: all)")
    nsd.add_argument("--sessions", type=int, default=None, help="use the first K sessions (default: all)")
    nsd.add_argument("--betas-format", choices=("nifti", "hdf5"), default="nifti", help="betas files to read")
    nsd.add_argument("--roi", default="nsdgeneral", help="ROI file whose labels > 0 select the voxels")
    nsd.add_argument(
        "--nan-policy",
        choices=("error", "zero"),
        default="error",
        help="NaN betas inside the ROI: stop with an error, or replace by 0 with a warning",
    )
    nsd.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="resize the copied stimuli to this side (default: native)",
    )
    nsd.add_argument(
        "--betas-dtype",
        choices=("float32", "float16", "int16"),
        default="float32",
        help="storage of the z-scored betas (int16 = NSD's x 1/300 scaling); always read back as float32",
    )
    nsd.add_argument("--force", action="store_true", help="rebuild an existing store")
    nsd.add_argument("--no-progress", action="store_true", help="hide progress bars")
    nsd.set_defaults(func=_nsd)
    god = sources.add_parser(
        "god",
        help="Generic Object Decoding layout (bdpy BData HDF5, Subject1.h5 ...)",
        description=GOD_DESCRIPTION,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    god.add_argument("--root", required=True, help="folder holding SubjectN.h5 (or sbj_N.npz for mindvis)")
    god.add_argument("--out", required=True, help="store folder")
    god.add_argument("--subjects", type=int, nargs="+", default=None, help="1-based subjects (default: all)")
    god.add_argument("--roi", default="ROI_VC", help="ROI metadata key selecting the voxels")
    god.add_argument("--format", choices=("bdata", "mindvis"), default="bdata", help="layout under --root")
    god.add_argument(
        "--images", default=None, help="folder (any depth) holding the JPEG stimuli named in imageID_*.csv"
    )
    god.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="side of the stored square stimuli (default: 256 with --images, else native)",
    )
    god.add_argument(
        "--class-names", default=None, help="WordNet id -> class name table (offline file), optional"
    )
    god.add_argument("--force", action="store_true", help="rebuild an existing store")
    god.add_argument("--no-progress", action="store_true", help="hide progress bars")
    god.set_defaults(func=_god)
    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])


def _nsd(args) -> int:
    from fmrirecon.data.prepare import prepare_nsd
    from fmrirecon.paths import data_home

    root = data_home(args.root) if args.root else data_home() / "world"
    out = data_home(args.out) if args.out else data_home() / "store"
    path = prepare_nsd(
        root,
        out,
        subjects=args.subjects,
        n_sessions=args.sessions,
        betas_format=args.betas_format,
        roi=args.roi,
        nan_policy=args.nan_policy,
        image_size=args.image_size,
        betas_dtype=args.betas_dtype,
        force=args.force,
        progress=not args.no_progress,
    )
    print(f"prepared store: {path}")
    return 0


def _god(args) -> int:
    from fmrirecon.data.god import prepare_god

    path = prepare_god(
        args.root,
        args.out,
        subjects=args.subjects,
        roi=args.roi,
        images=args.images,
        image_size=args.image_size,
        class_names=args.class_names,
        format=args.format,
        force=args.force,
        progress=not args.no_progress,
    )
    print(f"prepared store: {path}")
    return 0
