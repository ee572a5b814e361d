"""Router calibration: ECE/MCE/Brier/NLL, temperature scaling fitted on held-out data, plots."""
from trinityx_ds.calibration.metrics import brier, calibration_report, ece, mce, nll, reliability_table
from trinityx_ds.calibration.temperature import calibrated_probs, fit_per_layer, fit_temperature

__all__ = ["brier", "calibrated_probs", "calibration_report", "ece", "fit_per_layer", "fit_temperature",
           "mce", "nll", "reliability_table"]
