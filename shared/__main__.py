"""Model store CLI: `python -m shared list | promote VERSION | rollback`."""

import argparse
import sys

from shared import store


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the store CLI's arguments."""
    parser = argparse.ArgumentParser(prog="python -m shared", description=__doc__)
    parser.add_argument(
        "--models-dir",
        default=str(store.default_models_dir()),
        help="model store folder (env MODELS_DIR; default ./volumes/models)",
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
        if args.verb == "list":
            latest = store.read_latest(args.models_dir)
            for version in store.list_versions(args.models_dir):
                meta = store.read_meta(args.models_dir, version)
                mark = "*" if version == latest else " "
                acc = meta["metrics"].get("test_acc", meta["metrics"].get("valid_acc"))
                print(
                    f"{mark} {version}  {meta['arch']:<15} acc {acc:.4f}  run {meta.get('run_id')}"
                )
        elif args.verb == "promote":
            store.set_latest(args.models_dir, args.version)
            print(f"LATEST -> {args.version}")
        elif args.verb == "rollback":
            print(f"LATEST -> {store.rollback(args.models_dir)}")
    except store.StoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(parse_args()))
