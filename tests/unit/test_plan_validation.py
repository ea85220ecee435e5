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


def test_blog_terms_each_reported_with_a_cause(result):
    """Blog 19's Table 3 per term, beside the totals: each non-zero term is a point that is
    not a goal, and a miss says why (terms that cancel must not pass unnoticed)."""
    from bench.plan_validation import BLOG_TERMS
    from tensorrt_llm_dwdp.plan.reference import BLOG19
    by_name = {p["name"]: p for p in result["points"]}
    for dep in ("DEP4", "DWDP4"):
        for term in BLOG_TERMS:
            ref = BLOG19["iteration"][dep][term]
            name = f"blog 19 GB200 {dep} term {term} (reported, not a goal)"
            if not ref:
                assert name not in by_name
                continue
            p = by_name[name]
            assert p["goal"] is False and p["reference"]["value"] == ref
            assert p["rel_err"] == pytest.approx(p["predicted"] / ref - 1)
            if not p["within_tolerance"]:
                assert p["cause_of_miss"], name
    attention = by_name["blog 19 GB200 DEP4 term attention (reported, not a goal)"]
    assert 0.8 < attention["fmha_fp8_over_bf16"]["median"] <= 1.0
