"""Training, quantization, calibration and evaluation of the edge and cloud models (needs the train extra)."""
