"""A trained YOLOv1 as one ONNX file: the graph and metadata export.py writes, and `OnnxDetector`, which runs such a
file in ONNX Runtime behind the interface of the PyTorch `Detector`, so that detect.py, evaluate.py and
`yolo.load_detector` take either (and benchmark.py times both runtimes on the model it builds).

The graph takes one input, `images`: a batch (N, 3, H, W) already at the model's input size (the resize happens
before, in yolo.inference.preprocess), of uint8 pixels or of float32 values in [0, 1] as the export's input_type
says (uint8 is divided by 255 in the graph, as the PyTorch path does). It returns
- predictions (N, S, S, 5B + C): the network's output;
- boxes (N, S*S*B, 4): every predictor's box, normalised x1, y1, x2, y2 clipped to [0, 1];
- scores (N, S*S*B, C): each box's class-specific scores, confidence x class probability.
NMS comes after the graph by default: the project's (yolo.postprocess.select_detections), so that ONNX Runtime
gives the PyTorch path's detections. An export with NMS adds ONNX's NonMaxSuppression for runtimes that want
one graph: detection_boxes (N, K, 4), detection_scores (N, K) and detection_labels (N, K) hold each image's
K = max_detections best (box, class) pairs by descending score, padded with score 0; OnnxDetector runs the
project's NMS all the same, so that the scripts' score_threshold, nms_iou and max_detections apply.

The metadata (metadata_props) says what the scripts need besides the graph: class_names, model_args and config
(the training run's settings) as JSON, image_size, grid_size, num_boxes, input_type, nms (JSON: the in-graph
settings, or null), epoch, git_commit (the commit that trained it) and export_commit (the one that exported it).
"""
import json
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from yolo.checkpoint import CheckpointError, git_commit
from yolo.files import atomic_write, kept_message
from yolo.inference import Detector
from yolo.model import YOLOv1
from yolo.photometric import model_input
from yolo.postprocess import EVAL_SCORE_THRESHOLD, MAX_DETECTIONS, NMS_IOU, decode_boxes_and_scores

OPSET = 18                     # the opset torch.onnx's exporter writes natively
MAX_OPSET = onnx.defs.onnx_opset_version()  # the newest the installed onnx knows: beyond it the exporter writes 18
INPUT_NAME = "images"
OUTPUT_NAMES = ("predictions", "boxes", "scores")
NMS_OUTPUT_NAMES = ("detection_boxes", "detection_scores", "detection_labels")
INPUT_TYPES = {"uint8": torch.uint8, "float32": torch.float32}
ONNX_FILE_LIMIT = 2 ** 31 - 1  # bytes: protobuf's limit on one message, so on an .onnx file without external data
JSON_METADATA = ("class_names", "model_args", "config", "nms")
REQUIRED_METADATA = ("class_names", "model_args", "config", "input_type")


class ExportError(RuntimeError):
    """A model that cannot become one .onnx file where asked; the message says why and what to do."""


class GraphModule(nn.Module):
    """What the graph computes: the input scaled as `model_input` does, the network, `decode_boxes_and_scores`."""

    def __init__(self, model: YOLOv1, input_type: str):
        super().__init__()
        self.model, self.takes_pixels = model, input_type == "uint8"

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.takes_pixels:
            images = images.float().div(255)
        predictions = self.model(images)
        return (predictions, *decode_boxes_and_scores(predictions, self.model.num_classes))


