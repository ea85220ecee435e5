"""bench/report.py: the measured tables of README.md and docs/ are the committed JSON's (this is
the check .ci/run makes), and on a small document: --write renders between the markers only,
--check names the table that drifted from its JSON, a wrong marker is refused with its name."""
import json

import pytest

from bench import report


def test_committed_tables_match_their_json(capsys):
    assert report.main(["--check"]) == 0, capsys.readouterr().err
    for doc in report.DOCS:
        with open(f"{report.ROOT}/{doc}") as f:
            names = report.markers(f.read())
        assert names and set(names) <= set(report.TABLES), (doc, names)
    with open(f"{report.ROOT}/README.md") as f:
        readme = f.read()
    assert {"serve-compare", "kernels"} <= set(report.markers(readme))


def _tiny(tmp_path, monkeypatch, value):
    (tmp_path / "r.json").write_text(json.dumps({"v": value}))
    (tmp_path / "docs").mkdir(exist_ok=True)
    monkeypatch.setattr(report, "TABLES", {"t": report.Table(
        "r.json", "2026-01-02", lambda d: ["tiny run.", "", "| v |", "|---|", f"| {d['v']} |"])})


def test_write_then_check_then_drift_is_named(tmp_path, monkeypatch, capsys):
    _tiny(tmp_path, monkeypatch, 41)
    monkeypatch.setattr(report, "DOCS", ("README.md", "docs/BENCHMARKS.md"))
    doc = "# Title\nbefore\n<!-- report:t -->\nstale\n<!-- /report:t -->\nafter\n"
    (tmp_path / "README.md").write_text(doc)
    (tmp_path / "docs" / "BENCHMARKS.md").write_text("no tables here\n")
    assert report.main(["--check", "--root", str(tmp_path)]) == 1
    assert "README.md: t" in capsys.readouterr().err
    assert report.main(["--write", "--root", str(tmp_path)]) == 0
    text = (tmp_path / "README.md").read_text()
    assert text.startswith("# Title\nbefore\n<!-- report:t -->\nMeasured 2026-01-02 (`r.json`")
    assert "| 41 |\n<!-- /report:t -->\nafter\n" in text
    assert (tmp_path / "docs" / "BENCHMARKS.md").read_text() == "no tables here\n"
    assert report.main(["--check", "--root", str(tmp_path)]) == 0
    _tiny(tmp_path, monkeypatch, 42)  # a new run's JSON committed, the docs not rewritten
    assert report.main(["--check", "--root", str(tmp_path)]) == 1
    assert "README.md: t" in capsys.readouterr().err


def test_bad_markers_are_named(tmp_path, monkeypatch):
    _tiny(tmp_path, monkeypatch, 1)
    with pytest.raises(ValueError, match="unknown table 'nope'"):
        report.update("<!-- report:nope -->\n<!-- /report:nope -->\n", str(tmp_path))
    with pytest.raises(ValueError, match="table 't': no closing"):
        report.update("<!-- report:t -->\nbody\n", str(tmp_path))
