"""YOLOv1 (Redmon et al., 2016) in PyTorch: model, loss, data, decoding and metrics."""
