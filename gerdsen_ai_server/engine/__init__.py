"""Engine: model loading and the inference thread; no Flask here."""
