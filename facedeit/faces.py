"""Crop stage: photos/<person>/* -> 160x160 MTCNN face crops, manifest.csv, split.csv.

Crops are cached under `<out>/crops/` by a key made of the photo's SHA-256
and the detector settings, so a second run detects nothing and a changed
photo is detected again. Every input file gets one manifest row with its
status; nothing is dropped silently.
"""

import hashlib
import json
import logging
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageOps

from facedeit.io import write_bytes_atomic, write_csv_atomic, write_json_atomic

log = logging.getLogger(__name__)

PHOTO_SUFFIXES = {".jpg", ".jpeg", ".png", ".pgm", ".bmp", ".webp"}
STATUSES = ("cropped", "no_face", "unreadable")


@dataclass(frozen=True)
class DetectorSettings:
    """facenet-pytorch MTCNN settings; all of them are part of the cache key."""

    image_size: int = 160
    # Pixels added around the box, measured in the final crop (facenet-pytorch's convention).
    margin: int = 20
    min_face_size: int = 20
    thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7)
    factor: float = 0.709

    def key(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


class CropError(ValueError):
    """Input the crop stage cannot use; the message names the folder or file."""


def load_rgb(path: Path) -> Image.Image:
    """Open any supported photo as 8-bit RGB, honouring its EXIF orientation.

    Handles greyscale, palette, RGBA (composited on black), CMYK and 16-bit or
    float images. Raises OSError, ValueError or SyntaxError for a file PIL
    cannot decode.
    """
    with Image.open(path) as img:
        img.load()
        img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        pixels = np.asarray(img, dtype=np.float64)
        # NOTE: a 32-bit integer image is taken to hold 16-bit values, as PNG decoders produce.
        img = Image.fromarray(np.clip(pixels / 257.0, 0, 255).astype(np.uint8))
    elif img.mode == "F":
        pixels = np.asarray(img, dtype=np.float64)
        span = max(pixels.max() - pixels.min(), 1e-12)
        img = Image.fromarray(((pixels - pixels.min()) / span * 255).astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")


def list_photos(data_dir: Path) -> list[tuple[str, Path]]:
    """List (person, file) for every non-hidden file one level down in `data_dir`.

    Files at the top level (READMEs, pairs lists) are not photos of a person
    and are skipped. Files with other suffixes are listed too, so that the
    manifest reports them as unreadable.
    """
    people = person_folders(data_dir)
    nested = [f for person in people for f in person.iterdir() if f.is_dir() and not f.name.startswith(".")]
    if nested:
        log.warning("skipping %d folder(s) inside person folders, such as %s: only files one level down are "
                    "photos", len(nested), nested[0])
    return [
        (person.name, f)
        for person in people
        for f in sorted(person.iterdir())
        # A broken symlink is listed too, so the manifest reports it as unreadable.
        if (f.is_file() or f.is_symlink()) and not f.name.startswith(".")
    ]


def person_folders(data_dir: Path) -> list[Path]:
    """List the non-hidden sub-folders of `data_dir`, one per person, sorted by name."""
    if data_dir.exists() and not data_dir.is_dir():
        raise CropError(f"{data_dir}: not a folder; pass a folder of <person>/<photo> files")
    if not data_dir.is_dir():
        raise CropError(f"{data_dir}: photo folder not found")
    people = sorted(p for p in data_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not people:
        raise CropError(f"{data_dir}: no person folders found; expected {data_dir}/<person>/<photo>")
    return people


class FaceCropper:
    """MTCNN detection with an on-disk cache of crops and detection results."""

    def __init__(self, out_dir: Path, settings: DetectorSettings, device: str | None = None):
        self.out_dir = out_dir
        self.settings = settings
        self.device = device
        self._mtcnn = None

    @property
    def mtcnn(self):
        if self._mtcnn is None:
            import torch
            from facenet_pytorch import MTCNN

            device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
            self._mtcnn = MTCNN(
                image_size=self.settings.image_size,
                margin=self.settings.margin,
                min_face_size=self.settings.min_face_size,
                thresholds=list(self.settings.thresholds),
                factor=self.settings.factor,
                post_process=False,
                select_largest=True,
                keep_all=False,
                device=device,
            )
        return self._mtcnn

    def cache_key(self, photo_sha256: str) -> str:
        return hashlib.sha256(f"{photo_sha256}|{self.settings.key()}".encode()).hexdigest()

    def crop_path(self, key: str) -> Path:
        return self.out_dir / "crops" / key[:2] / f"{key}.png"

    def record_path(self, key: str) -> Path:
        return self.out_dir / "detections" / key[:2] / f"{key}.json"

    def process(self, photo: Path) -> dict:
        """Return the manifest fields for one photo, detecting only on a cache miss."""
        try:
            data = photo.read_bytes()
        except OSError as err:
            return {"sha256": "", "status": "unreadable", "prob": None, "crop": "",
                    "error": f"{type(err).__name__}: {err}", "cached": False}
        sha = hashlib.sha256(data).hexdigest()
        key = self.cache_key(sha)
        record_file = self.record_path(key)
        if record_file.is_file():
            record = json.loads(record_file.read_text())
            if record["status"] == "no_face" or self.crop_path(key).is_file():
                return {"sha256": sha, **record, "cached": True}

        try:
            img = load_rgb(photo)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
            return {"sha256": sha, "status": "unreadable", "prob": None, "crop": "",
                    "error": f"{type(err).__name__}: {err}", "cached": False}

        # One photo a call: facenet-pytorch needs equal sizes in a batch, and a
        # batch that mixes photos with and without a face fails in its box selection.
        if min(img.size) < self.settings.min_face_size:
            # facenet-pytorch fails inside its image pyramid on photos smaller than the smallest face.
            record = {"status": "no_face", "prob": None, "crop": "",
                      "error": f"photo is {img.size[0]}x{img.size[1]}, smaller than --min-face-size {self.settings.min_face_size}"}
            write_json_atomic(record_file, record)
            return {"sha256": sha, **record, "cached": False}
        face, prob = self.mtcnn(img, return_prob=True)
        if face is None:
            record = {"status": "no_face", "prob": None, "crop": "", "error": ""}
        else:
            pixels = face.clamp(0, 255).round().byte().permute(1, 2, 0).numpy()
            self._write_png(self.crop_path(key), pixels)
            record = {"status": "cropped", "prob": float(prob),
                      "crop": str(self.crop_path(key).relative_to(self.out_dir)), "error": ""}
        write_json_atomic(record_file, record)
        return {"sha256": sha, **record, "cached": False}

    @staticmethod
    def _write_png(path: Path, pixels: np.ndarray) -> None:
        from io import BytesIO

        buffer = BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        write_bytes_atomic(path, buffer.getvalue())


def crop_folder(data_dir: Path, out_dir: Path, settings: DetectorSettings, device: str | None = None,
                progress: bool = True, write: bool = True) -> pd.DataFrame:
    """Crop every photo under `data_dir` and return the manifest.

    With `write`, also write `<out_dir>/manifest.csv`. The crop command passes
    False and writes it only after the split succeeds, so that manifest.csv
    and split.csv always come from the same crop run.
    """
    from tqdm import tqdm

    data_dir, out_dir = Path(data_dir), Path(out_dir)
    photos = list_photos(data_dir)
    if not photos:
        raise CropError(f"{data_dir}: the person folders hold no files")
    cropper = FaceCropper(out_dir, settings, device)
    rows = []
    for person, photo in tqdm(photos, desc="crop", unit="photo", disable=not progress):
        fields = cropper.process(photo)
        rows.append({"path": str(photo.relative_to(data_dir)), "person": person, **fields})
    manifest = pd.DataFrame(rows, columns=["path", "person", "sha256", "status", "prob", "crop", "error", "cached"])
    if write:
        write_manifest(data_dir, out_dir, settings, manifest)
    return manifest


def write_manifest(data_dir: Path, out_dir: Path, settings: DetectorSettings, manifest: pd.DataFrame) -> None:
    """Write manifest.csv and the detector settings that made it."""
    write_csv_atomic(Path(out_dir) / "manifest.csv", manifest)
    write_json_atomic(Path(out_dir) / "crop_settings.json", {"data_dir": str(Path(data_dir).resolve()), **asdict(settings)})


def check_split_options(min_images: int, val_fraction: float) -> None:
    if min_images < 2:
        raise CropError(f"--min-images must be at least 2 (one train and one val image), got {min_images}")
    if not 0 < val_fraction < 1:
        raise CropError(f"--val-fraction must be between 0 and 1, got {val_fraction}")


def check_detector_settings(settings: DetectorSettings) -> None:
    """Raise CropError for detector settings MTCNN cannot use."""
    if settings.min_face_size < 1:
        raise CropError(f"--min-face-size must be at least 1 pixel, got {settings.min_face_size}")
    if settings.margin < 0:
        raise CropError(f"--margin must not be negative, got {settings.margin}")
    # facenet-pytorch widens the box by margin / (image_size - margin) of its size, so the margin
    # must stay below the crop size.
    if settings.margin >= settings.image_size:
        raise CropError(f"--margin must be below the crop size ({settings.image_size} pixels), got {settings.margin}")
    if not all(0 < t <= 1 for t in settings.thresholds):
        raise CropError(f"--thresholds must be probabilities in (0, 1], got {list(settings.thresholds)}")


def split_people(manifest: pd.DataFrame, min_images: int = 2, val_fraction: float = 0.2, seed: int = 0,
                 people: list[str] | None = None) -> tuple[pd.DataFrame, dict[str, int]]:
    """Split each person's crops into train and val, seeded per person.

    `people` names every person folder, so that empty folders, which have no
    manifest rows, are reported too. People with fewer than `min_images`
    crops are left out and returned with their crop counts. Every kept person
    gets at least one val and one train image. Labels are indices into the
    sorted names of the kept people.
    """
    check_split_options(min_images, val_fraction)
    cropped = manifest[manifest["status"] == "cropped"]
    counts = cropped.groupby("person").size()
    all_people = sorted(set(manifest["person"]) | set(people or []))
    excluded = {p: int(counts.get(p, 0)) for p in all_people if counts.get(p, 0) < min_images}
    included = [p for p in all_people if p not in excluded]
    if len(included) < 2:
        raise CropError(f"{len(included)} person folder(s) have at least {min_images} face crops; "
                        "classification needs 2 or more, so add people or photos (manifest.csv and split.csv were not updated)")

    rows = []
    for label, person in enumerate(included):
        # Drop repeated crops of identical photos so no image sits in both train and val.
        crops = sorted(set(cropped.loc[cropped["person"] == person, "crop"]))
        random.Random(f"{seed}:{person}").shuffle(crops)
        n_val = min(max(1, round(val_fraction * len(crops))), len(crops) - 1)
        for i, crop in enumerate(crops):
            rows.append({"crop": crop, "person": person, "label": label, "split": "val" if i < n_val else "train"})
    return pd.DataFrame(rows), excluded


def write_split(out_dir: Path, split: pd.DataFrame, excluded: dict[str, int], seed: int, val_fraction: float,
                min_images: int) -> None:
    write_csv_atomic(Path(out_dir) / "split.csv", split)
    write_json_atomic(Path(out_dir) / "split_settings.json", {
        "seed": seed, "val_fraction": val_fraction, "min_images": min_images,
        "people": int(split["person"].nunique()), "excluded_people": excluded,
    })
