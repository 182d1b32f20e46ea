"""`fmrirecon store verify DIR`: read a prepared store in full and check its checksums and digests."""

from __future__ import annotations

VERIFY_DESCRIPTION = (
    "Read every dataset of a prepared store: HDF5's Fletcher-32 checksum is checked by the read, and each "
    "dataset's SHA-256 digest is compared with the one recorded in manifest.json when the store was written. "
    "Prints each file as intact or corrupt (with the dataset and rows at fault) and exits with status 1 if "
    "any file is corrupt or missing."
)


def register(subparsers) -> None:
    parser = subparsers.add_parser("store", help="check a prepared store", description=__doc__)
    actions = parser.add_subparsers(dest="action", metavar="ACTION")
    verify = actions.add_parser(
        "verify",
        help="read a store in full and report each file intact or corrupt",
        description=VERIFY_DESCRIPTION,
    )
    verify.add_argument("dir", help="prepared store folder (holds manifest.json)")
    verify.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    verify.set_defaults(func=_verify)
    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])


def _verify(args) -> int:
    from fmrirecon.data.integrity import store_digest, verify_store

    report = verify_store(args.dir, progress=not args.no_progress)
    for entry in report.files:
        size = f" ({entry.bytes_read / 1e6:.1f} MB read)" if entry.bytes_read else ""
        print(f"{entry.status:9s} {entry.name}{size}")
        for problem in entry.problems:
            print(f"          - {problem}")
    total = sum(f.bytes_read for f in report.files)
    verdict = "intact" if report.ok else "CORRUPT"
    digest = store_digest(args.dir) if report.ok else "n/a"
    print(f"store {report.store}: {verdict}; {total / 1e6:.1f} MB in {report.seconds:.2f} s; digest {digest}")
    return 0 if report.ok else 1
