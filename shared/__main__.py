"""Model store CLI: `python -m shared list | promote VERSION | rollback | prune | export`."""

import argparse
import sys
from pathlib import Path

from shared import store
from shared.stores import Store, open_store


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the store CLI's arguments."""
    parser = argparse.ArgumentParser(prog="python -m shared", description=__doc__)
    parser.add_argument(
        "--models-dir",
        default=store.default_models_dir(),
        help="model store: a folder or s3://bucket/prefix (env MODELS_DIR; default volumes/models)",
    )
    verbs = parser.add_subparsers(dest="verb", required=True)
    verbs.add_parser(
        "list", help="list versions, oldest first; * marks LATEST, unreadable ones say why"
    )
    promote = verbs.add_parser("promote", help="point LATEST at VERSION")
    promote.add_argument("version")
    verbs.add_parser("rollback", help="point LATEST at the version before the current one")
    prune = verbs.add_parser(
        "prune",
        help="remove all but the newest N versions (never the one LATEST names) and the "
        "temporary folders of killed publishers",
    )
    prune.add_argument(
        "--keep", type=int, required=True, metavar="N", help="newest versions to keep (0 or more)"
    )
    prune.add_argument("--dry-run", action="store_true", help="only print what would be removed")
    export = verbs.add_parser(
        "export", help="write VERSION as an ONNX file (dynamic batch, preprocessing in metadata)"
    )
    export.add_argument("version")
    export.add_argument("--onnx", required=True, metavar="FILE", help="ONNX file to write")
    return parser.parse_args(argv)


def accuracy(meta: dict) -> str:
    """The version's test (else validation) accuracy for the listing, or '-' when it has none."""
    metrics = meta.get("metrics")
    if isinstance(metrics, dict):
        for key in ("test_acc", "valid_acc"):
            value = metrics.get(key)
            if type(value) in (int, float):
                return f"{key.removesuffix('_acc')} {value:.4f}"
    return "-"


def list_store(models: Store) -> None:
    """Print every version, oldest first, including the ones that cannot be read (and why)."""
    versions = models.version_names()
    if not versions:
        print(f"no versions in {models}")
        return
    try:
        latest = models.read_latest()
    except store.StoreUnreachable:
        raise
    except store.StoreError as exc:
        latest = None
        print(f"! {exc}")
    for version in versions:
        mark = "*" if version == latest else " "
        try:
            meta = models.read_meta(version)
        except store.StoreError as exc:
            print(f"{mark} {version}  unreadable: {str(exc).removeprefix(version + ': ')}")
            continue
        print(f"{mark} {version}  {meta['arch']:<18} {accuracy(meta):<16} run {meta.get('run_id')}")


def main(args: argparse.Namespace) -> int:
    """Run one store verb; a user's mistake prints one line and returns 2."""
    try:
        models = open_store(args.models_dir)
        if args.verb == "list":
            list_store(models)
        elif args.verb == "promote":
            models.set_latest(args.version)
            print(f"LATEST -> {args.version}")
        elif args.verb == "rollback":
            print(f"LATEST -> {models.rollback()}")
        elif args.verb == "prune":
            removed = models.prune(args.keep, dry_run=args.dry_run)
            verb = "would remove" if args.dry_run else "removed"
            for name in removed:
                print(f"{verb} {name}")
            if not removed:
                print(f"nothing to remove in {args.models_dir}")
        elif args.verb == "export":
            from shared.export import export_onnx  # imports onnx: only for this verb

            meta = export_onnx(models, args.version, Path(args.onnx))
            print(
                f"{args.onnx}: {args.version}, input float32 (batch, 3, {meta['image_size']}, "
                f"{meta['image_size']}): RGB scaled to [0, 1], then (x - mean) / std with "
                f"mean {meta['mean']}, std {meta['std']}; output logits over "
                f"{meta['num_classes']} classes (in the file's metadata)"
            )
    except store.StoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # e.g. the store folder cannot be listed
        print(f"error: {exc.filename or args.models_dir}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(parse_args()))
