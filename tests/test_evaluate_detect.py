"""evaluate.py and detect.py on a checkpoint trained until it detects its (synthetic) images."""
import contextlib
import io
import json
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import av
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

import detect
import yolo
from command_lines import run_python
from data import make_synthetic
from yolo.config import resolve_config
from yolo.data import build_dataset, decode_image
from yolo.postprocess import DISPLAY_SCORE_THRESHOLD, EVAL_SCORE_THRESHOLD, MAX_DETECTIONS, NMS_IOU

ROOT = Path(__file__).resolve().parents[1]


def run(script, *overrides, expect_success=True):
    result = run_python([sys.executable, script, *overrides], cwd=ROOT, capture_output=True, text=True,
                            timeout=600)
    if expect_success:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


@pytest.fixture(scope="module")
def evaluated(overfit_run, tmp_path_factory):
    """(the trained run, evaluate.py's output folder, its standard output) for a copy of the run's checkpoint
    evaluated without --out_dir."""
    _, run_dir = overfit_run
    own_run = tmp_path_factory.mktemp("own_run")
    shutil.copy(run_dir / "last.pt", own_run)
    result = run("evaluate.py", f"--checkpoint={own_run / 'last.pt'}", "--model_name=tiny", "--num_workers=0",
                 "--submission=true", "--num_examples=2")
    return run_dir, own_run / "evaluate", result.stdout


def test_evaluate_writes_the_metrics_row_and_figures_beside_the_checkpoint(evaluated):
    run_dir, out_dir, stdout = evaluated
    metrics = pd.read_csv(out_dir / "metrics.csv")
    assert len(metrics) == 1
    row = metrics.iloc[0]
    assert row["model"] == "tiny" and row["backbone"] == "resnet18" and row["protocol"] == "synthetic"
    assert row["n_images"] == 8 and row["epoch"] == 40
    checkpoint = out_dir.parent / "last.pt"
    assert row["checkpoint"] == str(checkpoint)
    assert row["made_by"] == (f"python evaluate.py --checkpoint={checkpoint} --model_name=tiny --num_workers=0 "
                              "--submission=true --num_examples=2")
    # The training log's last validation used the same images and the same decoding.
    final = pd.read_csv(run_dir / "log.csv").iloc[-1]
    assert row["voc12_map"] == pytest.approx(final["val_voc12_map"], abs=1e-4)
    assert row["voc12_map"] >= 0.9 and 0 < row["coco_map"] <= row["coco_ap50"]
    assert "data: voc layout, 5 classes (their ids in the files): circle (1), square (2)" in stdout
    assert "val: 8 images, " in stdout
    saved = json.loads((run_dir / "config.json").read_text())  # the classes and their ids, kept with the run
    assert saved["class_names"] == ["circle", "square", "triangle", "cross", "diamond"]
    assert saved["class_ids"] == [1, 2, 3, 4, 5]
    per_class = pd.read_csv(out_dir / "per_class_ap.csv")
    assert list(per_class["class"]) == ["circle", "square", "triangle", "cross", "diamond"]
    for figure in ("tiny_pr.png", "tiny_ap.png", "tiny_examples.png"):
        assert (out_dir / figure).stat().st_size > 1000
    # The per-class table (VOC2012-style AP in %) and every file written, by its path.
    ap = dict(zip(per_class["class"], per_class["voc12_ap"]))
    assert "| class | tiny |" in stdout and f"| diamond | {100 * ap['diamond']:.2f} |" in stdout
    written = stdout[stdout.index("wrote:\n"):].splitlines()[1:]
    assert written == [f"  {out_dir / name}" for name in ("metrics.csv", "per_class_ap.csv", "tiny_detections.json",
                                                          "tiny_pr.png", "tiny_ap.png", "tiny_examples.png",
                                                          "submission/tiny.tar.gz")]


def test_rerunning_replaces_the_models_row(evaluated):
    run_dir, out_dir, _ = evaluated
    run("evaluate.py", f"--checkpoint={run_dir / 'last.pt'}", f"--out_dir={out_dir}", "--model_name=tiny",
        "--num_workers=0", "--num_examples=0")
    run("evaluate.py", f"--checkpoint={run_dir / 'best.pt'}", f"--out_dir={out_dir}", "--model_name=tiny_best",
        "--num_workers=0", "--num_examples=0")
    metrics = pd.read_csv(out_dir / "metrics.csv")
    assert sorted(metrics["model"]) == ["tiny", "tiny_best"]
    assert len(pd.read_csv(out_dir / "per_class_ap.csv")) == 10


