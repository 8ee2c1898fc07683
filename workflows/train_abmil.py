#!/usr/bin/env python
"""Train gated-attention ABMIL (Ilse et al., 2018) on a folder of stores, with patient-level k-fold
cross-validation, and draw each slide's attention over its thumbnail.

    python workflows/train_abmil.py --stores OUT --labels labels.csv --encoder lunit-dino-vits16 \\
        [--folds 5] [--epochs 20] --out runs/abmil

Folds come from ``wsi_embed.mil.patient_splits`` (a ``fold`` or ``split`` column of the labels when
there is one; else stratified folds that never split a patient). Each fold trains a fresh model for
``--epochs`` epochs on its training slides and is scored on its held-out slides: ROC AUC for two
classes, balanced accuracy for more. Without a ``split`` column every slide is held out exactly once;
with one, the ``test`` slides are (``val`` slides are neither trained on nor scored). A held-out
slide's attention heatmap comes from the model that did not see it.

Writes, under ``--out``: ``fold_<k>.pt`` (state dict and config), ``predictions.csv`` (one row per
held-out slide), ``attention/<slide_id>.attention.png`` (and ``.attention.npy``: the (rows, cols)
attention, NaN outside the mask) and ``results.json``; prints one line per fold, then the results as
ONE JSON object, the last line of stdout. Bags are read once and kept in memory up to
``--cache-mb``; larger cohorts stream from the stores (``--workers`` DataLoader processes).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from wsi_embed import WsiEmbedError
from wsi_embed.errors import InvalidOption
from wsi_embed.atomic import write_atomic
from wsi_embed.infer import select_device
from wsi_embed.mil import BagDataset, attention_heatmap, collate_bags, patient_splits
from wsi_embed.qc import write_png_atomic
from wsi_embed.store import enclosing_store

log = logging.getLogger("train_abmil")


class GatedABMIL(nn.Module):
    """Gated attention MIL: instances -> hidden (Linear, ReLU, dropout); attention
    a_i = softmax_i(w^T (tanh(V h_i) * sigmoid(U h_i))) over the bag's real instances; the bag is
    sum_i a_i h_i; a linear classifier gives ``n_classes`` logits."""

    def __init__(self, in_dim: int, n_classes: int, *, hidden: int = 128, attn_dim: int = 64,
                 dropout: float = 0.25):
        super().__init__()
        self.config = {"in_dim": in_dim, "n_classes": n_classes, "hidden": hidden, "attn_dim": attn_dim,
                       "dropout": dropout}
        self.embed = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.attn_v = nn.Sequential(nn.Linear(hidden, attn_dim), nn.Tanh())
        self.attn_u = nn.Sequential(nn.Linear(hidden, attn_dim), nn.Sigmoid())
        self.attn_w = nn.Linear(attn_dim, 1)
        self.classifier = nn.Linear(hidden, n_classes)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` (B, N, D), ``mask`` (B, N) True on real instances -> logits (B, C), attention (B, N)
        (zero on padding, summing to 1 over each bag)."""
        h = self.embed(x)
        scores = self.attn_w(self.attn_v(h) * self.attn_u(h)).squeeze(-1)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        attention = torch.softmax(scores, dim=1)
        if mask is not None:  # a bag with no instance: zero attention, not NaN
            attention = torch.nan_to_num(attention, nan=0.0)
        bag = torch.einsum("bn,bnh->bh", attention, h)
        return self.classifier(bag), attention


class CachedBags(Dataset):
    """Items of a dataset, kept in ``cache`` (shared between folds) after their first read while
    ``budget[0]`` bytes remain: every epoch after the first reads no store."""

    def __init__(self, ds: BagDataset, cache: dict[str, dict], budget: list[int]):
        self.ds, self.cache, self.budget = ds, cache, budget

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> dict[str, Any]:
        sid = self.ds.slide_ids[i]
        if sid in self.cache:
            return self.cache[sid]
        item = self.ds[i]
        size = sum(v.numel() * v.element_size() for v in item.values() if isinstance(v, torch.Tensor))
        if size <= self.budget[0]:
            self.cache[sid] = item
            self.budget[0] -= size
        return item


