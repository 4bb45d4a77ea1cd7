"""Frozen-feature probes: CLIP's linear probe and DINO/unicom's weighted k-NN.

Linear (CLIP, Radford et al. 2021, App. A.3): L-BFGS logistic regression (scikit-learn), max 1000
iterations; the L2 strength C is picked on a validation split carved from train (stratified), then
the model is refit on all of train and scored top-1 on test. We standardize features (train
mean/std) first, which CLIP does not: it puts every model's features on one scale, so one small
C grid fits them all and L-BFGS converges (raw random-init features have tiny or huge norms).

k-NN (DINO, Caron et al. 2021; unicom's knn script): L2-normalized features, cosine top-k
neighbours, votes weighted by exp(sim / T) with T = 0.07. k is reported for each of
{10, 20, 100, 200} (clipped to the train size), and the one chosen on the same validation split.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from threadpoolctl import threadpool_limits


def val_split(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train_idx, val_idx): stratified when every class has >= 2 samples and both sides can
    hold one of each class (many classes with few rows each, e.g. words: scikit-learn refuses a
    stratified split smaller than the class count)."""
    from sklearn.model_selection import train_test_split
    idx = np.arange(len(y))
    counts = np.bincount(y)
    n_cls, n_val = int((counts > 0).sum()), math.ceil(fraction * len(y))
    strat = y if counts[counts > 0].min() >= 2 and min(n_val, len(y) - n_val) >= n_cls else None
    tr, va = train_test_split(idx, test_size=fraction, random_state=seed, stratify=strat)
    return np.sort(tr), np.sort(va)


def _logreg(max_iter: int, standardize: bool, seed: int):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    # warm_start: each C of the (ascending) sweep starts from the previous solution, ~2x fewer
    # L-BFGS iterations than cold starts
    clf = LogisticRegression(max_iter=max_iter, solver="lbfgs", random_state=seed, warm_start=True)
    return make_pipeline(StandardScaler(), clf) if standardize else make_pipeline(clf)


def _fit(model, x: np.ndarray, y: np.ndarray, C: float) -> bool:
    """Fits in place; returns whether L-BFGS converged within max_iter."""
    from sklearn.exceptions import ConvergenceWarning
    model[-1].set_params(C=C)
    # One BLAS thread: these are small matrices (N x D, D <= a few thousand), and multi-threaded
    # BLAS spin-waiting on a busy machine made each fit several times slower here.
    with warnings.catch_warnings(record=True) as caught, threadpool_limits(1):
        warnings.simplefilter("always", ConvergenceWarning)
        model.fit(x, y)
    return not any(issubclass(w.category, ConvergenceWarning) for w in caught)


def linear_probe(xtr: np.ndarray, ytr: np.ndarray, xte: np.ndarray, yte: np.ndarray,
                 c_grid: Sequence[float] = (0.001, 0.01, 0.1, 0.601, 3.0, 10.0, 100.0),
                 val_fraction: float = 0.2,
                 max_iter: int = 1000, standardize: bool = True, seed: int = 0) -> dict:
    """Top-1 (fraction) on test of logistic regression with C chosen on a held-out slice of train."""
    xtr, xte = np.asarray(xtr, np.float64), np.asarray(xte, np.float64)
    tr, va = val_split(ytr, val_fraction, seed)
    val = {}
    model = _logreg(max_iter, standardize, seed)
    for C in sorted(float(c) for c in c_grid):
        _fit(model, xtr[tr], ytr[tr], C)
        val[C] = float((model.predict(xtr[va]) == ytr[va]).mean())
    best = max(val, key=lambda c: (val[c], -c))  # ties -> the stronger regularization
    model = _logreg(max_iter, standardize, seed)
    converged = _fit(model, xtr, ytr, best)
    top1 = float((model.predict(xte) == yte).mean())
    return {"top1": top1, "C": best, "val_top1": val, "converged": converged}


def knn_predict(xtr: np.ndarray, ytr: np.ndarray, xq: np.ndarray, ks: Sequence[int],
                temperature: float = 0.07, num_classes: int | None = None,
                chunk: int = 1024) -> dict[int, np.ndarray]:
    """Weighted-vote predictions for each k (DINO's `knn_classifier`)."""
    num_classes = num_classes or int(max(ytr.max(), 0)) + 1
    tr = torch.nn.functional.normalize(torch.as_tensor(np.asarray(xtr, np.float32)), dim=1)
    q = torch.nn.functional.normalize(torch.as_tensor(np.asarray(xq, np.float32)), dim=1)
    ytr_t = torch.as_tensor(ytr, dtype=torch.long)
    ks = sorted({min(int(k), len(tr)) for k in ks})
    kmax = ks[-1]
    preds = {k: [] for k in ks}
    for i in range(0, len(q), chunk):
        sims, idx = (q[i:i + chunk] @ tr.T).topk(kmax, dim=1)  # sorted, nearest first
        w = (sims / temperature).exp()
        onehot = torch.nn.functional.one_hot(ytr_t[idx], num_classes).float()  # (b, kmax, C)
        for k in ks:
            votes = (onehot[:, :k] * w[:, :k, None]).sum(1)
            preds[k].append(votes.argmax(1))
    return {k: torch.cat(v).numpy() for k, v in preds.items()}


def knn_probe(xtr: np.ndarray, ytr: np.ndarray, xte: np.ndarray, yte: np.ndarray,
              ks: Sequence[int] = (10, 20, 100, 200), temperature: float = 0.07,
              val_fraction: float = 0.2, seed: int = 0) -> dict:
    """Top-1 on test for every k, plus the k picked on a validation split of train."""
    nc = int(max(ytr.max(), yte.max())) + 1
    tr, va = val_split(ytr, val_fraction, seed)
    pv = knn_predict(xtr[tr], ytr[tr], xtr[va], ks, temperature, nc)
    val = {k: float((p == ytr[va]).mean()) for k, p in pv.items()}
    pt = knn_predict(xtr, ytr, xte, ks, temperature, nc)
    test = {k: float((p == yte).mean()) for k, p in pt.items()}
    # a k clipped on the smaller val-train set may not exist on the full set: map to nearest
    best_val = max(val, key=lambda k: (val[k], -k))
    best = min(test, key=lambda k: abs(k - best_val))
    return {"top1": test[best], "k": best, "top1_by_k": test, "val_top1_by_k": val,
            "temperature": temperature}


def baselines(ytr: np.ndarray, yte: np.ndarray) -> dict:
    """Chance (1/classes) and majority-class (most frequent train class) top-1 on test."""
    nc = int(max(ytr.max(), yte.max())) + 1
    major = int(np.bincount(ytr, minlength=nc).argmax())
    return {"chance": 1.0 / nc, "majority": float((yte == major).mean())}
