"""The `imagegen` command: parse arguments, load params.yaml, call one stage function."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from imagegen.errors import ImagegenError


def load_config(path):
    from imagegen.config import load_config

    return load_config(path)


def _fetch(cfg, root, args):
    from imagegen.data.fetch import run_fetch

    result = run_fetch(cfg, root)
    if not result.sources:  # a folder dataset: prepare reads the folder itself
        return f"{result.dataset}: nothing to fetch, prepare reads {cfg.data.folder}"
    return (f"{result.dataset}: {len(result.sources)} files in {result.raw_dir} "
            f"(from {', '.join(sorted(set(result.sources.values())))})")


def _prepare(cfg, root, args):
    from imagegen.data.prepare import run_prepare

    result = run_prepare(cfg, root)
    left_out = f" ({result.skipped} file(s) skipped, listed with reasons in scan.json)" if result.skipped else ""
    return (", ".join(f"{split} {n}" for split, n in result.counts.items()) + f" images in {result.prepared_dir}"
            + left_out)


def _validate(cfg, root, args):
    import tempfile

    from imagegen.baseline import champion_profile
    from imagegen.data.validate import run_validate

    with tempfile.TemporaryDirectory() as tmp:  # the drift baseline: the champion's profile, else data/profile
        champion = champion_profile(root, cfg.data.dataset, Path(tmp))
        result = run_validate(cfg, root, champion[0] if champion else None)
    warnings = len(result.summary.get("warnings", []))
    return f"{result.summary['evaluated_expectations']} expectations passed" + (
        f" ({warnings} warning(s): see metrics/validate.json)" if warnings else "") + (
        f"; drift gated against the data profile of champion {champion[1]}" if champion else "")


def _accept_classes(cfg, root, args):
    import tempfile

    from imagegen.baseline import champion_profile
    from imagegen.data.accepted import PROFILE_DIR, accept_classes
    from imagegen.data.drift import load_profile
    from imagegen.data.folder import scan_folder

    if cfg.data.builtin:
        raise ImagegenError(f"accept-classes: {cfg.data.dataset} is a built-in dataset with a fixed class list; "
                            "expected a folder dataset (data.dataset, data.folder)")
    with tempfile.TemporaryDirectory() as tmp:
        champion = champion_profile(root, cfg.data.dataset, Path(tmp))
        profile = load_profile(champion[0] if champion else root / PROFILE_DIR)
    if profile is None or profile.info["dataset"] != cfg.data.dataset:
        raise ImagegenError(f"accept-classes: no accepted data version of {cfg.data.dataset} yet; the first one "
                            "that passes validate sets the class list")
    number = profile.info.get("data_version_number", 0)
    found = scan_folder(root / cfg.data.folder).classes
    record = accept_classes(root, cfg.data.dataset, profile.info["classes"], found, args.by, number)
    return (f"class(es) {', '.join(record['added'])} accepted by {record['by']} at {record['at']}, after data "
            f"version {number}: appended to data/classes.json (commit it), the next run prepares and checks them")


def _accept_classes_args(parser):
    import getpass

    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    parser.add_argument("--by", default=user, help=f"who accepts the change, recorded with it (default: {user})")


def _train(kind):
    def run(cfg, root, args):
        from imagegen.training.stage import run_train

        result = run_train(cfg, kind, root)
        m = result.metrics
        if not m:  # a non-main DDP process
            return "done"
        return f"{m['epochs']} epochs, {m['images_per_s']} images/s, weights in {result.model_dir}"

    return run


def _train_features(cfg, root, args):
    from imagegen.evaluation.features import run_train_features

    result = run_train_features(cfg, root)
    return f"test accuracy {result.metrics['test_accuracy']:.4f}, weights in {result.model_dir}"


def _evaluate(cfg, root, args):
    from imagegen.evaluation.stage import run_evaluate, score_samples_file
    from imagegen.models.kinds import GENERATORS

    if args.samples is not None:
        metrics = score_samples_file(cfg, root, args.samples)
        print(json.dumps(metrics, indent=2, sort_keys=True))
        return f"scored {metrics['n_samples']} samples from {args.samples}"
    result = run_evaluate(cfg, root)
    return "; ".join(f"{kind} FID {result.metrics[kind]['fid']:.3f}" for kind in GENERATORS)


def _evaluate_args(parser):
    parser.add_argument("--samples", type=Path, metavar="FILE.npy",
                        help="score these samples (uint8, or float in [0, 1]; N x H x W grey or N x H x W x 3 RGB "
                             "at the feature net's size, e.g. N x 28 x 28 for Fashion-MNIST) instead of the "
                             "trained models; prints the metrics as JSON and writes nothing")


def _register(cfg, root, args):
    from imagegen.registry import run_register

    return run_register(cfg, root).summary


def _report(cfg, root, args):
    from imagegen.report import run_report

    result = run_report(cfg, root)
    return f"{result.path} ({result.charts} charts, {result.pictures} pictures; opens offline)"


def _sample(cfg, root, args):
    from imagegen.device import select_device
    from imagegen.evaluation.sampling import generate, save_images

    # The GPU when there is one, as train.device says (params.yaml is optional here: auto without it).
    device = select_device(load_config(args.params).train.device if args.params.exists() else "auto")
    if args.model is not None:
        from imagegen.registry_reader import load_registered

        module, description = load_registered(args.model)
    else:
        from imagegen.models.io import load_model

        module, description = load_model(args.source)
    images = generate(module, description, args.n, args.seed, args.label, device)
    save_images(args.out, images)
    return f"{len(images)} {description.kind} images ({description.shape_text}) in {args.out}"


def _sample_args(parser):
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--from", dest="source", type=Path, metavar="DIR",
                        help="a trained model folder, e.g. models/gan")
    source.add_argument("--model", metavar="URI",
                        help="an MLflow model, e.g. models:/fashion-mnist-gan@champion (MLFLOW_TRACKING_URI, "
                             "else the embedded store)")
    parser.add_argument("-n", type=int, default=64, help="number of images (default 64)")
    parser.add_argument("--seed", type=int, default=0, help="latent seed (default 0)")
    parser.add_argument("--label", type=int, help="class index for a conditional model (default: classes in turn)")
    parser.add_argument("--out", type=Path, required=True,
                        help="FILE.npy (uint8 N x H x W for a grey model, N x H x W x 3 for RGB) or FILE.png "
                             "(a grid)")


def _serve(cfg, root, args):
    from imagegen.registry_reader import serve_registered

    code = serve_registered(args.model, args.host, args.port)
    if code not in (0, -2, 130):  # -2/130: stopped with Ctrl-C
        raise ImagegenError(f"mlflow models serve for {args.model} exited with code {code} (its output is above)")
    return f"{args.model} served on http://{args.host}:{args.port} until stopped"


def _serve_args(parser):
    parser.add_argument("--model", required=True, metavar="URI", help="a registered model, e.g. "
                        "models:/fashion-mnist-gan@champion (its files are checked against the recorded sha256 first)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=_positive, default=5001, help="port (default 5001)")


def _data_config(args):
    """params.yaml's data section when there is one (its sources), else the defaults."""
    from imagegen.config import DataConfig

    return load_config(args.params).data if args.params.exists() else DataConfig()