def subsample(batch: dict, max_instances: int | None, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Features and mask of a batch, at most ``max_instances`` random real instances per bag (fresh
    each epoch: a regulariser for large bags)."""
    x, mask = batch["features"], batch["mask"]
    if max_instances is None or x.shape[1] <= max_instances:
        return x, mask
    keys = torch.rand(mask.shape, generator=gen).masked_fill(~mask, 2.0)  # padding sorts last
    keep = keys.argsort(dim=1)[:, :max_instances]
    return x.gather(1, keep[..., None].expand(-1, -1, x.shape[2])), mask.gather(1, keep)


def train_fold(train: Dataset, n_classes: int, dim: int, args: argparse.Namespace, device: torch.device,
               seed: int) -> tuple[GatedABMIL, float]:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = GatedABMIL(dim, n_classes).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    labels = torch.tensor([train.ds.labels[i] for i in range(len(train))])
    counts = torch.bincount(labels, minlength=n_classes).clamp(min=1).float()
    loss_fn = nn.CrossEntropyLoss(weight=(counts.sum() / (n_classes * counts)).to(device))  # balanced classes
    loader = DataLoader(train, batch_size=args.batch_size, shuffle=True, generator=gen, collate_fn=collate_bags,
                        num_workers=args.workers)
    loss_sum = 0.0
    for _epoch in range(args.epochs):
        model.train()
        loss_sum, seen = 0.0, 0
        for batch in loader:
            x, mask = subsample(batch, args.max_instances, gen)
            logits, _ = model(x.to(device, non_blocking=True), mask.to(device, non_blocking=True))
            loss = loss_fn(logits, batch["label"].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum, seen = loss_sum + float(loss.detach()) * len(batch["label"]), seen + len(batch["label"])
        loss_sum /= max(1, seen)
    return model, loss_sum


@torch.inference_mode()
def evaluate(model: GatedABMIL, test: Dataset, args: argparse.Namespace, device: torch.device) -> list[dict]:
    """One dict per held-out slide: label, probabilities, and the attention as (grid, weights)."""
    model.eval()
    out = []
    loader = DataLoader(test, batch_size=1, collate_fn=collate_bags, num_workers=args.workers)
    for batch in loader:
        logits, attention = model(batch["features"].to(device), batch["mask"].to(device))
        out.append({"slide_id": batch["slide_id"][0], "label": int(batch["label"][0]),
                    "probs": torch.softmax(logits, dim=1)[0].float().cpu().numpy(),
                    "grid": batch["grid"][0].numpy(), "attention": attention[0].float().cpu().numpy()})
    return out


def fold_metric(preds: list[dict], n_classes: int) -> tuple[str, float | None]:
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score

    y = np.array([p["label"] for p in preds])
    probs = np.stack([p["probs"] for p in preds])
    if n_classes == 2:
        if len(set(y.tolist())) < 2:
            log.warning("a held-out fold has one class only: its AUC is undefined")
            return "auc", None
        return "auc", float(roc_auc_score(y, probs[:, 1]))
    return "balanced_accuracy", float(balanced_accuracy_score(y, probs.argmax(axis=1)))


def replace_atomic(path: Path, data: bytes) -> None:
    write_atomic(path, lambda tmp: tmp.write_bytes(data))


def save_attention(ds: BagDataset, pred: dict, fold: int, attention_dir: Path) -> None:
    sid = pred["slide_id"]
    path = ds.paths[ds.slide_ids.index(sid)]
    from wsi_embed import open_store

    rows, cols = open_store(path).mask.shape
    grid = np.full((rows, cols), np.nan, dtype=np.float32)
    grid[pred["grid"][:, 0], pred["grid"][:, 1]] = pred["attention"]
    buf = io.BytesIO()
    np.save(buf, grid)
    replace_atomic(attention_dir / f"{sid}.attention.npy", buf.getvalue())
    classes = ds.classes
    k = int(pred["probs"].argmax())
    title = (f"{sid}: label {classes[pred['label']]}, predicted {classes[k]} (p={pred['probs'][k]:.2f}, "
             f"fold {fold}); ABMIL attention: yellow high, dark blue low")
    write_png_atomic(attention_heatmap(path, grid, title=title), attention_dir / f"{sid}.attention.png")


def clear_earlier_outputs(out: Path) -> None:
    """--out holds one run: an earlier run's models, heatmaps and results there would be taken for
    this one's (only the files this script writes are removed)."""
    for pattern in ("fold_*.pt", "predictions.csv", "results.json", "attention/*.attention.png",
                    "attention/*.attention.npy"):
        for path in out.glob(pattern):
            path.unlink()


def run(args: argparse.Namespace) -> dict:
    out = Path(args.out)
    store = enclosing_store(out)
    if store is not None:  # the store would then hold a group that is not one and look damaged
        raise InvalidOption(f"--out {out}: inside the store {store}; choose a folder outside the stores")
    device = select_device(args.device)
    ds = BagDataset(args.stores, args.labels, args.encoder, label_column=args.label_column)
    folds = patient_splits(ds, args.folds, seed=args.seed)
    clear_earlier_outputs(out)
    (out / "attention").mkdir(parents=True, exist_ok=True)
    n_classes = len(ds.classes)
    cache: dict[str, dict] = {}
    budget = [args.cache_mb << 20 if args.workers == 0 else 0]  # a worker's cache would die with it
    log.info("%d slides, %d classes, %d folds, device %s", len(ds), n_classes, len(folds), device)
    results: list[dict] = []
    rows: list[list] = []
    metric_name = "auc" if n_classes == 2 else "balanced_accuracy"
    for fold in folds:
        t0 = time.perf_counter()
        train = CachedBags(ds.subset(fold.train), cache, budget)
        test = CachedBags(ds.subset(fold.test), cache, budget)
        model, loss = train_fold(train, n_classes, ds.dim, args, device, seed=args.seed * 1000 + fold.fold)
        preds = evaluate(model, test, args, device)
        metric_name, value = fold_metric(preds, n_classes)
        trained = set(train.ds.labels)
        unseen = [ds.classes[c] for c in range(n_classes) if c not in trained]
        if unseen:  # its model never saw these: its score says nothing of the encoder
            log.warning("fold %d: its %d training slides have no %s; its score is left out of the mean",
                        fold.fold, len(fold.train), " or ".join(repr(c) for c in unseen))
        ckpt = {"state_dict": {k: v.cpu() for k, v in model.state_dict().items()}, "config": model.config,
                "classes": list(ds.classes), "encoder": args.encoder, "label_column": args.label_column,
                "fold": fold.fold, "fold_name": fold.name, "train": list(fold.train), "test": list(fold.test)}
        buf = io.BytesIO()
        torch.save(ckpt, buf)
        replace_atomic(out / f"fold_{fold.fold}.pt", buf.getvalue())
        for pred in preds:
            save_attention(ds, pred, fold.fold, out / "attention")
            rows.append([pred["slide_id"], fold.fold, ds.classes[pred["label"]],
                         ds.classes[int(pred["probs"].argmax())], *(f"{p:.6f}" for p in pred["probs"])])
        seconds = time.perf_counter() - t0
        results.append({"fold": fold.fold, "fold_name": fold.name, metric_name: value, "n_train": len(fold.train),
                        "n_test": len(fold.test), "train_loss": round(loss, 6), "seconds": round(seconds, 2),
                        "test_slides": list(fold.test), "classes_not_trained": unseen})
        shown = "undefined (one class held out)" if value is None else f"{value:.3f}"
        if unseen:
            shown += f" (trained without {', '.join(unseen)}: not in the mean)"
        named = f" (the labels' fold {fold.name})" if fold.name else ""
        print(f"fold {fold.fold}{named}: {metric_name} {shown} on {len(fold.test)} held-out slides "
              f"({len(fold.train)} trained, {args.epochs} epochs, loss {loss:.3f}, {seconds:.1f} s)", flush=True)
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(["slide_id", "fold", "label", "predicted", *(f"prob_{c}" for c in ds.classes)])
    writer.writerows(rows)
    replace_atomic(out / "predictions.csv", text.getvalue().encode())
    values = [r[metric_name] for r in results if r[metric_name] is not None and not r["classes_not_trained"]]
    summary = {
        f"{metric_name}_mean": float(np.mean(values)) if values else None,
        f"{metric_name}_std": float(np.std(values)) if values else None,
        "folds": results,
        "encoder": args.encoder, "classes": list(ds.classes), "n_slides": len(ds),
        "n_patients": len(set(ds.patients)), "epochs": args.epochs, "seed": args.seed, "device": str(device),
        "out": str(out),
    }
    replace_atomic(out / "results.json", (json.dumps(summary, indent=2) + "\n").encode())
    return summary


def worker_error_line(exc: Exception) -> str:
    """The error's own line: a DataLoader worker's error comes back with the worker's traceback in its
    message, whose last line is ``module.Class: the line``."""
    text = str(exc)
    if "Original Traceback" not in text:
        return text
    last = text.rstrip().splitlines()[-1]
    name = f"{type(exc).__module__}.{type(exc).__name__}: "
    return last[len(name):] if last.startswith(name) else last


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stores", required=True, help="output folder of wsi-embed embed (<slide_id>.zarr stores)")
    p.add_argument("--labels", required=True, help="CSV: slide_id, the label column; optional patient_id, fold, split")
    p.add_argument("--encoder", required=True, help="encoder name in the stores, e.g. lunit-dino-vits16")
    p.add_argument("--out", required=True, help="folder for the models, heatmaps and results.json")
    p.add_argument("--folds", type=int, default=5, help="cross-validation folds (ignored with a fold/split column)")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--label-column", default="label")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=1, help="bags per step (padded, masked)")
    p.add_argument("--max-instances", type=int, default=None, help="random cells per bag per training step")
    p.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda, cuda:1, ...")
    p.add_argument("--workers", type=int, default=0, help="DataLoader processes (0: read in this one, cached)")
    p.add_argument("--cache-mb", type=int, default=4096, help="memory for bags kept between epochs (workers 0)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name, value, least in (("--epochs", args.epochs, 1), ("--batch-size", args.batch_size, 1),
                               ("--max-instances", args.max_instances, 1), ("--workers", args.workers, 0),
                               ("--cache-mb", args.cache_mb, 0), ("--weight-decay", args.weight_decay, 0)):
        if value is not None and not value >= least:  # NaN too
            print(f"error: {name} must be at least {least}, not {value}", file=sys.stderr)
            return 1
    if not 0 < args.lr < float("inf"):
        print(f"error: --lr must be a number above 0, not {args.lr}", file=sys.stderr)
        return 1
    try:
        summary = run(args)
    except WsiEmbedError as exc:
        print(f"error: {worker_error_line(exc)}", file=sys.stderr)
        return 1
    except OSError as exc:  # --out not writable, a full disk
        print(f"error: {exc.filename or args.out}: cannot write ({exc.strerror or exc}); "
              "check the --out folder's permissions and free space", file=sys.stderr)
        return 1
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
