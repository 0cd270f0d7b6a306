"""Train the lesion-ct-demo network on synthetic chest CT phantoms (CPU, ~15 minutes on 2 cores).

    python models/lesion-ct-demo/scripts/train.py --out models/lesion-ct-demo/models/model.pt

The cases come from ``node.devtools.synth`` (seeds first_seed..first_seed+N-1, default 100000); the held-out
evaluation uses seeds from 200000 on, which training never sees. The network definition is read from configs/inference.json so the
trained weights always match what the node loads.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from monai.bundle import ConfigParser
from monai.losses import DiceCELoss
from monai.utils import set_determinism

from node.devtools.synth.phantom import CaseGeometry, make_phantom

BUNDLE = Path(__file__).resolve().parents[1]
A_MIN, A_MAX = -1000.0, 400.0  # must match ScaleIntensityRanged in configs/inference.json


def to_monai(hu_kji: np.ndarray) -> np.ndarray:
    """[k, j, i] HU -> MONAI's spatial order (i, j, k), scaled as the bundle's preprocessing does."""
    return np.clip((hu_kji.transpose(2, 1, 0) - A_MIN) / (A_MAX - A_MIN), 0.0, 1.0).astype(np.float32)


def sample_patch(rng: np.random.Generator, img: np.ndarray, lab: np.ndarray, fg: np.ndarray,
                 roi: tuple[int, int, int], pos_ratio: float) -> tuple[np.ndarray, np.ndarray]:
    shape = img.shape
    if len(fg) and rng.random() < pos_ratio:
        c = fg[rng.integers(len(fg))]
    else:
        c = np.array([rng.integers(shape[d]) for d in range(3)])
    start = [int(np.clip(c[d] - roi[d] // 2 + rng.integers(-roi[d] // 4, roi[d] // 4 + 1), 0, shape[d] - roi[d]))
             for d in range(3)]
    sl = tuple(slice(s, s + r) for s, r in zip(start, roi, strict=True))
    x, y = img[sl], lab[sl]
    if rng.random() < 0.5:  # left-right flip
        x, y = x[::-1], y[::-1]
    return np.ascontiguousarray(x), np.ascontiguousarray(y)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=BUNDLE / "models" / "model.pt")
    ap.add_argument("--cases", type=int, default=40)
    ap.add_argument("--iterations", type=int, default=1600)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--log", type=Path, default=None, help="JSON lines training log")
    ap.add_argument("--init", type=Path, default=None, help="start from these weights (fine-tuning)")
    ap.add_argument("--first-seed", type=int, default=100000, help="seed of the first training case")
    ap.add_argument("--pos-ratio", type=float, default=0.67, help="share of patches centred on a lesion")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    set_determinism(seed=args.seed)
    rng = np.random.default_rng(args.seed)
    parser = ConfigParser()
    parser.read_config(BUNDLE / "configs" / "inference.json")
    net = parser.get_parsed_content("network_def")
    if args.init is not None:
        net.load_state_dict(torch.load(args.init, map_location="cpu", weights_only=True))
    roi = tuple(parser.get_parsed_content("inferer").roi_size)

    geom = CaseGeometry()
    t0 = time.time()
    data = []
    for n in range(args.cases):
        ph = make_phantom(args.first_seed + n, geom)
        img = to_monai(ph.hu)
        lab = ph.mask.transpose(2, 1, 0).astype(np.int64)
        data.append((img, lab, np.argwhere(lab > 0)))
        print(f"case {n + 1}/{args.cases}: {len(ph.lesions)} lesions ({time.time() - t0:.0f} s)", flush=True)

    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, lambda_ce=1.0, lambda_dice=1.0)
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda it: 0.5 * (1 + math.cos(math.pi * min(it / args.iterations, 1.0))) * 0.97 + 0.03)
    log = args.log.open("w") if args.log else None
    net.train()
    t1 = time.time()
    running = 0.0
    for it in range(1, args.iterations + 1):
        xs, ys = [], []
        for _ in range(args.batch):
            img, lab, fg = data[rng.integers(len(data))]
            x, y = sample_patch(rng, img, lab, fg, roi, pos_ratio=args.pos_ratio)
            x = x * rng.uniform(0.95, 1.05) + rng.uniform(-0.02, 0.02)
            xs.append(x[None])
            ys.append(y[None])
        xb = torch.from_numpy(np.stack(xs)).float()
        yb = torch.from_numpy(np.stack(ys))
        loss = loss_fn(net(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        running = 0.98 * running + 0.02 * loss.item() if it > 1 else loss.item()
        if it % 50 == 0 or it == args.iterations:
            msg = {"iteration": it, "loss": round(running, 4), "lr": sched.get_last_lr()[0],
                   "seconds": round(time.time() - t1, 1)}
            print(json.dumps(msg), flush=True)
            if log:
                log.write(json.dumps(msg) + "\n")
                log.flush()
        if it % 400 == 0 or it == args.iterations:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            torch.save(net.state_dict(), args.out)
    print(f"saved {args.out} after {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
