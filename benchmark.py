"""Inference speed of YOLOv1: the model's forward pass alone, and end to end, per backbone, batch size and dtype;
and the rate at which the training data path delivers images.

    python benchmark.py                                                   # CUDA if available, else CPU
    python benchmark.py --device=cpu --backbones=resnet18 --batch_sizes=1,8 --iters=10
    python benchmark.py --modes=loader,baseline_loader --num_workers=1 --device=cpu   # the data path
    python benchmark.py --device=cpu --runtimes=pytorch,onnxruntime --dtypes=fp32,bf16  # ONNX Runtime beside PyTorch

Modes (`modes`): `forward` times the model alone, `end_to_end` the whole detection pipeline,
`baseline_end_to_end` the straightforward pipeline below, `train_step` one training step on device-resident
batches (uint8 -> float on the device, forward and loss under the dtype's autocast with fp32 weights,
backward, the recipe's SGD step, fused on CUDA, with a GradScaler for fp16): the GPU-only training rate.

End to end is what evaluation and detection do: a uint8 batch of VOC-sized images (500 x 375) -> resize ->
forward -> decoding and class-wise NMS -> per-image VOC-pixel detections, at the evaluation score threshold.
Runtime `onnxruntime` (`runtimes`, CPU only) times the same model exported as export.py does (fp32, float32
input, any batch) to a temporary .onnx file and run by ONNX Runtime with torch's thread count, in modes forward
(the graph: network and decoding) and end_to_end (the same resize before it, the same NMS after it).
The models have random weights (speed does not depend on them), so every candidate box passes that
threshold: the most decoding and NMS work there can be. Mode `baseline_end_to_end` times the
straightforward pipeline the inference mode (yolo/inference.py) is measured against: image-by-image resize,
the eager fp32 model, cell-by-cell Python decoding and NumPy NMS.

Mode `loader` times the training data path with the paper's augmentation and no model: workers decode,
crop, resize and flip uint8 images and draw each image's colour factors; mode `baseline_loader` times the
path it replaced, which converted every image to float32 and jittered its colours in the worker. A batch
counts as delivered once copied to the device. The training step's work on it there (yolo.photometric's
model_input: float conversion and, for the new path, the colour jitter) is timed apart and printed. Both
modes read the same images (`protocol` and `data_dir` as for train.py, or a temporary synthetic set of
VOC-sized images) with the same workers and batch size, one after the other, in two rounds of alternating
order. Their rows name no backbone ("none"), the batch's dtype as the loader delivers it, and the worker
count in device_name (so each worker count is a measurement of its own); their latency is the interval
between batches in the steady state.

Latency is per batch: median and 90th percentile of `iters` timed runs after `warmup` untimed ones (CUDA
events after a synchronisation on the GPU); throughput is batch size / median latency. The measurements of
one backbone and batch size run interleaved, one run of each in turn, so that load from other processes
falls on all of them alike and their ratios stay meaningful on a shared machine. On the CPU the same rounds
time a 2048 x 2048 fp32 matmul, the machine's practical peak, and the forward pass's FLOP rate is printed as
a fraction of it. The rows go into `out` in place of earlier rows of the same measurement (device, backbone,
dtype, batch size, mode, image size and compile); rows of other measurements stay.
"""
import sys
import tempfile
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode
from torchvision.transforms import v2

from data import make_synthetic
from yolo.boxes import normalized_to_voc
from yolo.config import at_least, between, format_config, one_of, resolve_config
from yolo.data import PROTOCOLS, build_dataset
from yolo.device import DTYPES, device_name, is_native, resolve_device
from yolo.engine import apply_update, autocast_context
from yolo.inference import Detector, preprocess
from yolo.loader_benchmark import LOADER_MODES, benchmark_loader
from yolo.loss import yolo_loss_terms
from yolo.model import BACKBONES, YOLOv1
from yolo.optim import build_optimizer
from yolo.photometric import model_input
from yolo.postprocess import EVAL_SCORE_THRESHOLD, MAX_DETECTIONS, NMS_IOU
from yolo.results import ResultsError, check_writable, write_keyed
from yolo.targets import encode_target
from yolo.timing import time_interleaved, timing_rows
from yolo.transforms import DetectionBatch, SharedMemoryError

