"""Model contract and the offline default models."""
