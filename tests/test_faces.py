import io
import os

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from facedeit.cli import main
from facedeit.faces import CropError, DetectorSettings, crop_folder, list_photos, load_rgb, split_people
from tests.conftest import PEOPLE, SHARED_ATT, link_people, needs_lfw, real_photos


@pytest.fixture
def mixed_dir(tmp_path):
    """Two real people plus a corrupt JPEG, a text file named .jpg and a photo with no face."""
    root = link_people(tmp_path / "photos", PEOPLE[:2], count=3)
    photo = real_photos(PEOPLE[0], 4)[3]
    (root / PEOPLE[0] / "truncated.jpg").write_bytes(photo.read_bytes()[:300])
    (root / PEOPLE[1] / "notes.jpg").write_text("not an image\n")
    Image.new("RGB", (250, 250), (128, 128, 128)).save(root / PEOPLE[1] / "grey_wall.png")
    return root


@needs_lfw
def test_tiny_photo_and_broken_link_get_rows(mixed_dir, tmp_path):
    Image.new("RGB", (1, 1), (0, 0, 0)).save(mixed_dir / PEOPLE[0] / "dot.png")
    (mixed_dir / PEOPLE[1] / "gone.jpg").symlink_to(tmp_path / "missing.jpg")
    manifest = crop_folder(mixed_dir, tmp_path / "out", DetectorSettings(), progress=False)
    rows = manifest.set_index(manifest["path"].map(lambda p: p.split("/")[-1]))
    assert rows.loc["dot.png", "status"] == "no_face"
    assert "smaller than --min-face-size" in rows.loc["dot.png", "error"]
    assert rows.loc["gone.jpg", "status"] == "unreadable"


def test_written_files_follow_the_umask(tmp_path):
    from facedeit.io import write_text_atomic

    old = os.umask(0o022)
    try:
        write_text_atomic(tmp_path / "a.txt", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644


@needs_lfw
def test_manifest_statuses(mixed_dir, tmp_path):
    manifest = crop_folder(mixed_dir, tmp_path / "out", DetectorSettings(), progress=False)
    status = dict(zip(manifest["path"].map(lambda p: p.split("/")[-1]), manifest["status"]))
    assert status["truncated.jpg"] == "unreadable"
    assert status["notes.jpg"] == "unreadable"
    assert status["grey_wall.png"] == "no_face"
    assert list(manifest["status"]).count("cropped") == 6
    assert len(manifest) == 9  # every file has a row
    errors = dict(zip(manifest["path"].map(lambda p: p.split("/")[-1]), manifest["error"]))
    assert "UnidentifiedImageError" in errors["notes.jpg"]
    on_disk = pd.read_csv(tmp_path / "out" / "manifest.csv")
    assert list(on_disk["status"]) == list(manifest["status"])


@needs_lfw
def test_crops_160_rgb_with_probability(mixed_dir, tmp_path):
    manifest = crop_folder(mixed_dir, tmp_path / "out", DetectorSettings(), progress=False)
    cropped = manifest[manifest["status"] == "cropped"]
    for crop in cropped["crop"]:
        with Image.open(tmp_path / "out" / crop) as img:
            assert (img.size, img.mode) == ((160, 160), "RGB")
    assert cropped["prob"].between(0.9, 1.0).all()


@needs_lfw
def test_crop_cache_reuse_and_invalidation(mixed_dir, tmp_path):
    out = tmp_path / "out"
    first = crop_folder(mixed_dir, out, DetectorSettings(), progress=False)
    crop_files = sorted((out / "crops").rglob("*.png"))
    mtimes = [f.stat().st_mtime_ns for f in crop_files]

    second = crop_folder(mixed_dir, out, DetectorSettings(), progress=False)
    readable = second["status"] != "unreadable"
    assert second.loc[readable, "cached"].all()
    assert [f.stat().st_mtime_ns for f in sorted((out / "crops").rglob("*.png"))] == mtimes
    assert list(second["crop"]) == list(first["crop"])

    # Replace one photo with another person's photo: only that one is detected again.
    target = mixed_dir / PEOPLE[0] / real_photos(PEOPLE[0], 1)[0].name
    target.unlink()
    target.write_bytes(real_photos(PEOPLE[2], 1)[0].read_bytes())
    third = crop_folder(mixed_dir, out, DetectorSettings(), progress=False)
    not_cached = third.loc[readable & ~third["cached"].astype(bool), "path"].tolist()
    assert not_cached == [str(target.relative_to(mixed_dir))]


@needs_lfw
def test_detector_settings_change_misses_cache(mixed_dir, tmp_path):
    out = tmp_path / "out"
    crop_folder(mixed_dir, out, DetectorSettings(), progress=False)
    again = crop_folder(mixed_dir, out, DetectorSettings(margin=0), progress=False)
    assert not again.loc[again["status"] == "cropped", "cached"].any()


@needs_lfw
@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK", "I;16"])
def test_load_rgb_accepts_any_mode(tmp_path, mode):
    with Image.open(real_photos(PEOPLE[0], 1)[0]) as img:
        if mode == "I;16":
            pixels = np.asarray(img.convert("L"), dtype=np.uint16) * 257
            converted = Image.fromarray(pixels)
        else:
            converted = img.convert(mode)
    suffix = ".jpg" if mode in ("L", "CMYK") else ".png"
    path = tmp_path / f"photo{suffix}"
    converted.save(path)
    rgb = load_rgb(path)
    assert rgb.mode == "RGB"
    assert rgb.size == (250, 250)
    assert np.asarray(rgb).std() > 10  # not flattened to one colour


def test_load_rgb_honours_exif_orientation(tmp_path):
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise
    path = tmp_path / "rotated.jpg"
    img.save(path, exif=exif)
    assert load_rgb(path).size == (20, 40)


def test_load_rgb_rejects_truncated_file(tmp_path):
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 200, 30)).save(buffer, format="PNG")
    path = tmp_path / "cut.png"
    path.write_bytes(buffer.getvalue()[:60])
    with pytest.raises(OSError):
        load_rgb(path)


