"""Model store CLI: `python -m shared list | promote VERSION | rollback`."""

import argparse
import sys

from shared import store
from shared.stores import open_store


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the store CLI's arguments."""
    parser = argparse.ArgumentParser(prog="python -m shared", description=__doc__)
    parser.add_argument(
        "--models-dir",
        default=str(store.default_models_dir()),
        help="model store: a folder or s3://bucket/prefix (env MODELS_DIR; default volumes/models)",
    )
    verbs = parser.add_subparsers(dest="verb", required=True)
    verbs.add_parser("list", help="list versions, oldest first; * marks LATEST")
    promote = verbs.add_parser("promote", help="point LATEST at VERSION")
    promote.add_argument("version")
    verbs.add_parser("rollback", help="point LATEST at the version before the current one")
    return parser.parse_args(argv)


def main(args: argparse.Namespace) -> int:
    """Run one store verb; errors print one line and return 2."""
    try:
        models = open_store(args.models_dir)
        if args.verb == "list":
            latest = models.read_latest()
            for version in models.list_versions():
                meta = models.read_meta(version)
                mark = "*" if version == latest else " "
                acc = meta["metrics"].get("test_acc", meta["metrics"].get("valid_acc"))
                print(
                    f"{mark} {version}  {meta['arch']:<15} acc {acc:.4f}  run {meta.get('run_id')}"
                )
        elif args.verb == "promote":
            models.set_latest(args.version)
            print(f"LATEST -> {args.version}")
        elif args.verb == "rollback":
            print(f"LATEST -> {models.rollback()}")
    except store.StoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(parse_args()))
