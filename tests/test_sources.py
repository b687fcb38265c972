import pytest

import facedeit.sources as sources
from facedeit.cli import main


def test_shared_lfw_is_the_default(monkeypatch, tmp_path):
    monkeypatch.setattr(sources, "SHARED_LFW", tmp_path)
    assert sources.default_data_dir() == tmp_path


def test_no_data_anywhere_is_one_line(monkeypatch, tmp_path, capsys):
    import sklearn.datasets

    def offline(**kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(sources, "SHARED_LFW", tmp_path / "missing")
    monkeypatch.setattr(sklearn.datasets, "fetch_lfw_people", offline)
    with pytest.raises(sources.NoDataError, match="pass DATA=DIR"):
        sources.default_data_dir()
    assert main(["crop", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("facedeit: error: no face photos found:")
    assert "\n" not in err
