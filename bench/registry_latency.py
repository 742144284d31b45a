"""Registry and serving latency: register one version, load it by alias, serve it
Medians over --repeat runs against a temporary project's tracking store.

    python bench/registry_latency.py [--repeat 5]

Builds models of the default params.yaml sizes with random weights (no training) in a temporary
project and uses that project's embedded store (sqlite:///<tmp>/mlflow.db), or MLFLOW_TRACKING_URI
when set. Prints medians:
    register one version   log the pyfunc model + create the version + set aliases (fresh weights each time)
    load by alias          imagegen.registry_reader.load_registered("models:/NAME@champion") (download + torch load)
    serve n=1 / n=64       POST /invocations to `mlflow models serve --env-manager local` on 127.0.0.1
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from benchlog import record

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# `mlflow models serve` execs `uvicorn` by name: this venv's scripts must be on PATH.
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"


def make_models(root: Path, cfg, seed: int) -> None:
    import torch

    from imagegen.models.description import ModelDescription
    from imagegen.models.io import save_model
    from imagegen.models.kinds import build

    for kind in ("gan", "vae"):
        section = getattr(cfg, kind)
        arch = {k: getattr(section, k) for k in ("latent_dim", "width", "kernel_size") if hasattr(section, k)}
        torch.manual_seed(seed)
        module = build(ModelDescription(kind, arch))
        folder = root / "models" / kind
        folder.mkdir(parents=True, exist_ok=True)
        save_model(folder, module, ModelDescription(kind, arch, dataset=cfg.data.dataset,
                                                    parameters=sum(p.numel() for p in module.parameters())))
    (root / "metrics").mkdir(exist_ok=True)
    fid = 100.0 - seed  # each new version is better: it is promoted, so the alias moves every time
    (root / "metrics" / "evaluate.json").write_text(json.dumps({k: {"fid": fid} for k in ("gan", "vae")}))


def time_register(root: Path, cfg, repeat: int) -> list[float]:
    from imagegen import registry, tracking

    times = []
    with tracking.stage_run(root, f"imagegen-{cfg.data.dataset}", "bench-register", {}, {}) as run:
        for seed in range(repeat + 1):  # the first one is warm-up (imports, experiment, registered model)
            make_models(root, cfg, seed)
            metrics = registry.challenger_metrics(root, "gan", "fid")
            started = time.perf_counter()
            registry.register_kind(cfg, root, "gan", root / "models" / "gan", metrics, run)
            times.append(time.perf_counter() - started)
    return times[1:]


def time_load(name: str, repeat: int) -> list[float]:
    from imagegen.registry_reader import load_registered

    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        load_registered(f"models:/{name}@champion")
        times.append(time.perf_counter() - started)
    return times


def time_serving(root: Path, name: str, repeat: int) -> dict[int, list[float]]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    log = (root / "serve.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{name}@champion",
                             "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, cwd=root, start_new_session=True)
    try:
        started = time.perf_counter()
        while True:
            try:
                urllib.request.urlopen(f"{url}/ping", timeout=2).read()
                break
            except OSError:
                if proc.poll() is not None or time.perf_counter() - started > 120:
                    raise SystemExit(f"scoring server did not start: {(root / 'serve.log').read_text()[-2000:]}")
                time.sleep(0.25)
        print(f"scoring server ready in {time.perf_counter() - started:.1f} s")
        results = {}
        for n in (1, 64):
            body = json.dumps({"dataframe_records": [{"n": n, "seed": 0}]}).encode()
            times = []
            for _ in range(repeat + 1):
                request = urllib.request.Request(f"{url}/invocations", data=body,
                                                 headers={"Content-Type": "application/json"})
                started = time.perf_counter()
                with urllib.request.urlopen(request, timeout=60) as response:
                    assert len(json.loads(response.read())["predictions"]) == n
                times.append(time.perf_counter() - started)
            results[n] = times[1:]
        return results
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    from imagegen.config import Config
    from imagegen.tracking import configure

    cfg = Config()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        os.chdir(root)  # load_registered and the embedded store resolve against the working directory
        print(f"tracking store: {configure(root)}")
        name = f"{cfg.data.dataset}-gan"
        register = time_register(root, cfg, args.repeat)
        load = time_load(name, args.repeat)
        serve = time_serving(root, name, args.repeat)
        ms = lambda xs: f"{statistics.median(xs) * 1000:8.0f} ms  (min {min(xs) * 1000:.0f}, max {max(xs) * 1000:.0f})"
        parameters = json.loads((root / "models" / "gan" / "model.json").read_text())["parameters"]
        print(f"gan of {parameters} parameters (default params.yaml sizes); median of {args.repeat}")
        print(f"register one version  {ms(register)}")
        print(f"load by alias         {ms(load)}")
        print(f"serve n=1             {ms(serve[1])}")
        print(f"serve n=64            {ms(serve[64])}")
        record("registry_latency", ["operation", "median ms", "min ms", "max ms"],
               [[what, *(f"{f(xs) * 1000:.0f}" for f in (statistics.median, min, max))] for what, xs in
                (("register one version", register), ("load by alias", load), ("serve n=1", serve[1]),
                 ("serve n=64", serve[64]))],
               note=f"A GAN of {parameters:,} parameters (default sizes), random weights; median of {args.repeat}.")


if __name__ == "__main__":
    main()