def test_list_photos_errors(tmp_path):
    with pytest.raises(CropError, match="photo folder not found"):
        list_photos(tmp_path / "missing")
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.jpg").write_bytes(b"")
    with pytest.raises(CropError, match="no person folders"):
        list_photos(tmp_path / "flat")


def test_list_photos_warns_about_nested_folders(tmp_path, caplog):
    (tmp_path / "Ann" / "holiday").mkdir(parents=True)
    (tmp_path / "Ann" / "a.jpg").write_bytes(b"")
    (tmp_path / "Ann" / "holiday" / "b.jpg").write_bytes(b"")
    assert [f.name for _, f in list_photos(tmp_path)] == ["a.jpg"]
    assert "skipping 1 folder(s) inside person folders" in caplog.text


def _manifest(counts: dict[str, int]) -> pd.DataFrame:
    rows = [{"path": f"{p}/{i}.jpg", "person": p, "status": "cropped", "crop": f"crops/{p}{i}.png"}
            for p, n in counts.items() for i in range(n)]
    rows.append({"path": "Empty/x.jpg", "person": "Empty", "status": "no_face", "crop": ""})
    return pd.DataFrame(rows)


def test_split_seeded_per_person():
    manifest = _manifest({"A": 10, "B": 2, "C": 3, "D": 1})
    split, excluded = split_people(manifest, min_images=2, val_fraction=0.2, seed=0)
    assert excluded == {"D": 1, "Empty": 0}
    assert sorted(split["person"].unique()) == ["A", "B", "C"]
    per_person = split.groupby(["person", "split"]).size().unstack(fill_value=0)
    assert (per_person["val"] >= 1).all()
    assert (per_person["train"] >= 1).all()
    assert per_person.loc["A", "val"] == 2
    assert dict(zip(split["person"], split["label"])) == {"A": 0, "B": 1, "C": 2}

    again, _ = split_people(manifest, min_images=2, val_fraction=0.2, seed=0)
    other, _ = split_people(manifest, min_images=2, val_fraction=0.2, seed=1)
    pd.testing.assert_frame_equal(split, again)
    assert not split.equals(other)
    assert not set(split.loc[split["split"] == "val", "crop"]) & set(split.loc[split["split"] == "train", "crop"])


