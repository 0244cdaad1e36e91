"""Training checkpoints: written atomically (in the background while training goes on), read safely
(weights_only), checked against the config."""
import copy
import errno
import subprocess
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from yolo.files import atomic_write, kept_message
from yolo.model import YOLOv1

# The settings that build the model.
ARCHITECTURE_KEYS = ("backbone", "num_classes", "grid_size", "num_boxes", "image_size", "head_channels", "fc_dim")
# The only settings a resumed run may change: how long, where and how fast it runs, not what it computes
# (a longer run continues the same schedule). Any other difference, in a setting added later too, is refused.
RESUMABLE_CHANGES = ("epochs", "micro_batch_size", "num_workers", "cache_images", "pin_memory", "prefetch_factor",
                     "eval_every", "log_every", "bad_images", "device", "dtype", "compile", "out_dir", "resume")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable, or made for another model or run."""


def git_commit() -> str:
    """The repository's commit (with '-dirty' for uncommitted changes), or 'unknown' outside git."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("-dirty" if dirty else "")


def save_checkpoint(state: dict, path: str | Path) -> None:
    """Write to a temporary file, flush it to disk, then rename: a crash leaves the old file intact.

    A failed write removes the temporary file and raises CheckpointError saying why ("disk full" when it is).
    """
    path = Path(path)
    try:
        with atomic_write(path) as file:
            torch.save(state, file)
    except (OSError, RuntimeError) as error:
        kept = kept_message(path)
        if _is_disk_full(error):
            raise CheckpointError(f"disk full while saving {path} ({kept}): free some space on that disk, "
                                  f"or choose another out_dir, and rerun to resume.") from error
        raise CheckpointError(f"cannot save {path} ({error}); {kept}.") from error


class CheckpointWriter:
    """Writes checkpoints with save_checkpoint in a background thread, one at a time, so that training goes
    on while a file of gigabytes reaches the disk.

    `save` returns once the state is copied to host memory: training may then change its tensors in place.
    A failed write raises its CheckpointError at the next `save` or `wait`; call `wait` before anything that
    needs the file complete (the `done` marker, leaving the process).
    """

    def __init__(self):
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-writer")
        self._pending: Future | None = None

    def save(self, state: dict, path: str | Path) -> None:
        self.wait()  # one host copy at a time: the state of a large model takes gigabytes
        self._pending = self._executor.submit(save_checkpoint, _host_copy(state), path)

    def wait(self) -> None:
        """Block until the last save is on disk; raise its error if it failed."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()


def _host_copy(value):
    """`value` with every tensor in its dicts, lists and tuples copied to the CPU: on a CPU the state's
    tensors are the model's own, which the next optimizer step changes in place."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        copied = copy.copy(value)  # the same type and attributes: a state_dict's OrderedDict carries _metadata
        copied.update((key, _host_copy(item)) for key, item in value.items())
        return copied
    if isinstance(value, list):
        return [_host_copy(item) for item in value]
    if isinstance(value, tuple):
        return tuple(_host_copy(item) for item in value)
    return value


def _is_disk_full(error: BaseException | None) -> bool:
    # torch.save reports a short write either as ENOSPC or as its zip writer's "unexpected pos" error.
    while error is not None:
        if getattr(error, "errno", None) == errno.ENOSPC or "unexpected pos" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"No checkpoint at {path}: train one with train.py or give the right path.")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch.load raises many types for a truncated or foreign file
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        best = path.parent / "best.pt"
        way_out = (f"rerun with --resume={best} to go on from the run's best weights with a fresh optimizer, or "
                   f"delete it to start again" if path.name == "last.pt" and best.is_file()
                   else "replace it, or delete it and start again")
        raise CheckpointError(f"{path} is not a readable checkpoint of this project ({reason}): {way_out}.") \
            from error


def config_differences(saved: dict, current: dict, may_change=RESUMABLE_CHANGES,
                       defaults: dict | None = None) -> list[str]:
    """'name: saved -> current' for each setting, in either config, that differs and may not change.

    Values are compared as JSON would store them (a tuple equals the list it was saved as). A setting that the
    saved config lacks (added to the script since) counts as its value in `defaults`: the run used what the
    setting now names by default.
    """
    saved = {**(defaults or {}), **saved}

    def normal(value):
        return list(value) if isinstance(value, tuple) else value
    return [f"{key}: {saved.get(key)!r} -> {current.get(key)!r}" for key in dict.fromkeys([*saved, *current])
            if key not in may_change and normal(saved.get(key)) != normal(current.get(key))]


def load_model(path: str | Path) -> tuple[YOLOv1, dict]:
    """The model a train.py checkpoint describes, with its weights, and the checkpoint itself."""
    state = load_checkpoint(path)
    if "model_args" not in state or "class_names" not in state:
        raise CheckpointError(f"{path} is not a train.py checkpoint of this project (it has no model_args or "
                              f"class_names).")
    model = YOLOv1(**state["model_args"])
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as error:
        raise CheckpointError(f"{path} does not fit the architecture it names ({state['model_args']}): {error}") \
            from error
    return model, state


def load_backbone_weights(model: YOLOv1, path: str | Path) -> None:
    """Copy the backbone (convolutions and BatchNorm) of a pretrain.py checkpoint into `model`'s backbone.

    Only the backbone is taken: the classifier's pooling and fully connected layer are dropped, and the
    detection head keeps its fresh initialisation.
    """
    if not Path(path).is_file():
        raise CheckpointError(f"No checkpoint at {path}: pretrain a backbone with pretrain.py (its out_dir/last.pt) "
                              f"or give the right path.")
    state = load_checkpoint(path)
    config = state.get("config", {})
    if "model" not in state or config.get("task") != "classification":
        raise CheckpointError(f"{path} is not a pretrain.py checkpoint (backbone_weights takes the last.pt that "
                              f"pretrain.py writes).")
    if config.get("backbone") != model.backbone_name:
        raise CheckpointError(f"{path} holds a pretrained {config.get('backbone')} backbone, not the "
                              f"{model.backbone_name} this run builds: set backbone={config.get('backbone')} or "
                              f"pretrain a {model.backbone_name}.")
    prefix = "backbone."
    backbone_state = {key.removeprefix(prefix): value for key, value in state["model"].items()
                      if key.startswith(prefix)}
    try:
        model.backbone.load_state_dict(backbone_state)
    except RuntimeError as error:
        raise CheckpointError(f"{path} does not fit the {model.backbone_name} backbone: {error}") from error
