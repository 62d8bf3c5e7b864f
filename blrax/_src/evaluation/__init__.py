"""Prediction and its evaluation: model averaging, the linearised
predictive, calibration, metrics, uncertainty reports."""