def append_nms(graph: onnx.GraphProto, num_candidates: int, num_classes: int, score_threshold: float,
               nms_iou: float, max_detections: int) -> None:
    """Add ONNX's NonMaxSuppression, per image and class, on the graph's boxes and scores, then each image's
    `max_detections` best pairs across classes (TopK over a per-image map of the kept scores, 0 elsewhere):
    outputs detection_boxes (N, K, 4), detection_scores (N, K) and detection_labels (N, K) int64."""
    keep = min(max_detections, num_candidates * num_classes)
    constants = {"nms/max_per_class": np.array([max_detections], np.int64),
                 "nms/iou": np.array([nms_iou], np.float32),
                 "nms/score_threshold": np.array([score_threshold], np.float32),
                 "nms/candidates": np.array(num_candidates, np.int64), "nms/keep": np.array([keep], np.int64),
                 "nms/flat_shape": np.array([0, -1], np.int64), "nms/last_axis": np.array([-1], np.int64)}
    graph.initializer.extend(numpy_helper.from_array(value, name) for name, value in constants.items())
    zero = helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0])
    graph.node.extend([
        helper.make_node("Transpose", ["scores"], ["nms/class_scores"], perm=[0, 2, 1]),  # (N, C, M)
        helper.make_node("NonMaxSuppression", ["boxes", "nms/class_scores", "nms/max_per_class", "nms/iou",
                                               "nms/score_threshold"], ["nms/selected"]),  # (K', 3): image, class, box
        helper.make_node("GatherND", ["nms/class_scores", "nms/selected"], ["nms/selected_scores"]),
        helper.make_node("Split", ["nms/selected"], ["nms/image", "nms/class", "nms/box"], axis=1, num_outputs=3),
        helper.make_node("Mul", ["nms/class", "nms/candidates"], ["nms/class_start"]),
        helper.make_node("Add", ["nms/class_start", "nms/box"], ["nms/pair"]),  # class x M + box
        helper.make_node("Concat", ["nms/image", "nms/pair"], ["nms/pair_index"], axis=1),
        helper.make_node("Reshape", ["nms/class_scores", "nms/flat_shape"], ["nms/pair_scores"]),  # (N, C x M)
        helper.make_node("Shape", ["nms/pair_scores"], ["nms/pair_shape"]),
        helper.make_node("ConstantOfShape", ["nms/pair_shape"], ["nms/zeros"], value=zero),
        helper.make_node("ScatterND", ["nms/zeros", "nms/pair_index", "nms/selected_scores"], ["nms/kept_scores"]),
        helper.make_node("TopK", ["nms/kept_scores", "nms/keep"], ["detection_scores", "nms/best"], axis=1),
        helper.make_node("Div", ["nms/best", "nms/candidates"], ["detection_labels"]),
        helper.make_node("Mod", ["nms/best", "nms/candidates"], ["nms/best_box"]),
        helper.make_node("Unsqueeze", ["nms/best_box", "nms/last_axis"], ["nms/best_box_index"]),
        helper.make_node("GatherND", ["boxes", "nms/best_box_index"], ["detection_boxes"], batch_dims=1),
    ])
    batch = next(output for output in graph.output if output.name == "boxes").type.tensor_type.shape.dim[0]
    batch = batch.dim_param or batch.dim_value
    graph.output.extend([helper.make_tensor_value_info("detection_boxes", TensorProto.FLOAT, [batch, keep, 4]),
                         helper.make_tensor_value_info("detection_scores", TensorProto.FLOAT, [batch, keep]),
                         helper.make_tensor_value_info("detection_labels", TensorProto.INT64, [batch, keep])])


def export_onnx(model: YOLOv1, state: dict, path: str | os.PathLike, *, opset: int, dynamic_batch: bool,
                batch_size: int, input_type: str, nms: dict | None = None) -> None:
    """Write `model` (fp32, eval) with `state`'s class_names, model_args, config, epoch and git_commit as one
    self-contained .onnx file at `path`, through a temporary file renamed over it: a failure leaves what was there.

    `dynamic_batch`: any batch size, else `batch_size` only. `input_type`: uint8 | float32. `nms`: None (NMS
    after the graph), or the score_threshold, nms_iou and max_detections of ONNX's NonMaxSuppression in it.
    Raises ExportError for a model over ONNX's 2 GB single-file limit or a file that cannot be written.
    """
    path = Path(path)
    model = model.float().eval()
    weight_bytes = sum(tensor.numel() * tensor.element_size() for tensor in model.state_dict().values())
    if weight_bytes > ONNX_FILE_LIMIT:
        raise ExportError(f"the model's weights take {weight_bytes / 1e9:.2f} GB in fp32, over ONNX's 2 GB limit "
                          f"on one self-contained file: run the checkpoint itself, or train a smaller head "
                          f"(head_channels, fc_dim) to export.")
    # A dynamic dimension must not be traced at size 1, which torch.export specialises.
    example = torch.zeros(2 if dynamic_batch else batch_size, 3, model.image_size, model.image_size,
                          dtype=INPUT_TYPES[input_type])
    program = torch.onnx.export(GraphModule(model, input_type).eval(), (example,), dynamo=True, external_data=False,
                                opset_version=opset, input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
                                dynamic_shapes={INPUT_NAME: {0: torch.export.Dim("batch")}} if dynamic_batch else None,
                                verbose=False)
    proto = program.model_proto
    if nms is not None:
        append_nms(proto.graph, model.grid_size ** 2 * model.num_boxes, model.num_classes, **nms)
    metadata = {"class_names": list(state["class_names"]), "model_args": state["model_args"],
                "config": state.get("config", {}), "image_size": model.image_size, "grid_size": model.grid_size,
                "num_boxes": model.num_boxes, "input_type": input_type, "nms": nms, "epoch": state.get("epoch"),
                "git_commit": state.get("git_commit", "unknown"), "export_commit": git_commit()}
    helper.set_model_props(proto, {key: json.dumps(value) if key in JSON_METADATA else str(value)
                                   for key, value in metadata.items() if value is not None or key == "nms"})
    try:
        data = proto.SerializeToString()
    except ValueError as error:  # protobuf refuses a message over 2 GB
        raise ExportError(f"the graph is over ONNX's 2 GB limit on one self-contained file ({error}): run the "
                          f"checkpoint itself, or train a smaller head (head_channels, fc_dim) to export.") from None
    try:
        with atomic_write(path) as file:
            file.write(data)
    except OSError as error:
        raise ExportError(f"cannot write {path} ({error.strerror or error}); {kept_message(path)}: free some space "
                          f"or choose another --out.") from error


