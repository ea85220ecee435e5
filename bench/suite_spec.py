"""The suites file's format (``bench/suites.yaml``) for ``bench/suites.py``: a suite is named
stages; each stage one command with its limit and conditions. Loading checks the format and
names the suite, stage and key of a mistake; the selections the runner's options make
(``--stages``, ``--timeout``, ``--extra``) are pure functions of the loaded suites."""
from __future__ import annotations

import logging
import os
import shlex
from dataclasses import dataclass, field, replace
from typing import Sequence

import yaml

SUITES_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "suites.yaml")
STAGE_KEYS = {"name", "run", "timeout", "outputs", "ranks", "background", "needs", "skip_if",
              "env", "stop_on_fail", "optional", "if_ok", "unless_ok"}
logger = logging.getLogger("bench.suite_spec")


@dataclass(frozen=True)
class Stage:
    """One command of a suite. ``run`` is a shell-like string split with shlex after the
    placeholders are filled; ``timeout`` in seconds; ``outputs`` relative to the suite's folder."""
    name: str
    run: str
    timeout: int
    outputs: tuple[str, ...] = ()
    ranks: int | str | None = None
    background: bool = False
    needs: tuple[str, ...] = ()
    skip_if: str | None = None
    env: dict = field(default_factory=dict)
    stop_on_fail: bool = False
    optional: bool = False  # runs only when --stages names it
    if_ok: tuple[str, ...] = ()      # runs only when these earlier stages ran and passed
    unless_ok: tuple[str, ...] = ()  # runs only when one of these did not (failed / not run)


@dataclass(frozen=True)
class Suite:
    name: str
    about: str
    stages: tuple[Stage, ...]


def load_suites(path: str = SUITES_FILE) -> dict[str, Suite]:
    """Read and check the suites file; ValueError naming the suite, stage and key on a mistake."""
    with open(path) as f:
        raw = yaml.safe_load(f) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping of suite name -> suite")
    return {name: _suite(name, spec, path) for name, spec in raw.items()}


def _suite(name: str, spec, path: str) -> Suite:
    where = f"{path}: suite {name!r}"
    if not isinstance(spec, dict) or set(spec) - {"about", "stages"} or "stages" not in spec:
        raise ValueError(f"{where}: expected keys 'about' and 'stages'")
    if not isinstance(spec["stages"], list) or not spec["stages"]:
        raise ValueError(f"{where}: 'stages' must be a non-empty list")
    stages, seen = [], set()
    for i, s in enumerate(spec["stages"]):
        if not isinstance(s, dict):
            raise ValueError(f"{where}: stage {i} must be a mapping")
        sname = s.get("name", f"#{i}")
        at = f"{where} stage {sname!r}"
        unknown = set(s) - STAGE_KEYS
        if unknown:
            raise ValueError(f"{at}: unknown key(s) {sorted(unknown)}; known: {sorted(STAGE_KEYS)}")
        for key in ("name", "run", "timeout"):
            if key not in s:
                raise ValueError(f"{at}: missing {key!r}")
        if not isinstance(s["timeout"], int) or s["timeout"] <= 0:
            raise ValueError(f"{at}: timeout must be a positive number of seconds, got {s['timeout']!r}")
        if sname in seen:
            raise ValueError(f"{at}: duplicate stage name")
        for key in ("needs", "if_ok", "unless_ok"):
            if not isinstance(s.get(key, []), list):
                raise ValueError(f"{at}: {key} must be a list of earlier stage names")
            missing = [n for n in s.get(key, []) if n not in seen]
            if missing:
                raise ValueError(f"{at}: {key} {missing}, which no earlier stage is named")
        ranks = s.get("ranks")
        if ranks is not None and not (ranks == "{ranks}" or (isinstance(ranks, int) and ranks >= 1)):
            raise ValueError(f"{at}: ranks must be a positive integer or '{{ranks}}', got {ranks!r}")
        seen.add(sname)
        stages.append(Stage(name=sname, run=str(s["run"]), timeout=s["timeout"],
                            outputs=tuple(s.get("outputs", ())), ranks=ranks,
                            background=bool(s.get("background", False)),
                            needs=tuple(s.get("needs", ())), skip_if=s.get("skip_if"),
                            env={str(k): str(v) for k, v in (s.get("env") or {}).items()},
                            stop_on_fail=bool(s.get("stop_on_fail", False)),
                            optional=bool(s.get("optional", False)),
                            if_ok=tuple(s.get("if_ok", ())),
                            unless_ok=tuple(s.get("unless_ok", ()))))
    return Suite(name, str(spec.get("about", "")), tuple(stages))