# --- what to time
modes = ("forward", "end_to_end", "baseline_end_to_end")  # those, train_step, loader, baseline_loader; comma-separated
backbones = ("resnet18", "resnet50")  # resnet18 | resnet50 | mobilenet_v2 | darknet | fast, comma-separated
device = "auto"                # auto (cuda if available, else cpu) | cpu | cuda | cuda:N
batch_sizes = (1, 8)           # images per batch, comma-separated: 1 gives the latency, larger the throughput
dtypes = ("fp32", "bf16", "fp16")  # fp32 | bf16 | fp16, comma-separated; ones the device emulates are skipped
runtimes = ("pytorch",)        # pytorch | onnxruntime (fp32, CPU, forward and end_to_end), comma-separated
emulated_dtypes = False        # time those anyway (bf16 on a CPU without AVX512-BF16 / AMX: many times slower)
compile = False                # torch.compile the inference model (baseline stays eager); CPU here: ~1.1 x, minutes
baseline = True                # also time the straightforward pipeline (mode baseline_end_to_end, eager fp32)
score_threshold = EVAL_SCORE_THRESHOLD  # end to end: keep (box, class) pairs scoring above this (0..1)
nms_iou = NMS_IOU              # end to end: class-wise NMS IoU (0..1)
max_detections = MAX_DETECTIONS  # end to end: detections kept per image
threads = 0                    # CPU threads for PyTorch's intra-op parallelism; 0 keeps its default (one per core)
# --- model (the defaults are the paper's; smaller values only make quick test models)
image_size = 448               # input side in pixels; image_size / 32 must be grid_size or 2 x grid_size
grid_size = 7                  # S, cells per side
head_channels = 1024           # width of the head's convolutions
fc_dim = 4096                  # width of the hidden fully connected layer
# --- loader modes
protocol = "synthetic"         # voc2012val | voc2007test | synthetic: the training set the loader reads
data_dir = ""                  # as train.py's; empty: a temporary synthetic set of VOC-sized (500 x 375) JPEGs
num_workers = (4,)             # loading processes, comma-separated: one measurement each
# --- timing and output
warmup = 3                     # untimed runs of each measurement before timing
iters = 20                     # timed runs of each measurement
out = "results/benchmark.csv"  # CSV the rows are written to, replacing earlier rows of the same measurements

NUM_CLASSES = 20
SOURCE_HEIGHT, SOURCE_WIDTH = 375, 500  # a typical VOC image
MATMUL_SIZE = 2048
INFERENCE_MODES = ("forward", "end_to_end", "baseline_end_to_end")
RUNTIMES = ("pytorch", "onnxruntime")
LOADER_SYNTHETIC_IMAGES = 64   # the loader cycles through them: enough distinct files to decode
RULES = {"modes": one_of(*INFERENCE_MODES, "train_step", *LOADER_MODES), "device": resolve_device,
         "backbones": one_of(*BACKBONES), "batch_sizes": at_least(1), "runtimes": one_of(*RUNTIMES),
         "dtypes": one_of(*DTYPES), "score_threshold": between(0.0, 1.0), "nms_iou": between(0.0, 1.0),
         "max_detections": at_least(1), "threads": at_least(0), "image_size": at_least(32), "grid_size": at_least(1),
         "head_channels": at_least(1), "fc_dim": at_least(1), "protocol": one_of(*PROTOCOLS),
         "num_workers": at_least(0), "warmup": at_least(0), "iters": at_least(1)}
CSV_COLUMNS = ("backbone", "device", "device_name", "dtype", "batch_size", "image_size", "mode", "compile",
               "runtime", "latency_ms_median", "latency_ms_p90", "throughput_img_s", "params_m", "gflops",
               "torch_version", "date")
# What names one measurement: a rerun with these equal replaces the earlier rows. A file written before the
# runtime column existed reads as PyTorch's rows (yolo.results.COLUMN_DEFAULTS).
CSV_KEY = ("device_name", "backbone", "dtype", "batch_size", "mode", "image_size", "compile", "runtime")


