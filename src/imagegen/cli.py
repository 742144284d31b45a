"""The `imagegen` command: parse arguments, load params.yaml, call one stage function."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path

from imagegen.errors import ImagegenError


def _fetch(cfg, root):
    from imagegen.data.fetch import run_fetch

    result = run_fetch(cfg, root)
    return f"{result.dataset}: 4 files in {result.raw_dir}"


def _prepare(cfg, root):
    from imagegen.data.prepare import run_prepare

    result = run_prepare(cfg, root)
    return ", ".join(f"{split} {n}" for split, n in result.counts.items()) + f" images in {result.prepared_dir}"


def _validate(cfg, root):
    from imagegen.data.validate import run_validate

    result = run_validate(cfg, root)
    return f"{result.summary['evaluated_expectations']} expectations passed"


def _train(kind):
    def run(cfg, root):
        from imagegen.training.stage import run_train

        result = run_train(cfg, kind, root)
        m = result.metrics
        if not m:  # a non-main DDP process
            return "done"
        return f"{m['epochs']} epochs, {m['images_per_s']} images/s, weights in {result.model_dir}"

    return run


STAGES: dict[str, tuple[Callable, str]] = {
    "fetch": (_fetch, "download or copy the dataset's IDX files, verified by checksum"),
    "prepare": (_prepare, "parse IDX files into .npz arrays and a per-image manifest"),
    "validate": (_validate, "run the Great Expectations suite over the prepared data"),
    "train-gan": (_train("gan"), "train the DCGAN (GPU when present); resumable"),
    "train-vae": (_train("vae"), "train the convolutional VAE (GPU when present); resumable"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imagegen", description=__doc__)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"),
                        help="parameters file (default: params.yaml)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, help_text) in STAGES.items():
        commands.add_parser(name, help=help_text, description=help_text)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("great_expectations", "urllib3", "alembic", "mlflow"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    run, _ = STAGES[args.command]
    started = time.perf_counter()
    try:
        from imagegen.config import load_config

        cfg = load_config(args.params)
        message = run(cfg, Path("."))
    except ImagegenError as exc:
        print(f"imagegen {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"imagegen {args.command}: interrupted", file=sys.stderr)
        return 130
    print(f"imagegen {args.command}: {message} ({time.perf_counter() - started:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
