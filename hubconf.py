"""torch.hub entry point: a trained YOLOv1 as `yolo.load_detector` gives it.

    detector = torch.hub.load("path/to/this/repository", "yolov1", source="local",
                              checkpoint="runs/resnet18_voc2012val/last.pt")
    result = detector.predict("street.jpg")
"""
from yolo.api import load_detector

dependencies = ["torch", "torchvision", "numpy", "PIL", "tqdm", "yaml"]  # what `yolo` imports to predict


def yolov1(checkpoint: str, device: str = "auto", dtype: str = "auto"):
    """YOLOv1 from a train.py checkpoint (last.pt, best.pt) or an export_weights.py weights file.

    Returns a `yolo.ImageDetector`: `.predict(images)` gives each image's boxes (in its pixels), scores,
    class indices, names and ids, and draws them (`plot()`, `save(path)`). `device`: auto | cpu | cuda | cuda:N; `dtype`: auto | fp32 | bf16 | fp16.
    """
    return load_detector(checkpoint, device, dtype)