def dtypes_to_time(names: tuple[str, ...], device: torch.device, include_emulated: bool) -> list[str]:
    chosen = []
    for name in names:
        if include_emulated or is_native(DTYPES[name], device):
            chosen.append(name)
        else:
            print(f"skipping {name}: the {device.type} here ({device_name(device)}) only emulates it; "
                  f"--emulated_dtypes=true times it anyway")
    return chosen


def runtimes_to_time(names: tuple[str, ...], device: torch.device) -> list[str]:
    if "onnxruntime" in names and device.type != "cpu":
        print(f"skipping onnxruntime: ONNX Runtime runs on the CPU here, not on {device_name(device)}")
        return [name for name in names if name != "onnxruntime"]
    return list(names)


def exported_detector(model: YOLOv1, model_args: dict, postprocess: dict):
    """`model` as export.py writes it (fp32, float32 input, any batch size) in a temporary .onnx file, opened by
    ONNX Runtime (which reads the whole file when it opens it) as an OnnxDetector."""
    from yolo.onnx_model import OPSET, OnnxDetector, export_onnx  # onnx and onnxruntime only when timed
    state = {"model_args": model_args, "class_names": [f"class {index}" for index in range(NUM_CLASSES)]}
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.onnx"
        export_onnx(model, state, path, opset=OPSET, dynamic_batch=True, batch_size=1, input_type="float32")
        return OnnxDetector(path, "cpu", "fp32", **postprocess)


def forward_gflops(model: torch.nn.Module, device: torch.device) -> float:
    """GFLOPs of one image's forward pass as PyTorch's FlopCounterMode counts them (convolutions and
    matrix products, two per multiply-add; the element-wise ops are not counted)."""
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.rand(1, 3, model.image_size, model.image_size, device=device))
    return counter.get_total_flops() / 1e9


def numpy_nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> list[int]:
    """Greedy NMS, one box at a time: indices of the kept boxes, by descending score."""
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size:
        best, rest = order[0], order[1:]
        keep.append(int(best))
        top_left = np.maximum(boxes[best, :2], boxes[rest, :2])
        bottom_right = np.minimum(boxes[best, 2:], boxes[rest, 2:])
        intersection = np.clip(bottom_right - top_left, 0, None).prod(axis=1)
        iou = intersection / (areas[best] + areas[rest] - intersection + 1e-9)
        order = rest[iou <= iou_threshold]
    return keep


def decode_cells(cells: np.ndarray, num_classes: int, width: int, height: int,
                 score_threshold: float, nms_iou: float, max_detections: int) -> np.ndarray:
    """The baseline's decoding of one image's (S, S, 5B + C) output, cell by cell -> (K, 6) VOC-pixel detections.

    The same rules as yolo.postprocess (class-specific scores, boxes clipped, class-wise NMS, best 100).
    """
    grid_size, num_boxes = cells.shape[0], (cells.shape[-1] - num_classes) // 5
    boxes, scores, labels = [], [], []
    for row in range(grid_size):
        for col in range(grid_size):
            class_probs = cells[row, col, 5 * num_boxes:]
            for predictor in range(num_boxes):
                x, y, w, h, conf = cells[row, col, 5 * predictor:5 * predictor + 5]
                centre_x, centre_y = (col + x) / grid_size, (row + y) / grid_size
                box = np.clip([centre_x - w / 2, centre_y - h / 2, centre_x + w / 2, centre_y + h / 2], 0.0, 1.0)
                for label in range(num_classes):
                    score = conf * class_probs[label]
                    if score > score_threshold:
                        boxes.append(box)
                        scores.append(score)
                        labels.append(label)
    boxes, scores, labels = np.array(boxes).reshape(-1, 4), np.array(scores), np.array(labels)
    kept = []
    for label in np.unique(labels):
        of_label = np.flatnonzero(labels == label)
        kept += [of_label[i] for i in numpy_nms(boxes[of_label], scores[of_label], nms_iou)]
    kept = sorted(kept, key=lambda index: -scores[index])[:max_detections]
    voc_boxes = normalized_to_voc(torch.from_numpy(boxes[kept]).double(), width, height).numpy()
    return np.column_stack([voc_boxes, scores[kept], labels[kept]]).astype(np.float64)


