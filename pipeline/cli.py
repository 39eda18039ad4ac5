"""The `rmpipe` command. Sub-commands import their heavy dependencies lazily so `rmpipe --help` is instant."""

from __future__ import annotations

import argparse
import sys

from rmpipe.errors import exits_cleanly
from rmpipe.progress import setup_logging


def _sample_data(args: argparse.Namespace) -> None:
    from rmpipe.params import load_params, section
    from rmpipe.sample_data import write_sample_batches

    cfg = section(load_params(args.params), "sample_data")
    if args.seed is not None:
        cfg = {**cfg, "seed": args.seed}
    if args.n_pairs is not None:
        cfg = {**cfg, "n_pairs": args.n_pairs}
    for path in write_sample_batches(args.out, cfg):
        print(path)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rmpipe", description=__doc__)
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("sample-data", help="write the bundled default preference batches")
    p.add_argument("--out", default="data/incoming", help="folder to write batches into")
    p.add_argument("--seed", type=int, default=None, help="override sample_data.seed")
    p.add_argument("--n-pairs", type=int, default=None, help="override sample_data.n_pairs")
    p.set_defaults(func=_sample_data)
    return parser


@exits_cleanly
def main(argv: list[str] | None = None) -> None:
    setup_logging()
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main(sys.argv[1:])
