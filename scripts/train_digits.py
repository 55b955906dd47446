"""Train the demo's CNN (:class:`lrpc.models.DigitsCNN`) on scikit-learn's handwritten digits and save
the weights and 32 held-out examples to ``lrpc/data/digits_cnn.pt`` (shipped with the package).

Deterministic on CPU (fixed split, seeds and thread count); about 10 s on one core. Needs scikit-learn
(the data set ships inside it, nothing is downloaded); loading the result does not.

    pip install scikit-learn
    python scripts/train_digits.py            # prints the test accuracy, writes lrpc/data/digits_cnn.pt
    python scripts/train_digits.py --out /tmp/digits_cnn.pt

Inputs are the data set's 0..16 intensities divided by 16: [0, 1], ink 1, background 0.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch import Tensor, nn

from lrpc.models import DIGITS_WEIGHTS, DigitsCNN

EXAMPLES = 32
SEED = 0


def load_split() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Train and test images ``(N, 1, 8, 8)`` in [0, 1] and labels: a stratified 80/20 split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    train_idx, test_idx = train_test_split(
        range(len(y)), test_size=0.2, stratify=digits.target, random_state=SEED
    )
    return x[train_idx], y[train_idx], x[test_idx], y[test_idx]


def shift(x: Tensor, generator: torch.Generator) -> Tensor:
    """Augmentation: move each image by up to one pixel in each direction (zero fill)."""
    windows = nn.functional.pad(x, (1, 1, 1, 1)).unfold(2, 8, 1).unfold(3, 8, 1)  # (N, 1, 3, 3, 8, 8)
    dy, dx = torch.randint(0, 3, (2, len(x)), generator=generator)
    return windows[torch.arange(len(x)), :, dy, dx]


def train(x: Tensor, y: Tensor, epochs: int = 40, batch: int = 64) -> DigitsCNN:
    torch.manual_seed(SEED)
    generator = torch.Generator().manual_seed(SEED)
    model = DigitsCNN()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=epochs * -(-len(x) // batch))
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=generator).split(batch):
            loss = nn.functional.cross_entropy(model(shift(x[idx], generator)), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def pick_examples(y: Tensor, count: int = EXAMPLES) -> list[int]:
    """Test-set indices with labels 0, 1, ..., 9, 0, 1, ... (first unused image of each label)."""
    used: set[int] = set()
    picked = []
    for k in range(count):
        i = next(i for i in range(len(y)) if int(y[i]) == k % 10 and i not in used)
        used.add(i)
        picked.append(i)
    return picked


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DIGITS_WEIGHTS)
    parser.add_argument("--epochs", type=int, default=40)
    args = parser.parse_args()
    torch.set_num_threads(1)  # same reduction order on every machine; faster than 2 threads for this size
    torch.use_deterministic_algorithms(True)
    start = time.perf_counter()
    x_train, y_train, x_test, y_test = load_split()
    model = train(x_train, y_train, epochs=args.epochs)
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    picked = pick_examples(y_test)
    state = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "state_dict": state,
            "examples": x_test[picked].contiguous(),
            "labels": y_test[picked].contiguous(),
            "test_accuracy": accuracy,
            "test_size": len(y_test),
            "input": "sklearn.datasets.load_digits images / 16: float32 in [0, 1], shape (1, 8, 8)",
        },
        args.out,
    )
    print(f"train {len(y_train)} images, test {len(y_test)}: test accuracy {accuracy:.2%}")
    print(
        f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KiB) in {time.perf_counter() - start:.1f} s"
    )


if __name__ == "__main__":
    main()