def baseline_detect(model: YOLOv1, images: torch.Tensor, postprocess: dict) -> list[np.ndarray]:
    """The straightforward pipeline: resize image by image, eager fp32 forward, `decode_cells` image by image."""
    height, width = images.shape[-2:]
    device = next(model.parameters()).device
    resized = torch.stack([v2.functional.resize(image, [model.image_size] * 2, antialias=True) for image in images])
    with torch.no_grad():
        pred = model(resized.to(device).float() / 255).cpu().numpy()
    return [decode_cells(cells, model.num_classes, width, height, **postprocess) for cells in pred]


def benchmark_backbone(backbone: str, config: dict, device: torch.device, dtype_names: list[str],
                       runtime_names: list[str]) -> list[dict]:
    """Rows for one backbone, every batch size, dtype, runtime and mode; prints the speed-ups and fraction of peak."""
    torch.manual_seed(0)
    model_args = {"backbone": backbone, "num_classes": NUM_CLASSES, "grid_size": config["grid_size"],
                  "image_size": config["image_size"], "head_channels": config["head_channels"],
                  "fc_dim": config["fc_dim"]}
    model = YOLOv1(**model_args).to(device).eval()
    params_m = sum(parameter.numel() for parameter in model.parameters()) / 1e6
    gflops = forward_gflops(model, device)
    common = {"backbone": backbone, "device": device.type, "device_name": device_name(device),
              "image_size": config["image_size"], "params_m": round(params_m, 3), "gflops": round(gflops, 3),
              "torch_version": torch.__version__}
    rows = benchmark_train_step(backbone, config, device, dtype_names, common) if "train_step" in config["modes"] \
        else []
    if not set(config["modes"]) & set(INFERENCE_MODES):
        return rows
    postprocess = {key: config[key] for key in ("score_threshold", "nms_iou", "max_detections")}
    detectors = {(name, "pytorch"): Detector(model, DTYPES[name], device, config["compile"], **postprocess)
                 for name in dtype_names if "pytorch" in runtime_names}
    if "onnxruntime" in runtime_names:
        detectors["fp32", "onnxruntime"] = exported_detector(model, model_args, postprocess)
    matrix = torch.randn(MATMUL_SIZE, MATMUL_SIZE)
    for batch_size in config["batch_sizes"]:
        # Each batch size compiles anew (one graph per detector): never past Dynamo's recompile limit,
        # beyond which it would silently run eager in rows that say compile.
        torch._dynamo.reset()
        images = torch.randint(0, 256, (batch_size, 3, SOURCE_HEIGHT, SOURCE_WIDTH), dtype=torch.uint8)
        if device.type == "cuda":
            images = images.pin_memory()
        runs = {}
        for (name, runtime), detector in detectors.items():
            inputs = preprocess(images, config["image_size"], detector.input_dtype, device)
            compiled = config["compile"] and runtime == "pytorch"
            runs["forward", name, compiled, runtime] = partial(detector.predict, inputs)
            runs["end_to_end", name, compiled, runtime] = partial(detector, images)
        runs = {key: run for key, run in runs.items() if key[0] in config["modes"]}
        if config["baseline"] and "baseline_end_to_end" in config["modes"]:
            runs["baseline_end_to_end", "fp32", False, "pytorch"] = partial(baseline_detect, model, images, postprocess)
        if device.type == "cpu":
            runs["matmul", "fp32", False, "pytorch"] = partial(torch.mm, matrix, matrix)
        times = time_interleaved(runs, config["warmup"], config["iters"], device)
        matmul_ms = times.pop(("matmul", "fp32", False, "pytorch"), None)
        batch_rows = timing_rows(times, common, batch_size)
        print_summary(batch_rows, gflops, matmul_ms)
        rows += batch_rows
    return rows


