"""plan's predictions against our measurements and blog 19 (bench/plan_validation.py), and the
committed bench/results/plan_validation.json against a fresh run."""
from __future__ import annotations

import json
import os

import pytest

pytest.importorskip("aiconfigurator_core")

from bench.plan_validation import ROOT, validate


@pytest.fixture(scope="module")
def result():
    return validate()


def test_points_have_the_required_fields(result):
    points = result["points"]
    assert len(points) >= 6
    for p in points:
        assert {"name", "predicted", "reference", "rel_err"} <= set(p)
        assert p["reference"]["source"]
        if not p["within_tolerance"]:
            assert p.get("miss_term"), p["name"]
    assert result["constants"]["tuned_to_validation_points"] is False


def test_goal_points_within_tolerance(result):
    missed = [(p["name"], p["rel_err"]) for p in result["points"]
              if p["goal"] and not p["within_tolerance"]]
    assert not missed
    names = " ".join(p["name"] for p in result["points"] if p["goal"])
    for needle in ("one H200", "2xH200 DWDP", "2xH200 EP", "DEP4 context iteration",
                   "DWDP4 context iteration", "sign of DWDP4 - DEP4", "crossover"):
        assert needle in names


def test_committed_json_matches_a_fresh_run(result):
    with open(os.path.join(ROOT, "bench/results/plan_validation.json")) as f:
        committed = json.load(f)
    assert [p["name"] for p in committed["points"]] == [p["name"] for p in result["points"]]
    for old, new in zip(committed["points"], result["points"]):
        if isinstance(new["predicted"], float):
            assert old["predicted"] == pytest.approx(new["predicted"], rel=1e-9), (
                f"{new['name']}: bench/results/plan_validation.json is stale; re-run "
                f"python -m bench.plan_validation")
