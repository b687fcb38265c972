"""Images/s of the crop stage's MTCNN detector, one photo per call and a whole round in one call.

The detector is the one `facedeit crop` uses (FaceCropper with default
DetectorSettings). Photos are decoded before timing, so the rows time
detection, alignment and cropping but not JPEG decoding or the cache writes.
Runs on the CPU, and on CUDA too when a GPU is present.
"""

import tempfile
from collections import Counter
from pathlib import Path

import pytest
import torch

from facedeit import bench
from facedeit.faces import CropError, DetectorSettings, FaceCropper, list_photos, load_rgb

# MTCNN comes from facenet-pytorch, so a machine without it skips this file.
pytest.importorskip("facenet_pytorch")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="module")
def photos(bench_config):
    """The first FACEDEIT_BENCH_MTCNN_PHOTOS photos, taken one person at a time in turn, decoded to RGB."""
    photos_dir = bench_config.photos_dir
    if not photos_dir.is_dir():
        pytest.skip(f"{photos_dir}: photo folder not found; set FACEDEIT_BENCH_PHOTOS to a folder of <person>/<photo> files")
    try:
        listed = list_photos(photos_dir)
    except CropError as err:
        pytest.skip(str(err))
    by_person: dict[str, list[Path]] = {}
    for person, path in listed:
        by_person.setdefault(person, []).append(path)
    chosen = []
    for rank in range(max(len(paths) for paths in by_person.values())):
        chosen += [paths[rank] for paths in by_person.values() if rank < len(paths)]
    return [load_rgb(path) for path in chosen[: bench_config.mtcnn_photos]]


def build_detector(device_type: str):
    # The crop folder is never written: the benchmarks call the detector, not FaceCropper.process.
    return FaceCropper(Path(tempfile.gettempdir()), DetectorSettings(), device_type).mtcnn


def mtcnn_row(bench_config, device_type, phase, ms, batch, images, note):
    return bench.throughput_row(bench_config, torch.device(device_type), "mtcnn", batch, phase, ms, images,
                                img_size=DetectorSettings().image_size, note=note)


@pytest.mark.parametrize("device_type", DEVICES)
def test_mtcnn_single(benchmark, record, bench_config, photos, device_type):
    benchmark.group = "mtcnn single"
    mtcnn = build_detector(device_type)

    def detect_each():
        for image in photos:
            mtcnn(image, return_prob=True)

    times = bench.StepTimes(torch.device(device_type))
    benchmark.pedantic(times.wrap(detect_each), rounds=bench_config.rounds, warmup_rounds=bench_config.warmup)
    size = photos[0].size
    record(mtcnn_row(bench_config, device_type, "mtcnn_single", times.measured(bench_config.rounds), 1,
                     len(photos), f"{len(photos)} photos per round, one per call, first is {size[0]}x{size[1]}"))


@pytest.mark.parametrize("device_type", DEVICES)
def test_mtcnn_batched(benchmark, record, bench_config, photos, device_type):
    """One call per round on the photos of the most common size that have a face.

    facenet-pytorch stacks a batch into one array, so the photos must share a
    size, and a batch that mixes photos with and without a face fails in its
    box selection. Both filters run before timing.
    """
    benchmark.group = "mtcnn batched"
    mtcnn = build_detector(device_type)
    size = Counter(image.size for image in photos).most_common(1)[0][0]
    batch = [image for image in photos if image.size == size and mtcnn(image) is not None]
    if not batch:
        pytest.skip(f"no {size[0]}x{size[1]} photo with a face among the {len(photos)} chosen")

    times = bench.StepTimes(torch.device(device_type))
    benchmark.pedantic(times.wrap(lambda: mtcnn(batch, return_prob=True)),
                       rounds=bench_config.rounds, warmup_rounds=bench_config.warmup)
    record(mtcnn_row(bench_config, device_type, "mtcnn_batched", times.measured(bench_config.rounds), len(batch),
                     len(batch), f"{len(batch)} photos of {size[0]}x{size[1]} in one call"))