def random_training_batch(batch_size: int, config: dict, device: torch.device) -> DetectionBatch:
    """Device-resident uint8 images at the input size and YOLO targets of 1-4 random boxes per image, without
    colour factors or target dicts."""
    generator = torch.Generator().manual_seed(batch_size)
    images = torch.randint(0, 256, (batch_size, 3, config["image_size"], config["image_size"]), dtype=torch.uint8,
                           generator=generator)
    targets = []
    for _ in range(batch_size):
        count = int(torch.randint(1, 5, (), generator=generator))
        corners = torch.rand(count, 2, 2, generator=generator).sort(dim=1).values  # (x1, y1) <= (x2, y2)
        boxes = corners.flatten(1).clamp(0, 1)
        targets.append(encode_target(boxes, torch.randint(0, NUM_CLASSES, (count,), generator=generator),
                                     config["grid_size"], NUM_CLASSES))
    return DetectionBatch(images.to(device).contiguous(memory_format=torch.channels_last),
                          torch.stack(targets).to(device), None, [])


def train_step(model, optimizer, scaler, batch: DetectionBatch, dtype: torch.dtype) -> None:
    """One training step as train.py takes it, with nothing left to skip (the batch is known finite)."""
    device = batch.images.device
    with autocast_context(device, dtype):
        predictions = model(model_input(batch.images, device, batch.colour_factors))
    loss = sum(yolo_loss_terms(predictions, batch.grids).values())
    scaler.scale(loss).backward()
    apply_update(optimizer, scaler, skip=torch.zeros((), dtype=torch.bool, device=device))


def benchmark_train_step(backbone: str, config: dict, device: torch.device, dtype_names: list[str],
                         common: dict) -> list[dict]:
    """Rows of mode train_step for every batch size and dtype: one training model per dtype, all timed
    interleaved. Training keeps fp32 weights whatever the dtype (autocast), unlike the inference modes."""
    torch.manual_seed(0)
    trainers = {}
    for name in dtype_names:
        model = YOLOv1(backbone, NUM_CLASSES, config["grid_size"], image_size=config["image_size"],
                       head_channels=config["head_channels"], fc_dim=config["fc_dim"])
        model = model.to(device, memory_format=torch.channels_last).train()
        optimizer = build_optimizer(model, "sgd", 1e-4, 0.9, 5e-4, fused=device.type == "cuda")
        scaler = torch.amp.GradScaler(device.type, enabled=DTYPES[name] == torch.float16)
        trainers[name] = (torch.compile(model) if config["compile"] else model, optimizer, scaler)
    rows = []
    autotuning = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True  # as train.py trains on CUDA
    for batch_size in config["batch_sizes"]:
        torch._dynamo.reset()  # one graph per training model and batch size, as for the inference modes
        batch = random_training_batch(batch_size, config, device)
        runs = {("train_step", name, config["compile"], "pytorch"): partial(train_step, *trainer, batch, DTYPES[name])
                for name, trainer in trainers.items()}
        rows += timing_rows(time_interleaved(runs, config["warmup"], config["iters"], device), common, batch_size)
    torch.backends.cudnn.benchmark = autotuning
    return rows


def write_voc_sized_set(root: Path) -> Path:
    """LOADER_SYNTHETIC_IMAGES synthetic JPEGs of 500 x 375 with their annotations, as the train split of `root`."""
    make_synthetic.make_voc_dirs(root)
    ids = [f"train_{index:06d}" for index in range(LOADER_SYNTHETIC_IMAGES)]
    for index, image_id in enumerate(ids):
        pixels, objects = make_synthetic.render_image(np.random.default_rng([0, index]), SOURCE_WIDTH, SOURCE_HEIGHT)
        make_synthetic.write_voc_item(root, image_id, pixels, objects)
    (root / "ImageSets" / "Main" / "train.txt").write_text("".join(f"{image_id}\n" for image_id in ids))
    (root / "classes.txt").write_text("".join(f"{name}\n" for name in make_synthetic.CLASS_NAMES))
    return root


