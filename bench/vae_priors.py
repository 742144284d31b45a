"""VAE priors: each prior on one trained first stage, scored as the evaluate stage scores it
The first stage (encoder + decoder) does not depend on `vae.prior`: train it once (`imagegen train-vae`,
any prior), then this fits every prior the way train-vae does (VAETask.finalize, same seed), draws
`--n` samples through the shared sampling path and scores them against the test split (FID, KID,
precision/recall, class coverage in the domain feature space), with the IWAE bounds on the first
`--iwae-images` test images. Needs models/features (train-features) and data/prepared.

  python bench/vae_priors.py --model models/vae \\
      --option standard --option mixture --option mixture:prior_components=16 --option two_stage

An option is a prior name, optionally followed by `:key=value,...` overrides of the vae section.
The option `posterior` is no prior but the ceiling of all of them: it decodes one z ~ q(z | x) each
for `--n` random training images, i.e. samples the aggregate posterior itself (the prior that fits the
codes perfectly), so it shows what the decoder can give at best; what it lacks, no prior can add.

Prints a markdown table and writes it as JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch
from benchlog import record

from imagegen.config import load_config, with_overrides
from imagegen.data.arrays import load_split
from imagegen.evaluation.sampling import generate
from imagegen.evaluation.stage import Scorer, rounded
from imagegen.evaluation.vae_metrics import vae_test_metrics
from imagegen.layout import PREPARED_DIR
from imagegen.models.io import load_model
from imagegen.training.data import DeviceBatches
from imagegen.training.tasks import VAETask

COLUMNS = ("fid", "recall", "precision", "min_class_ratio", "class_entropy", "kid_mean", "nelbo", "nll_iwae",
           "nll_iwae_prior", "recon_mse", "fit_seconds", "fit_cpu_seconds")


def parse_option(text: str) -> tuple[str, dict]:
    name, _, rest = text.partition(":")
    overrides = {"vae.prior": name}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        overrides[f"vae.{key}"] = int(value) if value.isdigit() else value
    return text, overrides


def from_checkpoint(path: Path, cfg):
    """The VAE of a train-vae checkpoint (checkpoints/vae/last.pt): a first stage part-way through."""
    from imagegen.data.arrays import read_info
    from imagegen.models.description import ModelDescription
    from imagegen.models.kinds import build

    state = torch.load(path, map_location="cpu", weights_only=True)
    info = read_info(PREPARED_DIR, cfg.data.dataset)
    meta = ModelDescription("vae", {k: getattr(cfg.vae, k) for k in ("latent_dim", "width", "decoder_blocks")}, 0,
                            info.classes, info.shape)
    vae = build(meta)
    vae.load_state_dict(state["task"]["modules"]["vae"])
    print(f"{path}: first stage after {state['epoch']} epochs")
    return vae.eval(), meta


@torch.no_grad()
def posterior_samples(vae, meta, data, n: int, seed: int):
    """Decodes of one z ~ q(z | x) for n random training images (uint8 N x C x H x W): the aggregate posterior."""
    import numpy as np

    from imagegen.evaluation.sampling import to_uint8
    from imagegen.models.kinds import to_images
    from imagegen.models.priors import posterior_codes

    gen = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(data.images), generator=gen)[:n].to(data.images.device)
    labels = data.labels[pick] if vae.num_classes else None
    codes = posterior_codes(vae, data.images[pick], labels, gen)
    return np.concatenate([to_uint8(to_images(vae, meta, codes[i:i + 1000], None if labels is None else labels[i:i + 1000]))
                           for i in range(0, len(codes), 1000)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path("models/vae"),
                        help="a trained VAE folder, or a train-vae checkpoint file (checkpoints/vae/last.pt)")
    parser.add_argument("--root", type=Path, default=Path("."))
    parser.add_argument("--option", action="append", default=[])
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--iwae-images", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=Path("vae-priors.json"))
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.root / "params.yaml")
    device = torch.device("cpu")
    first, meta = load_model(args.model, device) if args.model.is_dir() else from_checkpoint(args.model, cfg)
    images, labels = load_split(args.root / PREPARED_DIR / "train.npz")
    test_images, test_labels = load_split(args.root / PREPARED_DIR / "test.npz")
    data = DeviceBatches(images, labels, cfg.vae.batch_size, device, cfg.train.seed)
    scorer = Scorer.load(cfg, args.root, device)
    results = {}
    for label, overrides in map(parse_option, args.option or ["standard", "mixture", "two_stage"]):
        if label == "posterior":
            results[label] = rounded(scorer.score(posterior_samples(first, meta, data, args.n, cfg.eval.seed)))
            print(label, json.dumps(results[label]), flush=True)
            continue
        overrides.update({"vae.latent_dim": meta.arch["latent_dim"], "vae.width": meta.arch["width"],
                          "vae.decoder_blocks": meta.arch.get("decoder_blocks", 0)})
        run_cfg = with_overrides(cfg, overrides)
        task = VAETask(run_cfg.vae, len(meta.classes), device, image_shape=meta.image_shape)
        state = {k: v for k, v in first.state_dict().items() if not k.startswith("prior.")}
        task.vae.load_state_dict(state)
        task.vae.eval()
        started, cpu = time.perf_counter(), time.process_time()
        fitted = task.finalize(data)
        fit_seconds, fit_cpu = time.perf_counter() - started, time.process_time() - cpu
        model = task.export()
        samples = generate(model, replace(meta, arch={**meta.arch, "prior": run_cfg.vae.prior}), args.n,
                           cfg.eval.seed, device=device)
        scores = scorer.score(samples)
        scores.update(vae_test_metrics(model, test_images[:args.iwae_images], test_labels[:args.iwae_images],
                                       cfg.eval.iwae_k, cfg.eval.seed, device=device))
        results[label] = rounded({**scores, **fitted, "fit_seconds": fit_seconds, "fit_cpu_seconds": fit_cpu,
                                  "threads": torch.get_num_threads()})
        print(label, json.dumps(results[label]), flush=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    record("vae_priors", ["option", *COLUMNS],
           [[label, *(f"{row[c]:.4g}" if c in row else "" for c in COLUMNS)] for label, row in results.items()],
           note=f"First stage {args.model}; {args.n:,} samples per FID; IWAE bounds on {args.iwae_images:,} test images.")


if __name__ == "__main__":
    main()
