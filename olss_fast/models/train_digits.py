"""Train the bundled digits diffusion model and its metrics classifier (CPU, offline, seeded).

Usage::

    python -m olss_fast.models.train_digits --out olss_fast/models/digits

Data: :func:`sklearn.datasets.load_digits` (1797 8x8 images with values 0..16, shipped with scikit-learn, no
download), bilinearly upsampled to 16x16 and scaled to [-1, 1]. Augmentation: random shifts of up to one pixel
(horizontal flips would turn digits into non-digits).

Diffusion: a small class-conditional :class:`diffusers.UNet2DModel` (``num_class_embeds=11``: digits 0-9 plus the
null class 10 for classifier-free guidance, dropped in for 10% of the training labels), epsilon prediction, DDPM
linear betas (1000 steps, 1e-4..0.02), AdamW with warm-up + cosine decay, EMA of the weights (the EMA weights are
what is saved).

Classifier: a small CNN trained on a stratified 80% split, with its accuracy on the held-out 20% reported; its
penultimate-layer features define the Fréchet distance of :mod:`olss_fast.core.metrics`, and the mean/covariance of the
features of all 1797 real digits are saved as ``feature_stats.safetensors``.

Everything is written to a temporary folder next to ``--out`` and renamed into place at the end, so an
interrupted run never leaves a half-written model.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from olss_fast.core.metrics import frechet_distance
from olss_fast.models.digits import (CHECKSUMS_NAME, CLASSIFIER_SUBFOLDER, CLASSIFIER_WEIGHTS_NAME, CONFIG_NAME,
                                     FEATURE_STATS_NAME, DigitsClassifier, DigitsPipeline, file_sha256)

logger = logging.getLogger("olss_fast.models.train_digits")

NUM_TRAIN_TIMESTEPS = 1000
BETA_START = 1e-4
BETA_END = 0.02
BETA_SCHEDULE = "linear"


# --------------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------------
def load_digit_images(image_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 scikit-learn digits as ``[N, 1, image_size, image_size]`` floats in [-1, 1], and labels ``[N]``."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0).unsqueeze(1)  # [N,1,8,8] in [0,1]
    if image_size != 8:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    x = (x.clamp(0, 1) * 2 - 1).contiguous()
    y = torch.from_numpy(d.target.astype(np.int64))
    return x, y


def random_shift(x: torch.Tensor, gen: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Shift each image by an integer offset in [-max_shift, max_shift]^2, filling with background (-1)."""
    if max_shift <= 0:
        return x
    b, _, h, w = x.shape
    p = max_shift
    padded = F.pad(x, (p, p, p, p), value=-1.0)
    dx = torch.randint(0, 2 * p + 1, (b,), generator=gen)
    dy = torch.randint(0, 2 * p + 1, (b,), generator=gen)
    out = torch.empty_like(x)
    for i in range(2 * p + 1):
        for j in range(2 * p + 1):
            m = (dy == i) & (dx == j)
            if m.any():
                out[m] = padded[m, :, i:i + h, j:j + w]
    return out