def print_summary(rows: list[dict], gflops: float, matmul_ms: np.ndarray | None) -> None:
    """Speed-up of end to end over the baseline, of ONNX Runtime over each PyTorch dtype; on the CPU, the PyTorch
    forward pass's share of the matmul peak."""
    throughput = {(row["mode"], row["dtype"], row["runtime"]): row["throughput_img_s"] for row in rows}
    label = f"{rows[0]['backbone']} batch {rows[0]['batch_size']}"
    baseline = throughput.get(("baseline_end_to_end", "fp32", "pytorch"))
    for (mode, dtype, runtime), images_per_s in throughput.items():
        if mode == "end_to_end" and baseline:
            print(f"{label}: end to end {runtime} {dtype} {images_per_s:.2f} img/s = {images_per_s / baseline:.2f} x "
                  f"the baseline")
    for mode in ("forward", "end_to_end"):
        onnx_runtime = throughput.get((mode, "fp32", "onnxruntime"))
        pytorch = {dtype: value for (row_mode, dtype, runtime), value in throughput.items()
                   if row_mode == mode and runtime == "pytorch"}
        if onnx_runtime and pytorch:
            print(f"{label}: {mode} onnxruntime fp32 {onnx_runtime:.2f} img/s = "
                  + ", ".join(f"{onnx_runtime / value:.2f} x pytorch {dtype}" for dtype, value in pytorch.items()))
    if matmul_ms is not None and ("forward", "fp32", "pytorch") in throughput:
        peak = 2 * MATMUL_SIZE ** 3 / np.median(matmul_ms) / 1e6
        reached = gflops * throughput["forward", "fp32", "pytorch"]
        print(f"{label}: forward fp32 {reached:.1f} GFLOP/s = {reached / peak:.0%} of the {MATMUL_SIZE}^3 fp32 "
              f"matmul peak measured alongside ({peak:.1f} GFLOP/s)")


def print_table(rows: list[dict]) -> None:
    print(f"{'backbone':<10} {'runtime':<11} {'dtype':<5} {'batch':>5} {'mode':<20} {'median ms':>10} {'p90 ms':>10} "
          f"{'img/s':>9}")
    for row in rows:
        print(f"{row['backbone']:<10} {row['runtime']:<11} {row['dtype']:<5} {row['batch_size']:>5} {row['mode']:<20} "
              f"{row['latency_ms_median']:>10.1f} {row['latency_ms_p90']:>10.1f} {row['throughput_img_s']:>9.2f}")


def measurements(config: dict, device: torch.device, dtype_names: list[str], runtime_names: list[str]):
    """The rows of the modes asked for, one list per backbone and then one for the loader modes."""
    if set(config["modes"]) & {*INFERENCE_MODES, "train_step"}:
        for backbone in config["backbones"]:
            yield benchmark_backbone(backbone, config, device, dtype_names, runtime_names)
    if set(config["modes"]) & set(LOADER_MODES):
        with tempfile.TemporaryDirectory() as temporary:
            data_dir = config["data_dir"] or write_voc_sized_set(Path(temporary))
            protocol = config["protocol"] if config["data_dir"] else "synthetic"
            try:
                dataset = build_dataset(protocol, data_dir, train=True)
            except (ValueError, FileNotFoundError) as error:  # a missing or unreadable data_dir
                sys.exit(f"error: {error}")
            try:
                rows = benchmark_loader(dataset, config, device)
            except SharedMemoryError as error:  # too little /dev/shm for the workers' batches
                sys.exit(f"error: {error}")
            yield rows


def main(config: dict) -> None:
    print(format_config(config))
    if config["threads"]:
        torch.set_num_threads(config["threads"])
    if config["compile"] and config["warmup"] < 1:
        raise SystemExit("error: --compile=true needs --warmup of at least 1: the first run compiles.")
    try:
        check_writable(config["out"], CSV_KEY, CSV_COLUMNS)
    except ResultsError as error:
        sys.exit(f"error: --out: {error}")
    device = resolve_device(config["device"])
    dtype_names = dtypes_to_time(config["dtypes"], device, config["emulated_dtypes"])
    runtime_names = runtimes_to_time(config["runtimes"], device)
    print(f"device: {device_name(device)}; torch {torch.__version__}")
    rows, replaced = [], 0
    # Written as they come: a stopped run keeps them.
    for measured in measurements(config, device, dtype_names, runtime_names):
        try:
            replaced += write_keyed(config["out"], measured, CSV_KEY, CSV_COLUMNS)
        except ResultsError as error:
            sys.exit(f"error: --out: {error}")
        rows += measured
    print_table(rows)
    print(f"wrote {len(rows)} rows to {config['out']}, replacing {replaced} earlier rows of the same measurements")


if __name__ == "__main__":
    main(resolve_config(globals(), rules=RULES))
