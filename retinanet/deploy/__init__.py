"""Deployment: the whole detector exported as one ONNX graph (`onnx_export`) that ONNX Runtime
runs without PyTorch."""
