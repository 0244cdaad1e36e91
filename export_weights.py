"""Turn a run's checkpoint into a weights file to share: fp16 weights (half the size), named by its SHA-256.

    python export_weights.py --checkpoint=runs/resnet18_voc2012val/last.pt --out_dir=weights

Writes out_dir/<run>_<checkpoint>-<the first 8 hex digits of the file's SHA-256>.pth (torchvision's naming,
which torch.hub.load_state_dict_from_url(check_hash=True) verifies), holding the model's weights in fp16,
the model's arguments, the class names and the run's settings. `yolo.load_detector`, hubconf.py's yolov1,
evaluate.py and detect.py read it as they read a checkpoint, the weights back in fp32; training cannot
resume from it (no optimizer state).
"""
import sys
from pathlib import Path

from yolo.api import export_weights
from yolo.checkpoint import CheckpointError
from yolo.config import resolve_config

checkpoint = "runs/resnet18_voc2012val/last.pt"  # a train.py checkpoint (last.pt is the reported one, or best.pt)
out_dir = ""                   # where the weights file goes; empty: beside the checkpoint


def main(config: dict) -> None:
    checkpoint_path = Path(config["checkpoint"])
    try:
        path = export_weights(checkpoint_path, config["out_dir"] or checkpoint_path.parent)
    except (CheckpointError, OSError) as error:  # no such checkpoint, or an out_dir that cannot be written
        sys.exit(f"error: {error}")
    print(f"wrote {path} ({path.stat().st_size / checkpoint_path.stat().st_size:.0%} of {checkpoint_path}'s size)")


if __name__ == "__main__":
    main(resolve_config(globals()))
