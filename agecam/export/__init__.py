"""Training checkpoint to self-describing ONNX age model, with checks and fp16/int8 variants."""
