"""Router calibration: ECE/MCE/Brier/NLL, temperature scaling fitted on held-out data, plots.

The names below are metrics.py's and temperature.py's (torch), imported when first used: every
`trinityx` invocation (`--help` included) builds `calibrate`'s parser (calibration/cli.py), which
imports this package."""
__all__ = ["brier", "calibrated_probs", "calibration_report", "ece", "fit_per_layer", "fit_temperature",
           "mce", "nll", "reliability_table"]


def __getattr__(name: str):
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from trinityx_ds.calibration import metrics, temperature

    return getattr(metrics if hasattr(metrics, name) else temperature, name)
