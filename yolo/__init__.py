"""YOLOv1 (Redmon et al., 2016) in PyTorch: model, loss, data, decoding and metrics.

Detection from Python (see yolo.api):

    import yolo

    detector = yolo.load_detector("runs/resnet18_voc2012val/last.pt")
    result = detector.predict("street.jpg")  # a list of images gives a list of results
    print(result.boxes, result.scores, result.names)
    result.save("street_boxes.jpg")
"""

__all__ = ["Detections", "ImageDetector", "export_weights", "load_detector"]


def __getattr__(name: str):
    # Imported on first use: scripts that only read settings or tables (yolo.config, yolo.results) would
    # otherwise load torch for nothing, which takes seconds.
    if name in __all__:
        from yolo import api
        return getattr(api, name)
    raise AttributeError(f"module 'yolo' has no attribute {name!r}")