def test_submission_files_follow_the_test_servers_format(evaluated):
    _, out_dir, _ = evaluated
    main = out_dir / "submission/tiny/results/VOC2012/Main"
    lines = (main / "comp4_det_test_circle.txt").read_text().splitlines()
    assert lines
    image_id, score, *box = lines[0].split()
    assert len(box) == 4 and 0 < float(score) <= 1 and len(image_id) > 0
    with tarfile.open(out_dir / "submission/tiny.tar.gz") as tar:
        assert "results/VOC2012/Main/comp4_det_test_diamond.txt" in tar.getnames()


def test_the_voc2012_test_protocol_writes_exactly_the_servers_files(overfit_run, tmp_path):
    """protocol=voc2012test: the images of VOC2012's ImageSets/Main/test.txt, with no annotations (the server
    keeps them), become one comp4 file per class with 1-based pixel boxes, packed as results/VOC2012/Main/...
    in a .tar.gz; no metrics are written, since there is nothing here to score them against."""
    data_dir, run_dir = overfit_run
    voc2012 = tmp_path / "VOCdevkit" / "VOC2012"
    (voc2012 / "ImageSets" / "Main").mkdir(parents=True)
    shutil.copytree(data_dir / "JPEGImages", voc2012 / "JPEGImages")
    test_ids = sorted(path.stem for path in (voc2012 / "JPEGImages").glob("*.jpg"))[:5]
    (voc2012 / "ImageSets" / "Main" / "test.txt").write_text("".join(f"{image_id}\n" for image_id in test_ids))
    out_dir = tmp_path / "out"
    result = run("evaluate.py", f"--checkpoint={run_dir / 'last.pt'}", "--protocol=voc2012test",
                 f"--data_dir={tmp_path}", f"--out_dir={out_dir}", "--model_name=tiny", "--num_workers=0")
    assert "upload" in result.stdout and not (out_dir / "metrics.csv").exists()
    classes = ["circle", "square", "triangle", "cross", "diamond"]
    names = [f"results/VOC2012/Main/comp4_det_test_{name}.txt" for name in classes]
    with tarfile.open(out_dir / "submission/tiny.tar.gz") as tar:
        assert sorted(member.name for member in tar.getmembers() if member.isfile()) == sorted(names)
        files = {name: tar.extractfile(name).read().decode() for name in names}
    detected = set()
    for text in files.values():
        for line in text.splitlines():
            image_id, score, *box = line.split()
            x1, y1, x2, y2 = map(float, box)
            width, height = Image.open(voc2012 / "JPEGImages" / f"{image_id}.jpg").size
            assert 0 < float(score) <= 1 and 1 <= x1 <= x2 <= width and 1 <= y1 <= y2 <= height, line
            detected.add(image_id)
    assert detected <= set(test_ids) and len(detected) >= 3  # the model detects its training images
    # Each class's file holds that class's detections, in VOC's 1-based pixels: the continuous box the Python API
    # gives, shifted by one at its top-left corner.
    detector = yolo.load_detector(run_dir / "last.pt", device="cpu", dtype="fp32")
    for image_id in test_ids:
        expected = detector.predict(voc2012 / "JPEGImages" / f"{image_id}.jpg",
                                    score_threshold=EVAL_SCORE_THRESHOLD)
        rows = sorted((label, -score, x1 + 1, y1 + 1, x2, y2) for label, score, (x1, y1, x2, y2) in
                      zip(expected.labels.tolist(), expected.scores.tolist(), expected.boxes.tolist()))
        written = sorted((label, -float(score), *map(float, box)) for label in range(len(classes))
                         for line in files[names[label]].splitlines()
                         for written_id, score, *box in [line.split()] if written_id == image_id)
        assert [row[0] for row in written] == [row[0] for row in rows], image_id
        np.testing.assert_allclose([row[1:] for row in written], [row[1:] for row in rows], atol=0.051)
    # Every image of test.txt must be in the files: one whose pixels cannot be decoded (its header is whole, so
    # the check before evaluating passes it) is named, and nothing is packed for the server.
    damaged = voc2012 / "JPEGImages" / f"{test_ids[2]}.jpg"
    damaged.write_bytes(damaged.read_bytes()[:len(damaged.read_bytes()) // 3])
    message = evaluate_error(f"--checkpoint={run_dir / 'last.pt'}", "--protocol=voc2012test",
                             f"--data_dir={tmp_path}", f"--out_dir={tmp_path / 'again'}", "--model_name=tiny",
                             "--num_workers=0")
    assert f"{damaged}: cannot decode image" in message and "needs every image" in message, message
    assert not (tmp_path / "again" / "submission" / "tiny.tar.gz").exists()


def test_submission_files_cover_exactly_the_servers_list(tmp_path):
    from evaluate import write_submission
    detections = [np.array([[1.0, 1.0, 5.0, 5.0, 0.9, 0]])] * 2
    write_submission(tmp_path / "ok", ["a", "b"], detections, ["thing"], server_ids=["b", "a"])
    with pytest.raises(ValueError, match=r"not listed there: 1 \(c\); listed but not evaluated: 1 \(b\)"):
        write_submission(tmp_path / "bad", ["a", "c"], detections, ["thing"], server_ids=["a", "b"])


def evaluate_error(*overrides) -> str:
    """The error line that `python evaluate.py ...` exits with, run in this process (its __main__ is main of the
    resolved settings)."""
    import evaluate
    with pytest.raises(SystemExit) as stopped:
        evaluate.main(resolve_config(vars(evaluate), list(overrides), rules=evaluate.RULES))
    assert str(stopped.value.code).startswith("error: ")
    return str(stopped.value.code)


def test_evaluate_errors_name_the_problem(overfit_run, tmp_path):
    data_dir, run_dir = overfit_run
    assert "No checkpoint at" in evaluate_error(f"--checkpoint={tmp_path / 'missing.pt'}")
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    assert "not a train.py checkpoint" in evaluate_error(f"--checkpoint={foreign}")
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a checkpoint")
    assert "not a readable checkpoint" in evaluate_error(f"--checkpoint={broken}")
    mismatched = torch.load(run_dir / "last.pt", weights_only=True)
    mismatched["model_args"]["fc_dim"] = 128
    torch.save(mismatched, tmp_path / "mismatched.pt")
    assert "does not fit the architecture" in evaluate_error(f"--checkpoint={tmp_path / 'mismatched.pt'}")
    message = evaluate_error(f"--checkpoint={run_dir / 'last.pt'}", f"--data_dir={tmp_path / 'nowhere'}")
    assert "not found" in message and "nowhere" in message
    (tmp_path / "foreign_results").mkdir()
    (tmp_path / "foreign_results/metrics.csv").write_text("model,fps\nseed,97.88\n")
    message = evaluate_error(f"--checkpoint={run_dir / 'last.pt'}", f"--out_dir={tmp_path / 'foreign_results'}")
    assert message.startswith("error: --out_dir: ") and "metrics.csv has the columns model, fps" in message
    assert (tmp_path / "foreign_results/metrics.csv").read_text() == "model,fps\nseed,97.88\n"
    # The command line itself: one error line, no traceback.
    result = run("evaluate.py", f"--checkpoint={broken}", expect_success=False)
    assert result.returncode == 1 and result.stderr.startswith("error: ") and "Traceback" not in result.stderr


def test_detect_on_a_folder_of_images(overfit_run, tmp_path):
    data_dir, run_dir = overfit_run
    out_dir = tmp_path / "detections"
    run("detect.py", f"--checkpoint={run_dir / 'last.pt'}", f"--source={data_dir / 'JPEGImages'}",
        f"--out_dir={out_dir}", "--dtype=fp32")
    detections = pd.read_csv(out_dir / "detections.csv")
    images = sorted((data_dir / "JPEGImages").glob("*.jpg"))
    assert len(detections) > 0 and set(detections["source"]) <= {str(path) for path in images}
    assert all((out_dir / path.name).exists() for path in images)
    assert detections["score"].min() >= 0.2
    assert set(detections["class_name"]) <= {"circle", "square", "triangle", "cross", "diamond"}
    drawn = decode_image(out_dir / images[0].name)
    assert drawn.shape == decode_image(images[0]).shape


def write_clip(path: Path, frames: list[torch.Tensor], rate: int) -> None:
    """An MPEG-4 video of uint8 (3, 160, 160) frames."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=rate)
        stream.height, stream.width, stream.pix_fmt = 160, 160, "yuv420p"
        for frame in frames:
            picture = av.VideoFrame.from_ndarray(frame.permute(1, 2, 0).contiguous().numpy(), format="rgb24")
            container.mux(stream.encode(picture))
        container.mux(stream.encode())


def test_detect_on_a_video(overfit_run, tmp_path):
    data_dir, run_dir = overfit_run
    video = tmp_path / "clip.mp4"
    write_clip(video, [decode_image(sorted((data_dir / "JPEGImages").glob("*.jpg"))[0])[:, :160, :160]] * 3, rate=5)
    own_run = tmp_path / "own_run"
    own_run.mkdir()
    shutil.copy(run_dir / "last.pt", own_run)
    run("detect.py", f"--checkpoint={own_run / 'last.pt'}", f"--source={video}", "--batch_size=2")
    out_dir = own_run / "detect"
    with av.open(str(out_dir / "clip.mp4")) as container:
        assert [frame.time for frame in container.decode(video=0)] == [0, 0.2, 0.4]
    assert set(pd.read_csv(out_dir / "detections.csv")["frame"]) == {0, 1, 2}


def live_clip(data_dir: Path, path: Path) -> list[torch.Tensor]:
    """Four different synthetic images as the frames of a clip at `path`, returned as its decoded frames."""
    images = sorted((data_dir / "JPEGImages").glob("*.jpg"))[:4]
    write_clip(path, [decode_image(image)[:, :160, :160] for image in images], rate=10)
    with av.open(str(path)) as container:
        return [detect.rgb_image(frame) for frame in container.decode(video=0)]


def start_live(run_dir: Path, source: str, out_dir: Path) -> subprocess.Popen:
    """detect.py on an FFmpeg filter graph (lavfi) as its live source, as a camera or stream would be read."""
    return subprocess.Popen([sys.executable, "detect.py", f"--checkpoint={run_dir / 'last.pt'}", f"--source={source}",
                             "--source_format=lavfi", f"--out_dir={out_dir}", "--dtype=fp32"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_line(process, text, timeout):
    """Reads the process's output until a line holds `text`; a process that says nothing of the kind within
    `timeout` seconds (a hang, not a slow machine) is killed and the test fails with what it printed."""
    lines, done = [], threading.Event()

    def read():
        try:
            for line in process.stdout:
                lines.append(line)
                if text in line:
                    return
        finally:
            done.set()  # the line came, or the output ended without it
    threading.Thread(target=read, daemon=True).start()
    if not done.wait(timeout) or not lines or text not in lines[-1]:
        process.kill()
        raise AssertionError(f"no line with {text!r} (waited up to {timeout} s):\n{''.join(lines)}")


def test_a_live_source_is_detected_as_it_comes_until_ctrl_c(overfit_run, tmp_path):
    data_dir, run_dir = overfit_run
    frames = live_clip(data_dir, tmp_path / "clip.mp4")
    # The clip looped without end at 10 frames per second of real time, as a camera sends them.
    source = f"movie={tmp_path / 'clip.mp4'},loop=loop=-1:size=4,setpts=N/10/TB,realtime"
    out_dir = tmp_path / "out"
    process = start_live(run_dir, source, out_dir)
    try:
        wait_for_line(process, " FPS at frame ", timeout=120)
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 0 and "Traceback" not in stderr, stderr
    assert "stopped" in stdout

    # Every frame of the clip has detections, so the frames in the rows are the frames processed.
    rows = pd.read_csv(out_dir / "detections.csv")
    processed = sorted(set(rows["frame"]))
    with av.open(str(out_dir / "live.mp4")) as container:
        assert len(list(container.decode(video=0))) == len(processed) >= 1
    # The same frames detected as still images give the same rows.
    settings = {"device": "cpu", "dtype": "fp32", "score_threshold": DISPLAY_SCORE_THRESHOLD, "nms_iou": NMS_IOU,
                "max_detections": MAX_DETECTIONS}
    detector, class_names = detect.load_detector(run_dir / "last.pt", settings)
    stills = [detect.detect(detector, [frame])[0] for frame in frames]
    assert all(len(found) > 0 for found in stills)
    expected = [row for index in processed
                for row in detect.detection_rows(source, index, stills[index % len(frames)], class_names)]
    assert rows.to_dict("records") == expected
    assert json.loads((out_dir / "detections.json").read_text()) == expected


def test_a_live_source_faster_than_the_model_drops_frames_and_its_end_ends_the_run(overfit_run, tmp_path):
    data_dir, run_dir = overfit_run
    live_clip(data_dir, tmp_path / "clip.mp4")
    # 40 frames as fast as FFmpeg makes them: far faster than the model.
    source = f"movie={tmp_path / 'clip.mp4'},loop=loop=9:size=4,setpts=N/10/TB"
    process = start_live(run_dir, source, tmp_path / "out")
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr
    assert "the source ended" in stdout
    processed = set(pd.read_csv(tmp_path / "out/detections.csv")["frame"])
    assert len(processed) < 40 and max(processed) == 39


def test_a_folder_source_takes_its_images_whatever_the_case_of_their_extension(tmp_path):
    for name in ("a.jpg", "PHOTO.JPG", "c.Png", "notes.txt", "clip.mp4"):
        (tmp_path / name).write_bytes(b"")
    assert [path.name for path in detect.file_inputs(tmp_path)] == ["PHOTO.JPG", "a.jpg", "c.Png"]
    assert detect.file_inputs(tmp_path / "PHOTO.JPG") == [tmp_path / "PHOTO.JPG"]


def test_the_rate_report_counts_the_frames_skipped_between_those_processed(monkeypatch, capsys):
    now = [100.0]
    monkeypatch.setattr(detect.time, "monotonic", lambda: now[0])  # a clock the test moves
    report = detect.RateReport()
    for index in (0, 1, 4, 5):  # frames 2 and 3 dropped
        report.processed(index)
    assert capsys.readouterr().out == ""  # within the first second: nothing printed yet
    now[0] += 2.0
    report.processed(9)  # 6, 7 and 8 dropped
    assert capsys.readouterr().out == "2.5 FPS at frame 9, 5 dropped so far\n"


def test_live_sources_are_told_from_files(monkeypatch):
    monkeypatch.setattr(sys, "platform", "linux")
    assert detect.live_input("0", "") == ("/dev/video0", "v4l2")
    monkeypatch.setattr(sys, "platform", "darwin")
    assert detect.live_input("0", "") == ("0", "avfoundation")
    assert detect.live_input("/dev/video2", "") == ("/dev/video2", "v4l2")
    assert detect.live_input("rtsp://127.0.0.1:8554/cam", "") == ("rtsp://127.0.0.1:8554/cam", None)
    assert detect.live_input("testsrc=rate=10", "lavfi") == ("testsrc=rate=10", "lavfi")
    assert detect.live_input("photos/2024", "") is None and detect.live_input("clip.mp4", "") is None


def test_detect_rejects_an_unknown_source(overfit_run, tmp_path):
    _, run_dir = overfit_run
    (tmp_path / "notes.txt").write_text("hello")
    result = run("detect.py", f"--checkpoint={run_dir / 'last.pt'}", f"--source={tmp_path / 'notes.txt'}",
                 expect_success=False)
    assert result.returncode != 0 and "is not an image" in result.stderr
    result = run("detect.py", f"--checkpoint={run_dir / 'last.pt'}", "--source=/dev/video63",
                 f"--out_dir={tmp_path / 'out'}", expect_success=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: --source=/dev/video63: cannot read /dev/video63 as v4l2 (")
    assert not (tmp_path / "out").exists()


def test_evaluate_refuses_bad_settings_and_an_empty_split_before_evaluating(overfit_run, tmp_path):
    data_dir, run_dir = overfit_run
    checkpoint = f"--checkpoint={run_dir / 'last.pt'}"
    blocker = tmp_path / "file"
    blocker.write_text("")
    empty = tmp_path / "empty"
    (empty / "ImageSets/Main").mkdir(parents=True)
    (empty / "ImageSets/Main/holdout.txt").write_text("")
    (empty / "JPEGImages").mkdir()
    (empty / "classes.txt").write_text((data_dir / "classes.txt").read_text())
    for overrides, message in [
        ([f"--out_dir={blocker}"], "a file is in the way"),
        (["--batch_size=0"], "--batch_size=0: must be at least 1"),
        (["--dtype=fp64"], "--dtype='fp64': must be one of auto, fp32, bf16, fp16"),
        ([f"--data_dir={empty}", "--val_split=holdout", f"--out_dir={tmp_path / 'out'}"],
         "holdout.txt lists no images"),
    ]:
        assert message in evaluate_error(checkpoint, *overrides)
    # More batches than any /dev/shm holds: refused before a worker starts, by the command line's error handling.
    result = run("evaluate.py", checkpoint, "--num_workers=1", "--batch_size=1000000000", expect_success=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    assert "error: /dev/shm has" in result.stderr, result.stderr


def test_detect_skips_unreadable_images_and_writes_the_rest(overfit_run, tmp_path):
    data_dir, run_dir = overfit_run
    photo = sorted((data_dir / "JPEGImages").glob("*.jpg"))[0]
    pixels = decode_image(photo).permute(1, 2, 0).numpy()
    source = tmp_path / "mixed"
    source.mkdir()
    shutil.copy(photo, source / "a_photo.jpg")
    Image.fromarray(np.dstack([pixels, pixels[..., :1]])).save(source / "b_rgba.png")
    Image.fromarray(pixels).convert("P").save(source / "c_palette.png")
    Image.new("RGB", (1, 1), (200, 30, 30)).save(source / "d_one_pixel.png")
    (source / "e_notes.jpg").write_text("not an image")
    (source / "f_truncated.jpg").write_bytes(photo.read_bytes()[:400])
    Image.fromarray(pixels).save(source / "g_png_named.jpg", format="PNG")
    out_dir = tmp_path / "out"
    result = run("detect.py", f"--checkpoint={run_dir / 'last.pt'}", f"--source={source}", f"--out_dir={out_dir}",
                 "--dtype=fp32", "--batch_size=4", "--score_threshold=0", expect_success=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: skipping")]
    assert len(warnings) == 2
    assert f"{source / 'e_notes.jpg'}: cannot decode image" in warnings[0]
    assert f"{source / 'f_truncated.jpg'}: cannot decode image" in warnings[1]
    assert "skipped 2 of 7 image(s)" in result.stderr

    readable = ["a_photo.jpg", "b_rgba.png", "c_palette.png", "d_one_pixel.png", "g_png_named.jpg"]
    assert sorted(path.name for path in out_dir.glob("*.*")) == sorted(readable + ["detections.csv",
                                                                                   "detections.json"])
    detections = pd.read_csv(out_dir / "detections.csv")
    assert len(pd.read_json(out_dir / "detections.json")) == len(detections)
    assert set(detections["source"]) == {str(source / name) for name in readable}
    assert (detections["x1"] <= detections["x2"]).all() and (detections["y1"] <= detections["y2"]).all()
    one_pixel = detections[detections["source"] == str(source / "d_one_pixel.png")]
    # On a 1 x 1 image every box is under a pixel: widened to exactly one, inside the image's [1, 2) span.
    assert len(one_pixel) > 0 and one_pixel[["x1", "y1"]].stack().between(1, 2).all()
    assert (one_pixel["x1"] == one_pixel["x2"]).all() and (one_pixel["y1"] == one_pixel["y2"]).all()
    assert decode_image(out_dir / "d_one_pixel.png").shape == (3, 1, 1)
    # The same pixels give the same detections, whatever the file format.
    by_source = {name: detections[detections["source"] == str(source / name)] for name in readable}
    for name in ("b_rgba.png", "g_png_named.jpg"):
        assert list(by_source[name]["class_id"]) == list(by_source["a_photo.jpg"]["class_id"])
        np.testing.assert_allclose(by_source[name][["x1", "y1", "x2", "y2"]], by_source["a_photo.jpg"][
            ["x1", "y1", "x2", "y2"]], atol=0.5)


@pytest.mark.parametrize("setting, message", [
    ("--batch_size=0", "error: --batch_size=0: must be at least 1"),
    ("--dtype=fp64", "error: --dtype='fp64': must be one of auto, fp32, bf16, fp16"),
    ("--score_threshold=1.5", "error: --score_threshold=1.5: must be between 0.0 and 1.0"),
])
def test_detect_checks_its_settings_before_any_work(overfit_run, tmp_path, setting, message):
    data_dir, run_dir = overfit_run
    out_dir = tmp_path / "out"
    result = run("detect.py", f"--checkpoint={run_dir / 'last.pt'}", f"--source={data_dir / 'JPEGImages'}",
                 f"--out_dir={out_dir}", setting, expect_success=False)
    assert result.returncode == 1 and result.stderr.strip() == message
    assert not out_dir.exists()


def test_detect_refuses_an_out_dir_that_is_a_file(overfit_run, tmp_path):
    data_dir, run_dir = overfit_run
    blocker = tmp_path / "file"
    blocker.write_text("keep me")
    result = run("detect.py", f"--checkpoint={run_dir / 'last.pt'}", f"--source={data_dir / 'JPEGImages'}",
                 f"--out_dir={blocker}", expect_success=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"--out_dir='{blocker}': a file is in the way" in result.stderr and blocker.read_text() == "keep me"


def test_each_detect_run_keeps_its_own_folder_and_says_how_it_runs(overfit_run, tmp_path):
    data_dir, run_dir = overfit_run
    own_run = tmp_path / "own_run"
    own_run.mkdir()
    shutil.copy(run_dir / "last.pt", own_run)
    images = sorted((data_dir / "JPEGImages").glob("*.jpg"))
    outputs = [run("detect.py", f"--checkpoint={own_run / 'last.pt'}", f"--source={image}").stdout
               for image in images[:2]]
    for folder, image in zip(("detect", "detect2"), images):
        assert [path.name for path in sorted((own_run / folder).iterdir())] == sorted(
            [image.name, "detections.csv", "detections.json"])
    # evaluate.py's dtype by default: the scores it measured.
    assert f"running {own_run / 'last.pt'} in PyTorch on cpu in float32" in outputs[0]
    rows = json.loads((own_run / "detect" / "detections.json").read_text())
    values = [row[key] for row in rows for key in ("x1", "y1", "x2", "y2", "score")]
    assert rows and any(abs(value * 1e4 - round(value * 1e4)) > 1e-3 for value in values)  # not rounded


def test_the_detections_scored_are_a_coco_results_file_with_the_datasets_own_ids(overfit_run, tmp_path):
    """The trained set as a CVAT-style COCO export (category ids 3, 8, 13, ..., image ids from 101): evaluate.py's
    detections file, scored by pycocotools against that export, gives evaluate.py's COCO AP."""
    import evaluate
    data_dir, run_dir = overfit_run
    source = build_dataset("custom", data_dir, train=False)
    writer = make_synthetic.COCOWriter(tmp_path / "coco")
    for index, annotation in enumerate(source.annotations):
        objects = [{"name": source.class_names[label], "bndbox": box.tolist(), "difficult": False}
                   for box, label in zip(annotation["boxes"], annotation["labels"])]
        writer.add("val", source.image_ids[index], np.zeros((annotation["height"], annotation["width"], 3),
                                                            dtype=np.uint8), objects)
        shutil.copy(source.image_path(index), tmp_path / "coco" / "images" / "val" / f"{source.image_ids[index]}.jpg")
    writer.end_split("val", source.image_ids)
    json_path = tmp_path / "coco" / "annotations" / "instances_val.json"
    document = json.loads(json_path.read_text())
    for category in document["categories"]:
        category["id"] = 5 * category["id"] - 2
    for annotation in document["annotations"]:
        annotation["category_id"] = 5 * annotation["category_id"] - 2
        annotation["image_id"] += 100
    for image in document["images"]:
        image["id"] += 100
    json_path.write_text(json.dumps(document))

    overrides = [f"--checkpoint={run_dir / 'last.pt'}", f"--data_dir={tmp_path / 'coco'}", "--val_split=val",
                 f"--out_dir={tmp_path / 'out'}", "--num_workers=0", "--num_examples=0", "--model_name=tiny"]
    evaluate.main(resolve_config(vars(evaluate), overrides, rules=evaluate.RULES))
    results = json.loads((tmp_path / "out" / "tiny_detections.json").read_text())
    assert {row["category_id"] for row in results} <= {3, 8, 13, 18, 23}
    assert {row["image_id"] for row in results} == set(range(101, 109))
    with contextlib.redirect_stdout(io.StringIO()):
        truth = COCO(str(json_path))
        scored = COCOeval(truth, truth.loadRes(results), "bbox")
        scored.evaluate()
        scored.accumulate()
        scored.summarize()
    metrics = pd.read_csv(tmp_path / "out" / "metrics.csv").iloc[0]
    assert metrics["coco_map"] > 0.5
    np.testing.assert_allclose([metrics["coco_map"], metrics["coco_ap50"], metrics["coco_ap75"]], scored.stats[:3],
                               atol=5e-7, rtol=0)  # metrics.csv keeps 6 decimals
