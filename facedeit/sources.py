"""The default photo folder, used when `--data` is not given."""

import logging
from pathlib import Path

log = logging.getLogger(__name__)

# The LFW subset that sits beside the repository checkout (people with >= 20 photos).
SHARED_LFW = Path(__file__).resolve().parents[2] / "shared" / "data" / "lfw_deepfunneled_min20"


class NoDataError(RuntimeError):
    pass


def default_data_dir() -> Path:
    """Return the shared LFW folder when present, else scikit-learn's LFW photo folder.

    scikit-learn's `fetch_lfw_people` reuses its cache and downloads only when
    online. Raises NoDataError when neither can be had.
    """
    if SHARED_LFW.is_dir():
        return SHARED_LFW
    try:
        from sklearn.datasets import fetch_lfw_people, get_data_home

        fetch_lfw_people(min_faces_per_person=20, download_if_missing=True)
        folder = Path(get_data_home()) / "lfw_home" / "lfw_funneled"
    except Exception as err:  # noqa: BLE001 - any failure here means "no data"; the message says what to do
        raise NoDataError(
            f"no face photos found: {SHARED_LFW} is missing and scikit-learn could not fetch LFW "
            f"({type(err).__name__}); pass DATA=DIR (make) or --data DIR, a folder of <person>/<photo> files"
        ) from None
    if not folder.is_dir():
        raise NoDataError(f"no face photos found: {folder} is missing; pass DATA=DIR (make) or --data DIR")
    return folder