def select_stages(suites: dict[str, Suite], names: Sequence[str] | None) -> dict[str, Suite]:
    """The suites with the stages to run: every non-optional one when ``names`` is None, else
    those named (optional ones included), in the suite's order. A name no suite has, or a suite
    left with none of the names, is a ValueError naming them. Stages a selected one refers to
    are not added (a warning says so): one it ``needs`` is not waited for (its skip_if file may
    exist), an ``if_ok`` one left out skips it, an ``unless_ok`` one left out lets it run."""
    if names is None:
        return {n: Suite(s.name, s.about, tuple(st for st in s.stages if not st.optional))
                for n, s in suites.items()}
    wanted = set(names)
    known = {st.name for s in suites.values() for st in s.stages}
    if wanted - known:
        raise ValueError(f"--stages: no stage {sorted(wanted - known)} in "
                         f"{', '.join(suites)} (stages: {', '.join(sorted(known))})")
    picked = {}
    for n, s in suites.items():
        stages = tuple(st for st in s.stages if st.name in wanted)
        if not stages:
            raise ValueError(f"--stages: suite {n!r} has none of {sorted(wanted)} "
                             f"(its stages: {', '.join(st.name for st in s.stages)})")
        for st in stages:
            for key, deps, effect in (("needs", st.needs, "it runs without waiting for it"),
                                      ("if_ok", st.if_ok, "it is skipped"),
                                      ("unless_ok", st.unless_ok, "it runs")):
                left_out = [d for d in deps if d not in wanted]
                if left_out:
                    logger.warning("%s/%s %s %s, not selected: %s", n, st.name, key, left_out,
                                   effect)
        picked[n] = Suite(s.name, s.about, stages)
    return picked


def _stage_items(option: str, items: list[str], suites: dict[str, Suite]
                 ) -> list[tuple[str, str, str]]:
    """``SUITE/STAGE=VALUE`` items -> (suite, stage, value); ValueError naming a bad item."""
    out = []
    for item in items:
        target, sep, text = item.partition("=")
        suite, slash, stage = target.partition("/")
        if not sep or not slash:
            raise ValueError(f"{option} {item!r}: expected SUITE/STAGE=VALUE")
        if suite not in suites or stage not in {s.name for s in suites[suite].stages}:
            known = ", ".join(f"{n}/{s.name}" for n, x in suites.items() for s in x.stages)
            raise ValueError(f"{option} {item!r}: no stage {stage!r} in the suites run ({known})")
        out.append((suite, stage, text))
    return out


def parse_extra(items: list[str], suites: dict[str, Suite]) -> dict[str, dict[str, list[str]]]:
    """``SUITE/STAGE=ARGS`` items -> {suite: {stage: argv}}; ValueError naming a bad item."""
    out: dict[str, dict[str, list[str]]] = {}
    for suite, stage, text in _stage_items("--extra", items, suites):
        out.setdefault(suite, {}).setdefault(stage, []).extend(shlex.split(text))
    return out


def with_timeouts(items: list[str], suites: dict[str, Suite]) -> dict[str, Suite]:
    """``SUITE/STAGE=SECONDS`` items -> the suites with those stages' limits replaced;
    ValueError naming an item that is not a known stage or a positive whole number of seconds."""
    limits: dict[tuple[str, str], int] = {}
    for suite, stage, text in _stage_items("--timeout", items, suites):
        if not text.isdigit() or int(text) <= 0:
            raise ValueError(f"--timeout {suite}/{stage}={text}: expected a positive whole "
                             f"number of seconds")
        limits[(suite, stage)] = int(text)
    return {n: Suite(s.name, s.about,
                     tuple(replace(st, timeout=limits.get((n, st.name), st.timeout))
                           for st in s.stages))
            for n, s in suites.items()}