# --------------------------------------------------------------------------------------------------------------
# Classifier
# --------------------------------------------------------------------------------------------------------------
def train_classifier(x: torch.Tensor, y: torch.Tensor, seed: int, epochs: int, batch_size: int = 64):
    """Train :class:`DigitsClassifier` on a stratified 80% split; return ``(model, test_accuracy, info)``."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(y))
    tr, te = train_test_split(idx, test_size=0.2, random_state=seed, stratify=y.numpy())
    tr, te = torch.from_numpy(tr), torch.from_numpy(te)
    gen = torch.Generator().manual_seed(seed + 1)
    torch.manual_seed(seed + 1)
    model = DigitsClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    steps_per_epoch = math.ceil(len(tr) / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=epochs * steps_per_epoch)
    t0 = time.time()
    for ep in range(epochs):
        model.train()
        perm = tr[torch.randperm(len(tr), generator=gen)]
        tot, n = 0.0, 0
        for k in range(0, len(perm), batch_size):
            b = perm[k:k + batch_size]
            xb = random_shift(x[b], gen)
            xb = xb + 0.05 * torch.randn(xb.shape, generator=gen)  # mild robustness to sampler noise
            loss = F.cross_entropy(model(xb), y[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            tot += loss.item() * len(b)
            n += len(b)
        if (ep + 1) % 5 == 0 or ep == epochs - 1:
            acc = classifier_accuracy(model, x[te], y[te])
            logger.info("classifier epoch %d/%d  loss %.4f  test acc %.4f", ep + 1, epochs, tot / n, acc)
    model.eval()
    test_acc = classifier_accuracy(model, x[te], y[te])
    train_acc = classifier_accuracy(model, x[tr], y[tr])
    info = {"test_accuracy": test_acc, "train_accuracy": train_acc, "n_train": len(tr), "n_test": len(te),
            "epochs": epochs, "seconds": round(time.time() - t0, 1)}
    return model, test_acc, info


@torch.no_grad()
def classifier_accuracy(model, x: torch.Tensor, y: torch.Tensor) -> float:
    was = model.training
    model.eval()
    acc = float((model(x).argmax(1) == y).float().mean())
    model.train(was)
    return acc


@torch.no_grad()
def feature_stats(model, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (unbiased) covariance, float64, of the classifier features of ``x``."""
    f = model.features(x).double()
    mu = f.mean(0)
    d = f - mu
    sigma = d.T @ d / (f.shape[0] - 1)
    return mu, sigma


# --------------------------------------------------------------------------------------------------------------
# Diffusion model
# --------------------------------------------------------------------------------------------------------------
def make_unet(image_size: int = 16):
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=image_size,
        in_channels=1,
        out_channels=1,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=32,
        num_class_embeds=11,
    )


def make_schedulers():
    from diffusers import DDIMScheduler, DDPMScheduler

    train = DDPMScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, beta_start=BETA_START, beta_end=BETA_END,
                          beta_schedule=BETA_SCHEDULE, prediction_type="epsilon", clip_sample=False)
    sample = DDIMScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, beta_start=BETA_START, beta_end=BETA_END,
                           beta_schedule=BETA_SCHEDULE, prediction_type="epsilon", clip_sample=False,
                           set_alpha_to_one=True, steps_offset=0, timestep_spacing="trailing")
    return train, sample


def lr_at(step: int, total: int, peak: float, warmup: int, final_frac: float = 0.05) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return peak * (final_frac + (1 - final_frac) * 0.5 * (1 + math.cos(math.pi * min(1.0, p))))


@torch.no_grad()
def ema_update(ema, model, decay: float) -> None:
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.lerp_(pm, 1.0 - decay)
    for be, bm in zip(ema.buffers(), model.buffers()):
        be.copy_(bm)