def _export(cfg, root, args):
    from imagegen.data.export import export

    splits = (args.split,) if args.split else ("train", "test")
    result = export(args.dataset, args.out, _data_config(args), splits, args.limit)
    return f"{result.written} PNG images written to {args.out}/<class>/ ({result.skipped} already there)"


def _export_args(parser):
    parser.add_argument("--dataset", required=True, help="a built-in dataset: fashion-mnist or mnist")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="the folder to write DIR/<class>/*.png")
    parser.add_argument("--split", choices=("train", "test"), help="one split only (default: both)")
    parser.add_argument("--limit", type=_positive, metavar="N", help="the first N images of each split only")


def _drop(cfg, root, args):
    from imagegen.data.export import drop

    result = drop(args.source, args.folder, args.batch, _data_config(args))
    return f"{result.written} new PNG images added to {args.folder} ({result.skipped} were there)"


def _drop_args(parser):
    parser.add_argument("--from", dest="source", required=True, metavar="DATASET",
                        help="a built-in dataset: fashion-mnist or mnist")
    parser.add_argument("--batch", type=_positive, required=True, metavar="N", help="how many images to add")
    parser.add_argument("folder", type=Path, metavar="FOLDER", help="the image folder to grow (FOLDER/<class>/*.png)")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


@dataclass(frozen=True)
class Command:
    run: Callable
    help: str
    arguments: Callable | None = None
    needs_params: bool = True


COMMANDS: dict[str, Command] = {
    "fetch": Command(_fetch, "download or copy the dataset's IDX files, verified by checksum"),
    "prepare": Command(_prepare, "IDX files or an image folder -> .npz arrays, dataset.json and a per-image manifest"),
    "validate": Command(_validate, "run the Great Expectations suite over the prepared data"),
    "accept-classes": Command(_accept_classes, "accept the image folder's new class folders: appended to the class "
                                               "order in data/classes.json, recorded with who and when",
                              _accept_classes_args),
    "train-gan": Command(_train("gan"), "train the DCGAN (GPU when present); resumable"),
    "train-vae": Command(_train("vae"), "train the convolutional VAE (GPU when present); resumable"),
    "train-features": Command(_train_features, "train the domain classifier whose features FID, KID and P/R use"),
    "evaluate": Command(_evaluate, "score the trained models (FID, KID, precision/recall, VAE likelihood)",
                        _evaluate_args),
    "register": Command(_register, "register the evaluated models in MLflow; promote a better one to champion"),
    "report": Command(_report, "write reports/report.html: data checks, curves, samples, metrics and the "
                               "register decision on one offline page"),
    "sample": Command(_sample, "write images from a trained model folder or a registered model",
                      _sample_args, needs_params=False),
    "serve": Command(_serve, "serve a registered model over HTTP (mlflow models serve), once its files match the "
                             "digests recorded at registration", _serve_args, needs_params=False),
    "export": Command(_export, "write a built-in dataset as a labelled PNG folder (DIR/<class>/*.png)",
                      _export_args, needs_params=False),
    "drop": Command(_drop, "add the next N images of a built-in dataset to a PNG folder (a growing dataset)",
                    _drop_args, needs_params=False),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imagegen", description=__doc__)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"),
                        help="parameters file (default: params.yaml)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in COMMANDS.items():
        sub = commands.add_parser(name, help=command.help, description=command.help)
        if command.arguments:
            command.arguments(sub)
    return parser


def interrupted(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("great_expectations", "urllib3", "alembic", "mlflow", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    command = COMMANDS[args.command]
    signal.signal(signal.SIGTERM, interrupted)  # a stopped pipeline: end the stage's MLflow run KILLED
    started = time.perf_counter()
    try:
        cfg = load_config(args.params) if command.needs_params else None
        message = command.run(cfg, Path("."), args)
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
