"""Does generated Pathfinder data learn? A small plain-torch CNN baseline (not an LRA model).

    python -m lra.data.pathfinder_cnn --data OUT/pathfinder32/curv_contour_length_14 [--epochs 10 ...]

Reads the release layout directly (text metadata + PNGs; empty or unreadable PNGs are skipped and counted),
makes a seeded 80/10/10 split, trains with dihedral augmentation (flips and 90° turns keep the label), keeps
the best-validation weights and prints held-out test accuracy as JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F

from lra.data.cache import DataError
from lra.data.pathfinder_gen import find_difficulty_dir, read_metadata


def load_images(ddir: Path, limit: int | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """(images (N, H, W) uint8, labels (N,) int64, number of skipped files) from a difficulty folder."""
    ddir = find_difficulty_dir(Path(ddir))
    rows = read_metadata(ddir)[0][:limit]
    images, labels, skipped = [], [], 0
    for fields in rows:
        try:
            with Image.open(ddir / fields[0] / fields[1]) as im:
                images.append(np.asarray(im.convert("L")))
            labels.append(int(fields[3]))
        except Exception:  # the real release has one empty PNG
            skipped += 1
    if not images:
        raise DataError(f"no readable images under {ddir}")
    return np.stack(images), np.array(labels, dtype=np.int64), skipped


class SmallCNN(nn.Module):
    """Three stages of two 3x3 conv-BN-ReLU layers with 2x max-pooling, global max+mean pooling, linear head."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        chans = [1, width, width, 2 * width, 2 * width, 2 * width, 2 * width]
        layers: list[nn.Module] = []
        for i in range(6):
            layers += [nn.Conv2d(chans[i], chans[i + 1], 3, padding=1, bias=False), nn.BatchNorm2d(chans[i + 1]),
                       nn.ReLU(inplace=True)]
            if i % 2 == 1 and i < 5:
                layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(4 * width, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, 1, H, W) in [0, 1]
        h = self.features(x)  # (B, C, H/4, W/4)
        return self.head(torch.cat([h.amax(dim=(2, 3)), h.mean(dim=(2, 3))], dim=1))  # (B, 2)


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    k = int(torch.randint(0, 4, (1,), generator=gen))
    x = torch.rot90(x, k, dims=(2, 3))
    return torch.flip(x, dims=(3,)) if bool(torch.randint(0, 2, (1,), generator=gen)) else x


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 512) -> float:
    model.eval()
    hits = sum(int((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum()) for i in range(0, len(x), batch))
    return hits / max(len(x), 1)


def train(x: np.ndarray, y: np.ndarray, epochs: int, batch: int, lr: float, width: int, seed: int,
          log=print) -> dict:
    """Seeded 80/10/10 split, AdamW + one-cycle schedule; returns accuracies (test at best validation)."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(x), generator=gen)
    xt = torch.from_numpy(x).float().div_(255.0).unsqueeze(1)[order]  # (N, 1, H, W)
    yt = torch.from_numpy(y)[order]
    n_tr, n_va = int(0.8 * len(x)), int(0.1 * len(x))
    splits = {"train": slice(0, n_tr), "val": slice(n_tr, n_tr + n_va), "test": slice(n_tr + n_va, len(x))}
    (xtr, ytr), (xva, yva), (xte, yte) = ((xt[s], yt[s]) for s in splits.values())
    torch.manual_seed(seed)
    model = SmallCNN(width)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    steps = epochs * max(1, len(xtr) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    best = (-1.0, None, 0)
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(xtr), generator=gen)
        losses = []
        for i in range(0, len(xtr) - batch + 1, batch):
            idx = perm[i:i + batch]
            loss = F.cross_entropy(model(_augment(xtr[idx], gen)), ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
        val = accuracy(model, xva, yva)
        if val > best[0]:
            best = (val, {k: v.clone() for k, v in model.state_dict().items()}, epoch + 1)
        log(f"epoch {epoch + 1:2d}/{epochs}  loss {np.mean(losses):.4f}  val acc {val:.4f}")
    model.load_state_dict(best[1])
    return {"n_train": len(xtr), "n_val": len(xva), "n_test": len(xte), "best_epoch": best[2],
            "val_acc": round(best[0], 4), "test_acc": round(accuracy(model, xte, yte), 4),
            "test_majority_acc": round(max(float(yte.float().mean()), 1 - float(yte.float().mean())), 4),
            "params": sum(p.numel() for p in model.parameters())}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lra.data.pathfinder_cnn", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="a difficulty folder (curv_*) or a root containing one")
    ap.add_argument("--limit", type=int, default=None, help="use only the first N images")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: a shared CPU)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.monotonic()
    x, y, skipped = load_images(Path(args.data), args.limit)
    print(f"loaded {len(x)} images {x.shape[1]}x{x.shape[2]} (skipped {skipped}), label mean {y.mean():.3f}",
          file=sys.stderr)
    result = train(x, y, args.epochs, args.batch, args.lr, args.width, args.seed,
                   log=lambda msg: print(msg, file=sys.stderr, flush=True))
    result.update(skipped=skipped, seconds=round(time.monotonic() - t0, 1), data=str(args.data))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