def open_session(path: Path) -> tuple[onnxruntime.InferenceSession, dict]:
    """An ONNX Runtime session of an export.py file on the CPU (as many threads as torch uses), and its metadata
    as a checkpoint holds it (model_args, class_names, config, epoch, git_commit, ...)."""
    if not path.is_file():
        raise CheckpointError(f"No ONNX model at {path}: export one with `python export.py --checkpoint=RUN/last.pt "
                              f"--out={path}` or give the right path.")
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    # Its threads would otherwise spin for a while after each run, taking the cores from the resize and NMS around it.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3  # errors only: its warnings about unused initializers are not the user's
    try:
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as error:  # ONNX Runtime raises its own types for a truncated or foreign file
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CheckpointError(f"{path} is not a readable ONNX model ({reason}): export it again with export.py.") \
            from error
    metadata = session.get_modelmeta().custom_metadata_map
    missing = [key for key in REQUIRED_METADATA if key not in metadata]
    missing += [name for name in OUTPUT_NAMES if name not in {output.name for output in session.get_outputs()}]
    if missing:
        raise CheckpointError(f"{path} is an ONNX model, but not one export.py wrote (it has no {', '.join(missing)})"
                              f": export the checkpoint with export.py.")
    state = {key: json.loads(value) if key in JSON_METADATA else value for key, value in metadata.items()}
    if "epoch" in state:
        state["epoch"] = int(state["epoch"])
    return session, state


class OnnxDetector(Detector):
    """An export.py .onnx file run by ONNX Runtime on the CPU in fp32, with the Detector's interface: `predict`
    and `infer` on batches at the input size (uint8 pixels or floats in [0, 1], whichever the graph takes), a
    call on uint8 images of any size, and `detections` by the project's NMS. `state` is the file's metadata."""

    def __init__(self, path: str | os.PathLike, device: str | torch.device = "auto", dtype: str | torch.dtype = "auto",
                 score_threshold: float = EVAL_SCORE_THRESHOLD, nms_iou: float = NMS_IOU,
                 max_detections: int = MAX_DETECTIONS):
        path = Path(path)
        if str(device) not in ("auto", "cpu"):
            raise CheckpointError(f"{path}: ONNX Runtime runs it on the CPU here, not on {device}: use device cpu "
                                  f"(or auto).")
        if dtype not in ("auto", "fp32", torch.float32):
            raise CheckpointError(f"{path}: an .onnx model computes in fp32, the dtype it was exported in, not "
                                  f"{dtype}: use dtype fp32 (or auto).")
        self.session, self.state = open_session(path)
        model_args = self.state["model_args"]
        self.image_size, self.grid_size = model_args["image_size"], model_args["grid_size"]
        self.num_classes = len(self.state["class_names"])
        self.device, self.dtype = torch.device("cpu"), torch.float32
        self.input_dtype = INPUT_TYPES[self.state["input_type"]]
        self.score_threshold, self.nms_iou, self.max_detections = score_threshold, nms_iou, max_detections
        batch = self.session.get_inputs()[0].shape[0]
        self.fixed_batch = batch if isinstance(batch, int) else None  # export.py --dynamic_batch=false: N only

    def graph_input(self, batch: torch.Tensor) -> np.ndarray:
        """A batch at the input size, uint8 pixels or floats in [0, 1], as the graph takes it. Floats become pixels
        by rounding, exact for preprocess's outputs (the CPU resizes uint8 pixels, then divides by 255)."""
        expected = (3, self.image_size, self.image_size)
        if batch.dim() != 4 or tuple(batch.shape[1:]) != expected:
            raise ValueError(f"Expected images of shape (N, {', '.join(map(str, expected))}), "
                             f"got {tuple(batch.shape)}.")
        if self.input_dtype == torch.uint8:
            pixels = batch if batch.dtype == torch.uint8 else batch.float().mul(255).round_().to(torch.uint8)
            return np.ascontiguousarray(pixels.cpu().numpy())
        return np.ascontiguousarray(model_input(batch, self.device).numpy())

    def run(self, names: list[str], batch: torch.Tensor) -> list[torch.Tensor]:
        """The graph's outputs `names` for a batch of any size: a graph exported for a fixed batch size N runs
        on slices of N, the last one padded with blank images whose outputs are dropped."""
        inputs = self.graph_input(batch)
        if self.fixed_batch is None:
            return [torch.from_numpy(output) for output in self.session.run(names, {INPUT_NAME: inputs})]
        parts = []
        for start in range(0, max(len(inputs), 1), self.fixed_batch):
            chunk = inputs[start:start + self.fixed_batch]
            count = len(chunk)
            padding = np.zeros((self.fixed_batch - count, *inputs.shape[1:]), dtype=inputs.dtype)
            outputs = self.session.run(names, {INPUT_NAME: np.concatenate([chunk, padding])})
            parts.append([output[:count] for output in outputs])
        return [torch.from_numpy(np.concatenate(outputs)) for outputs in zip(*parts)]

    def predict(self, batch: torch.Tensor) -> torch.Tensor:
        return self.run([OUTPUT_NAMES[0]], batch)[0]

    def infer(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return tuple(self.run(list(OUTPUT_NAMES), batch))
