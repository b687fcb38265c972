"""Shared fixtures: a few real LFW people from ../shared/data, cropped once per session."""

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_LFW = REPO.parent / "shared" / "data" / "lfw_deepfunneled_min20"
SHARED_ATT = REPO.parent / "shared" / "data" / "att_faces"
# The first people by name with exactly 20 photos keep the fixture small.
PEOPLE = ("Alejandro_Toledo", "Alvaro_Uribe", "Amelie_Mauresmo", "Andre_Agassi", "Angelina_Jolie")
PHOTOS_PER_PERSON = 6

needs_lfw = pytest.mark.skipif(not SHARED_LFW.is_dir(), reason=f"{SHARED_LFW} not found")


def real_photos(person: str, count: int = PHOTOS_PER_PERSON) -> list[Path]:
    return sorted((SHARED_LFW / person).glob("*.jpg"))[:count]


def link_people(root: Path, people=PEOPLE, count: int = PHOTOS_PER_PERSON) -> Path:
    """Make root/<person>/ folders of symlinks to real photos (the photos are not copied)."""
    for person in people:
        folder = root / person
        folder.mkdir(parents=True)
        for photo in real_photos(person, count):
            (folder / photo.name).symlink_to(photo)
    return root


@pytest.fixture(scope="session")
def photos_dir(tmp_path_factory) -> Path:
    if not SHARED_LFW.is_dir():
        pytest.skip(f"{SHARED_LFW} not found")
    return link_people(tmp_path_factory.mktemp("photos"))


@pytest.fixture(scope="session")
def crops_dir(photos_dir, tmp_path_factory) -> Path:
    """Crops, manifest.csv and split.csv of `photos_dir`, made by the real crop stage."""
    from facedeit.faces import DetectorSettings, crop_folder, split_people, write_split

    out = tmp_path_factory.mktemp("crops")
    manifest = crop_folder(photos_dir, out, DetectorSettings(), progress=False)
    split, excluded = split_people(manifest, min_images=2, val_fraction=0.2, seed=0)
    write_split(out, split, excluded, seed=0, val_fraction=0.2, min_images=2)
    return out


def write_recipe(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


TINY_RECIPE = """\
model: {name: deit_tiny_ls, img_size: 160}
epochs: 2
batch_size: 8
optimizer: {name: adamw, lr: 1.0e-3, weight_decay: 0.05}
schedule: {name: cosine, warmup_epochs: 0.5, warmup_lr: 1.0e-6, min_lr: 1.0e-5}
"""
