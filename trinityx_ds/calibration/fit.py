"""Temperature scaling of a trained router from held-out routing, and writing T back into the run.

The router's task prediction for an example is p = softmax(z / T + log gamma), z the example's
router logits averaged over its response tokens (and, for the global view, over the MoCaE
layers). T is fitted on a validation part of the held-out examples and every metric is reported
on the remaining test part, before (the router's current T) and after, so the gain is not
measured on the data it was fitted on. Per layer, the same is done with each layer's own z and T.
"""
from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from trinityx_ds.calibration.metrics import calibration_report, ece
from trinityx_ds.calibration.temperature import calibrated_probs, fit_per_layer, fit_temperature
from trinityx_ds.errors import CheckpointError


def fit_routing(logits_LNE, labels_N, val_N, temperature_L, log_prior_LE,
                layer_ids: list[int]) -> tuple[dict, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Before/after calibration of the router's task prediction; T fitted on the `val_N` examples.

    logits_LNE: per-layer mean router logits of each example; temperature_L, log_prior_LE: what
    each layer's router uses now. "before" scales each layer by its own T, so it equals the
    router's expression also when layers learnt different temperatures.
    Returns the report (JSON-ready) and the test examples' (probs before, probs after, labels),
    what the reliability diagram draws.
    """
    z_LNE = torch.as_tensor(logits_LNE, dtype=torch.float64)
    labels_N = torch.as_tensor(labels_N, dtype=torch.long)
    val_N = torch.as_tensor(val_N, dtype=torch.bool)
    t_L = torch.as_tensor(temperature_L, dtype=torch.float64)
    prior_LE = torch.as_tensor(log_prior_LE, dtype=torch.float64)
    test_N = ~val_N
    if not val_N.any() or not test_N.any():
        raise ValueError(f"need validation and test examples to fit T, got {int(val_N.sum())} and {int(test_N.sum())}")
    zbar_NE, prior_E = z_LNE.mean(0), prior_LE[0]
    t_global = fit_temperature(zbar_NE[val_N], labels_N[val_N], prior_E)
    before_NE = calibrated_probs((z_LNE / t_L[:, None, None]).mean(0), 1.0, prior_E)
    after_NE = calibrated_probs(zbar_NE, t_global, prior_E)
    t_layers = fit_per_layer(z_LNE[:, val_N], labels_N[val_N], prior_LE)
    y = labels_N[test_N]
    per_layer = []
    for layer, z_NE, t_now, t_fit, prior in zip(layer_ids, z_LNE, t_L.tolist(), t_layers, prior_LE):
        per_layer.append({"layer": layer, "temperature": t_now, "fitted_temperature": t_fit,
                          "ece_before": ece(calibrated_probs(z_NE[test_N], t_now, prior), y),
                          "ece_after": ece(calibrated_probs(z_NE[test_N], t_fit, prior), y)})
    report = {"n_val": int(val_N.sum()), "n_test": int(test_N.sum()),
              "temperature": {"current": t_L.tolist(), "global": t_global, "per_layer": t_layers},
              "before": calibration_report(before_NE[test_N], y), "after": calibration_report(after_NE[test_N], y),
              "per_layer": per_layer}
    return report, (before_NE[test_N], after_NE[test_N], y)


def _key(layer: int) -> str:
    return f"model.layers.{layer}.mlp.router.log_temperature"


def read_temperatures(router_file: str | Path) -> dict[int, float]:
    """Layer -> T stored in a stage-2 router file."""
    out = {}
    with safe_open(str(router_file), framework="pt") as f:
        for name in f.keys():
            if name.endswith(".mlp.router.log_temperature"):
                out[int(name.split(".")[2])] = math.exp(float(f.get_tensor(name).reshape(-1)[0]))
    return dict(sorted(out.items()))


def write_temperatures(router_file: str | Path, temperatures: dict[int, float]) -> Path:
    """Sets `router.log_temperature` of the given layers in a stage-2 router file; returns the backup.

    The first write copies the file as trained to `<file>.bak` (later writes keep that copy, so it
    always restores the training output); the new file is written beside it and renamed over the
    old one, so a crash leaves either the old or the new file, never a torn one.
    """
    for layer, t in temperatures.items():
        if not t > 0:
            raise ValueError(f"layer {layer}: temperature {t} must be > 0")
    return _rewrite(router_file, {_key(layer): math.log(t) for layer, t in temperatures.items()})


def read_importance(router_file: str | Path) -> dict[int, list[float]]:
    """Layer -> the importance weights gamma_E (exp of `router.log_importance`) in a stage-2 router file."""
    out = {}
    with safe_open(str(router_file), framework="pt") as f:
        for name in f.keys():
            if name.endswith(".mlp.router.log_importance"):
                out[int(name.split(".")[2])] = f.get_tensor(name).double().exp().tolist()
    return dict(sorted(out.items()))


def write_importance(router_file: str | Path, importance: list[float]) -> Path:
    """Sets every layer's importance weights (log-priors log gamma_e added to the calibrated logits)
    in a stage-2 router file, after training, as T is set after training; returns the backup (see
    `write_temperatures`: same atomic write, same backup of the trained file).

    Why after training: `router.importance` in the run config is a prior the router trains WITH,
    so its logits learn to offset it; a prior written afterwards moves the decision it was chosen
    for (e.g. more of the help expert's tokens to it, chosen on a dev cut: tools/hhh_dev.py).
    """
    gamma = [float(g) for g in importance]
    if not gamma or not all(g > 0 for g in gamma):
        raise ValueError(f"importance {importance}: one weight > 0 per expert")
    layers = read_importance(router_file)
    if not layers:
        raise CheckpointError(f"{router_file}: no router.log_importance tensor")
    for layer, now in layers.items():
        if len(now) != len(gamma):
            raise ValueError(f"importance {importance}: {len(gamma)} weights, the router has {len(now)} experts")
    return _rewrite(router_file, {f"model.layers.{layer}.mlp.router.log_importance": [math.log(g) for g in gamma]
                                  for layer in layers})


def _rewrite(router_file: str | Path, values: dict[str, float | list[float]]) -> Path:
    """The router file with the named tensors set to `values` (same shape and dtype), written
    atomically, the file as trained kept once as `<file>.bak`; returns the backup."""
    path = Path(router_file)
    with safe_open(str(path), framework="pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    for key, value in values.items():
        if key not in tensors:
            raise CheckpointError(f"{path}: tensor {key!r} is missing")
        old = tensors[key]
        tensors[key] = (torch.full_like(old, value) if isinstance(value, float)
                        else torch.tensor(value, dtype=old.dtype).reshape(old.shape))
    backup = path.with_name(path.name + ".bak")
    if not backup.exists():
        shutil.copy2(path, backup)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return backup