def test_split_rejects_single_person():
    with pytest.raises(CropError, match="1 person folder\\(s\\) have at least 2 face crops"):
        split_people(_manifest({"A": 5, "B": 1}), min_images=2)
    with pytest.raises(CropError, match="--min-images must be at least 2"):
        split_people(_manifest({"A": 5, "B": 5}), min_images=1)


@needs_lfw
def test_cli_crop_lists_left_out_people(tmp_path, capsys):
    root = link_people(tmp_path / "photos", PEOPLE[:3], count=3)
    (root / "Nobody").mkdir()
    link_people(tmp_path / "one", PEOPLE[3:4], count=1)
    os.rename(tmp_path / "one" / PEOPLE[3], root / PEOPLE[3])
    out = tmp_path / "out"
    assert main(["crop", "--data", str(root), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "10 files: cropped 10, no_face 0, unreadable 0" in printed
    assert f"left out 2 people with fewer than 2 crops: {PEOPLE[3]} (1), Nobody (0)" in printed
    split = pd.read_csv(out / "split.csv")
    assert sorted(split["person"].unique()) == sorted(PEOPLE[:3])

    # A second crop whose split fails keeps the first manifest.csv and split.csv together.
    before = {name: (out / name).read_bytes() for name in ("manifest.csv", "split.csv")}
    assert main(["crop", "--data", str(root), "--out", str(out), "--min-images", "4"]) == 2
    assert "manifest.csv and split.csv were not updated" in capsys.readouterr().err
    for name, content in before.items():
        assert (out / name).read_bytes() == content, name


@pytest.mark.parametrize("option, message", [
    (["--min-face-size", "0"], "--min-face-size must be at least 1 pixel"),
    (["--margin", "-5"], "--margin must not be negative"),
    (["--margin", "160"], "--margin must be below the crop size (160 pixels)"),
    (["--thresholds", "2", "2", "2"], "--thresholds must be probabilities"),
    (["--val-fraction", "1.5"], "--val-fraction must be between 0 and 1"),
    (["--device", "bogus"], "--device bogus: not a torch device"),
])
def test_cli_crop_bad_option(tmp_path, capsys, option, message):
    assert main(["crop", "--data", str(tmp_path), "--out", str(tmp_path / "out"), *option]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_crop_out_is_a_file(tmp_path, capsys):
    (tmp_path / "out").write_text("not a folder\n")
    assert main(["crop", "--data", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip() == f"facedeit: error: --out {tmp_path / 'out'}: exists and is not a folder"


def test_cli_crop_empty_data_path(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["crop", "--data", ""])
    assert exit_info.value.code == 2
    assert "argument --data: empty path" in capsys.readouterr().err


def test_cli_crop_missing_folder(tmp_path, capsys):
    assert main(["crop", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"facedeit: error: {tmp_path / 'nope'}: photo folder not found"
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not SHARED_ATT.is_dir(), reason=f"{SHARED_ATT} not found")
def test_crop_greyscale_pgm_faces(tmp_path):
    """The AT&T faces: 92x112 greyscale PGM, tightly cropped on a dark background."""
    root = tmp_path / "att"
    for person in ("s1", "s2"):
        (root / person).mkdir(parents=True)
        for photo in sorted((SHARED_ATT / person).glob("*.pgm"))[:3]:
            (root / person / photo.name).symlink_to(photo)
    manifest = crop_folder(root, tmp_path / "out", DetectorSettings(), progress=False)
    assert len(manifest) == 6
    assert (manifest["status"] == "cropped").sum() >= 4
    with Image.open(tmp_path / "out" / manifest.loc[manifest["status"] == "cropped", "crop"].iloc[0]) as crop:
        assert (crop.size, crop.mode) == ((160, 160), "RGB")
