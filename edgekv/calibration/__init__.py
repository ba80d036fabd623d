"""Budget calibration and INT8 quantization (see issue 6)."""