def train_diffusion(x: torch.Tensor, y: torch.Tensor, args) -> tuple[object, dict]:
    from tqdm.auto import tqdm

    gen = torch.Generator().manual_seed(args.seed + 2)
    torch.manual_seed(args.seed + 2)
    unet = make_unet(x.shape[-1])
    ema = copy.deepcopy(unet).requires_grad_(False)
    noise_sched, _ = make_schedulers()
    acp = noise_sched.alphas_cumprod.float()
    opt = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=0.0, betas=(0.9, 0.99))
    n = len(y)
    perm, pos = torch.randperm(n, generator=gen), 0
    losses: list[float] = []
    t0 = time.time()
    stopped_early = False
    step = 0
    bar = tqdm(range(args.steps), desc="unet", mininterval=5.0 if sys.stderr.isatty() else 60.0,
               disable=args.no_progress)
    unet.train()
    for step in bar:
        if pos + args.batch_size > n:
            perm, pos = torch.randperm(n, generator=gen), 0
        b = perm[pos:pos + args.batch_size]
        pos += args.batch_size
        x0 = random_shift(x[b], gen)
        labels = y[b].clone()
        drop = torch.rand(len(b), generator=gen) < args.class_dropout
        labels[drop] = 10
        t = torch.randint(0, NUM_TRAIN_TIMESTEPS, (len(b),), generator=gen)
        eps = torch.randn(x0.shape, generator=gen)
        a = acp[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
        pred = unet(xt, t, class_labels=labels).sample
        loss = F.mse_loss(pred, eps)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        ema_update(ema, unet, min(args.ema_decay, (1 + step) / (10 + step)))
        losses.append(loss.item())
        if (step + 1) % args.log_every == 0 or step == 0:
            el = time.time() - t0
            recent = float(np.mean(losses[-args.log_every:]))
            bar.set_postfix(loss=f"{recent:.4f}")
            logger.info("step %d/%d  loss(avg %d) %.5f  lr %.2e  %.2fs/step  elapsed %.0fs  eta %.0fs",
                        step + 1, args.steps, min(len(losses), args.log_every), recent, opt.param_groups[0]["lr"],
                        el / (step + 1), el, el / (step + 1) * (args.steps - step - 1))
        if args.max_minutes and time.time() - t0 > args.max_minutes * 60 and step + 1 < args.steps:
            logger.warning("stopping after %d steps: --max-minutes %.1f reached", step + 1, args.max_minutes)
            stopped_early = True
            break
    bar.close()
    done = step + 1
    info = {"steps_run": done, "steps_planned": args.steps, "stopped_early": stopped_early,
            "seconds": round(time.time() - t0, 1),
            "final_loss_last100": float(np.mean(losses[-100:])),
            "loss_first100": float(np.mean(losses[:100])),
            "loss_curve_every100": [round(float(np.mean(losses[i:i + 100])), 5) for i in range(0, len(losses), 100)]}
    return ema.eval(), info


@torch.no_grad()
def evaluate(unet, sample_sched, classifier, mu_ref, sigma_ref, steps: int, per_class: int, guidance: float,
             seed: int, grid_path: str | None = None) -> dict:
    """Sample ``per_class`` images per digit with DDIM and score them with the classifier."""
    pipe = DigitsPipeline(unet=unet, scheduler=sample_sched)
    pipe.set_progress_bar_config(disable=True)
    labels = [c for c in range(10) for _ in range(per_class)]
    g = torch.Generator().manual_seed(seed)
    s = pipe(prompt=labels, num_inference_steps=steps, guidance_scale=guidance, generator=g,
             output_type="latent").images
    s = s.clamp(-1, 1)
    acc = float((classifier(s).argmax(1) == torch.tensor(labels)).float().mean())
    out = {"steps": steps, "guidance_scale": guidance, "n": len(labels), "class_accuracy": acc}
    try:
        f = classifier.features(s).double()
        mu, sig = f.mean(0), torch.cov(f.T)
        out["frechet_distance"] = float(frechet_distance(mu, sig, mu_ref, sigma_ref))
    except Exception as exc:  # metrics module optional during bootstrap
        logger.warning("Fréchet distance skipped: %s", exc)
    if grid_path:
        save_grid(s, per_class, grid_path)
    return out


def save_grid(samples: torch.Tensor, per_row: int, path: str, scale: int = 4) -> None:
    from PIL import Image

    b = samples.shape[0]
    rows = math.ceil(b / per_row)
    img = ((samples[:, 0].clamp(-1, 1) + 1) / 2 * 255).round().byte().numpy()
    h, w = img.shape[1:]
    grid = np.zeros((rows * (h + 1), per_row * (w + 1)), np.uint8) + 64
    for i in range(b):
        r, c = divmod(i, per_row)
        grid[r * (h + 1):r * (h + 1) + h, c * (w + 1):c * (w + 1) + w] = img[i]
    im = Image.fromarray(grid)
    im.resize((im.width * scale, im.height * scale), Image.NEAREST).save(path)


# --------------------------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------------------------
def save_all(out: Path, unet, sample_sched, classifier, cls_info: dict, mu, sigma, training: dict) -> None:
    """Write the model folder to ``<out>.tmp-<pid>`` and rename it onto ``out``."""
    from safetensors.torch import save_file

    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        pipe = DigitsPipeline(unet=unet, scheduler=sample_sched)
        pipe.save_pretrained(str(tmp), safe_serialization=True)  # model_index.json, unet/, scheduler/
        (tmp / CLASSIFIER_SUBFOLDER).mkdir()
        state = {k: v.detach().contiguous().float() for k, v in classifier.state_dict().items()}
        save_file(state, str(tmp / CLASSIFIER_SUBFOLDER / CLASSIFIER_WEIGHTS_NAME),
                  metadata={"format": "pt", "kind": "olss_fast digits classifier"})
        cfg = dict(classifier.config)
        cfg.update({"_class_name": "DigitsClassifier", "module": "olss_fast.models.digits",
                    "input_range": [-1.0, 1.0], "features": "penultimate layer (ReLU(fc)), used for Frechet distance",
                    **{k: cls_info[k] for k in ("test_accuracy", "train_accuracy", "n_train", "n_test")}})
        (tmp / CLASSIFIER_SUBFOLDER / CONFIG_NAME).write_text(json.dumps(cfg, indent=2) + "\n")
        save_file({"mu": mu.contiguous(), "sigma": sigma.contiguous(),
                   "n": torch.tensor([training["data"]["n_images"]], dtype=torch.int64)},
                  str(tmp / FEATURE_STATS_NAME), metadata={"what": "classifier features of all real digits"})
        sums = {p.relative_to(tmp).as_posix(): file_sha256(p) for p in sorted(tmp.rglob("*.safetensors"))}
        (tmp / CHECKSUMS_NAME).write_text(json.dumps(sums, indent=2) + "\n")
        training["files"] = {p.relative_to(tmp).as_posix(): p.stat().st_size
                             for p in sorted(tmp.rglob("*")) if p.is_file()}
        (tmp / "training.json").write_text(json.dumps(training, indent=2) + "\n")
        (tmp / "README.md").write_text(_readme(training))
        for p in tmp.rglob("*"):
            if p.is_file():
                os.chmod(p, 0o644)  # safetensors/mkstemp may create 0600 files; package data must be world-readable
                with open(p, "rb") as fh:
                    os.fsync(fh.fileno())
            elif p.is_dir():
                os.chmod(p, 0o755)
        os.chmod(tmp, 0o755)
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("saved %s", out)


def _readme(tr: dict) -> str:
    d, c, e = tr["diffusion"], tr["classifier"], tr.get("evaluation", [])
    rows = "\n".join(f"| {r['steps']} | {r['guidance_scale']} | {r['n']} | {r['class_accuracy']:.3f} | "
                     f"{r.get('frechet_distance', float('nan')):.3f} |" for r in e)
    return f"""# Bundled digits diffusion model

Class-conditional 16x16 grayscale diffusion model trained on scikit-learn's `load_digits` (1797 8x8 images,
bilinearly upsampled to 16x16, scaled to [-1, 1]) by `python -m olss_fast.models.train_digits`.
Load it with `olss_fast.models.digits.load_digits_pipeline()` (offline).

* `unet/`: diffusers `UNet2DModel`, {d['parameters']:,} parameters, `num_class_embeds=11` (digits 0-9, null class 10
  for classifier-free guidance), epsilon prediction; EMA weights (decay {tr['args']['ema_decay']}).
* `scheduler/`: `DDIMScheduler`, DDPM {BETA_SCHEDULE} betas {BETA_START}..{BETA_END}, {NUM_TRAIN_TIMESTEPS} train steps,
  `timestep_spacing="trailing"`, no clipping.
* `classifier/`: small CNN digit classifier (test accuracy {c['test_accuracy']:.4f} on a held-out stratified 20%
  split); its {tr['classifier_feature_dim']}-d penultimate features define the Fréchet distance of `olss_fast.core.metrics`.
* `feature_stats.safetensors`: float64 mean `mu` and covariance `sigma` of those features over all real digits.
* `checksums.json`: sha256 of the weight files, checked at load time.

Training: seed {tr['args']['seed']}, {d['steps_run']} steps of batch {tr['args']['batch_size']}, AdamW lr
{tr['args']['lr']}, {d['seconds']:.0f} s on {tr['environment']['threads']} CPU thread(s); final loss (mean of the last
100 steps) {d['final_loss_last100']:.4f}; class dropout {tr['args']['class_dropout']}; random 1-pixel shifts.

Samples from the EMA model, scored by the classifier:

| DDIM steps | guidance | samples | class accuracy | Fréchet distance |
|---|---|---|---|---|
{rows}
"""


# --------------------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "digits"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=2400)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--ema-decay", type=float, default=0.998)
    p.add_argument("--class-dropout", type=float, default=0.1)
    p.add_argument("--classifier-epochs", type=int, default=40)
    p.add_argument("--threads", type=int, default=2,
                   help="torch CPU threads (use 1 when other processes keep the cores busy: OpenMP spin-waits)")
    p.add_argument("--max-minutes", type=float, default=19.0,
                   help="stop the UNet training early after this many minutes (0: no limit)")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--eval-per-class", type=int, default=10)
    p.add_argument("--grid", default=None, help="save a PNG grid of evaluation samples here")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    t_start = time.time()

    x, y = load_digit_images(16)
    logger.info("data: %d images %s in [%.1f, %.1f]", len(y), tuple(x.shape[1:]), x.min(), x.max())

    classifier, test_acc, cls_info = train_classifier(x, y, args.seed, args.classifier_epochs)
    logger.info("classifier test accuracy %.4f (%d held-out images)", test_acc, cls_info["n_test"])
    mu, sigma = feature_stats(classifier, x)

    unet, dinfo = train_diffusion(x, y, args)
    dinfo["parameters"] = sum(p.numel() for p in unet.parameters())
    _, sample_sched = make_schedulers()

    evals = []
    for steps, gs in ((50, 2.0), (50, 1.5), (50, 1.0), (20, 1.5)):
        r = evaluate(unet, sample_sched, classifier, mu, sigma, steps, args.eval_per_class, gs, seed=args.seed + 3,
                     grid_path=args.grid if (steps, gs) == (50, 2.0) else None)
        logger.info("eval: %s", r)
        evals.append(r)

    training = {
        "args": vars(args),
        "data": {"source": "sklearn.datasets.load_digits", "n_images": int(len(y)), "image_size": 16,
                 "upsampling": "bilinear 8->16", "range": [-1, 1], "augmentation": "random shift <= 1 px"},
        "noise_schedule": {"beta_schedule": BETA_SCHEDULE, "beta_start": BETA_START, "beta_end": BETA_END,
                           "num_train_timesteps": NUM_TRAIN_TIMESTEPS, "prediction_type": "epsilon"},
        "diffusion": dinfo,
        "classifier": cls_info,
        "classifier_feature_dim": int(mu.shape[0]),
        "evaluation": evals,
        "total_seconds": round(time.time() - t_start, 1),
        "environment": {"torch": torch.__version__, "python": platform.python_version(),
                        "threads": torch.get_num_threads(), "machine": platform.machine()},
    }
    try:
        import diffusers
        import sklearn

        training["environment"].update(diffusers=diffusers.__version__, sklearn=sklearn.__version__)
    except Exception:  # pragma: no cover
        pass
    save_all(Path(args.out), unet, sample_sched, classifier, cls_info, mu, sigma, training)
    logger.info("done in %.0f s", time.time() - t_start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
