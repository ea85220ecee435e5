"""bench/suites.py and bench/suite_spec.py: the committed suites load and name files that exist; a mistake in a suite
names where it is; a small suite on the CPU records per stage its exit code, seconds, missing
outputs, a time limit that killed it, skips and stops, runs a stage on two ranks, and packs the
logs with an env record beside them; --stages picks stages (optional ones only when named); the
scripts the suites call answer --help."""
import glob
import json
import subprocess
import os
import shlex
import sys
import tarfile

import pytest

from bench import suites

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_committed_suites_resolve_to_files_that_exist():
    loaded = suites.load_suites()
    assert {"compare", "e2e", "engine", "group", "kernels", "serving", "tiers", "views",
            "x2", "fp8-kernels", "fp8-model", "fp8-quant", "graphs", "w4a8"} <= set(loaded)
    assert not glob.glob(os.path.join(ROOT, "bench", "run_device_*.sh")), \
        "a device script outside the runner: fold it into bench/suites.yaml"
    for suite in loaded.values():
        values = suites.placeholders(f"/tmp/out/{suite.name}", 4, 1)
        for stage in suite.stages:
            argv, env, _ = suites.resolve(stage, values)
            assert not any("{" + k + "}" in a for a in argv for k in values), argv
            for arg in argv:
                if arg.endswith((".py", ".sh", ".yaml")) and not arg.startswith("/"):
                    assert os.path.isfile(os.path.join(ROOT, arg)), (suite.name, stage.name, arg)
                if arg.startswith("tests/"):  # a file or folder, or file::test
                    path = os.path.join(ROOT, arg.split("::")[0])
                    assert os.path.exists(path), (suite.name, stage.name, arg)
            if "CONFIG" in env:
                assert os.path.isfile(os.path.join(ROOT, env["CONFIG"])), env


def _write(tmp_path, text: str) -> str:
    path = tmp_path / "suites.yaml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("text, words", [
    ("s: {stages: [{name: a, run: x}]}", ["suite 's'", "stage 'a'", "missing 'timeout'"]),
    ("s: {stages: [{name: a, run: x, timeout: 0}]}", ["stage 'a'", "positive"]),
    ("s: {stages: [{name: a, run: x, timeout: 5, color: red}]}", ["stage 'a'", "color"]),
    ("s: {stages: [{name: a, run: x, timeout: 5, needs: [b]}]}", ["stage 'a'", "needs ['b']"]),
    ("s: {stages: [{name: a, run: x, timeout: 5}, {name: a, run: y, timeout: 5}]}",
     ["stage 'a'", "duplicate"]),
    ("s: {stages: [{name: a, run: x, timeout: 5, ranks: 0}]}", ["stage 'a'", "ranks"]),
    ("s: {stages: [{name: a, run: x, timeout: 5, if_ok: [b]}]}", ["stage 'a'", "if_ok ['b']"]),
    ("s: {stages: [{name: a, run: x, timeout: 5, unless_ok: a}]}", ["stage 'a'", "unless_ok must"]),
    ("s: {stages: []}", ["suite 's'", "non-empty"]),
    ("s: {about: x}", ["suite 's'", "'stages'"]),
])
def test_a_mistake_names_suite_stage_and_key(tmp_path, text, words):
    with pytest.raises(ValueError) as err:
        suites.load_suites(_write(tmp_path, text))
    for w in words:
        assert w in str(err.value), (w, str(err.value))


def test_unknown_placeholder_is_named(tmp_path):
    s = suites.load_suites(_write(tmp_path, "s: {stages: [{name: a, run: 'echo {nope}', timeout: 5}]}"))
    with pytest.raises(ValueError, match=r"stage 'a': unknown placeholder 'nope'"):
        suites.resolve(s["s"].stages[0], suites.placeholders("/tmp/o", 2, 0))


def test_extra_arguments_reach_one_stage(capsys):
    assert suites.main(["kernels-variants", "--dry-run", "--out", "/tmp/o",
                        "--extra", "kernels-variants/variants=--tpe 16,32 --models deepseek_v3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    variants = next(line for line in lines if line.startswith("kernels-variants/variants"))
    smoke = next(line for line in lines if line.startswith("kernels-variants/smoke"))
    assert variants.endswith("--tpe 16,32 --models deepseek_v3") and "--tpe" not in smoke
    with pytest.raises(SystemExit):
        suites.main(["kernels-variants", "--dry-run", "--extra", "kernels-variants/nope=--x"])
    assert "no stage 'nope'" in capsys.readouterr().err


def test_unknown_suite_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        suites.main(["nope", "--out", str(tmp_path)])
    assert "unknown suite(s) ['nope']" in capsys.readouterr().err


def test_a_cpu_suite_records_every_stage_and_packs_the_logs(tmp_path):
    py = shlex.quote(sys.executable)
    rank_print = "import os; print('rank', os.environ.get('TRTLLM_DWDP_RANK') or os.environ['OMPI_COMM_WORLD_RANK'])"
    text = f"""
cpu:
  about: the runner's own test
  stages:
    - name: slow_bg
      run: "{py} -c 'import time; time.sleep(1); open(\\"{{out}}/bg.txt\\", \\"w\\").write(\\"bg\\")'"
      timeout: 60
      background: true
    - name: writes
      needs: [slow_bg]
      run: "{py} -c 'import os; open(\\"{{out}}/r.json\\", \\"w\\").write(os.environ[\\"X\\"])'"
      env: {{X: "{{ranks}}"}}
      timeout: 60
      outputs: [r.json, bg.txt, never.json]
    - name: ranks
      ranks: 2
      run: "{py} -c \\"{rank_print}\\""
      timeout: 120
    - name: skipped
      run: "{py} -c 'raise SystemExit(3)'"
      skip_if: "{{out}}/r.json"
      timeout: 60
    - name: hangs
      run: "{py} -c 'import time; time.sleep(600)'"
      timeout: 2
    - name: fails
      run: "{py} -c 'raise SystemExit(3)'"
      timeout: 60
      stop_on_fail: true
    - name: after
      run: "{py} -c 'print(1)'"
      timeout: 60
"""
    out = tmp_path / "out"
    rc = suites.main(["cpu", "--out", str(out), "--suites-file", _write(tmp_path, text),
                      "--ranks", "3"])
    assert rc == 1
    record = json.loads((out / "stages.json").read_text())
    got = {s["stage"]: s for s in record["stages"]}
    assert [s["stage"] for s in record["stages"]] == ["slow_bg", "writes", "ranks", "skipped",
                                                      "hangs", "fails", "after"]
    assert got["slow_bg"]["status"] == "ok" and got["slow_bg"]["seconds"] >= 1
    assert got["writes"]["status"] == "ok" and got["writes"]["outputs_missing"] == ["never.json"]
    assert got["ranks"]["status"] == "ok", got["ranks"]
    assert got["skipped"]["status"] == "skipped" and got["skipped"]["rc"] is None
    assert got["hangs"]["status"] == "timed_out"
    assert got["fails"]["status"] == "failed" and got["fails"]["rc"] == 3
    assert got["after"]["status"] == "not_run"
    env = json.loads((out / "env.json").read_text())
    assert "torch" in env and "gpus" in env, env
    assert (out / "env.txt").read_text().startswith("gpus")
    assert sorted(p.name for p in out.iterdir()) == ["env.json", "env.txt", "results.tar.gz",
                                                     "stages.json"]
    with tarfile.open(out / "results.tar.gz") as tar:
        names = set(tar.getnames())
        assert {"cpu/writes.log", "cpu/ranks.log", "cpu/hangs.log", "cpu/r.json"} <= names
        ranks_log = tar.extractfile("cpu/ranks.log").read().decode()
        written = tar.extractfile("cpu/r.json").read().decode()
    assert "rank 0" in ranks_log and "rank 1" in ranks_log, ranks_log
    assert written == "3"  # the env value, its placeholder filled from --ranks


def test_a_stopped_runner_leaves_no_stage_running(tmp_path):
    import subprocess
    import time

    py = shlex.quote(sys.executable)
    pid_file = tmp_path / "pid"
    text = f"""
s:
  about: a stage that would outlive the runner
  stages:
    - name: sleeper
      run: "{py} -c 'import os, time; open(\\"{pid_file}\\", \\"w\\").write(str(os.getpid())); time.sleep(600)'"
      timeout: 600
      background: true
"""
    runner = subprocess.Popen([sys.executable, os.path.join(ROOT, "bench", "suites.py"), "s",
                               "--out", str(tmp_path / "out"), "--suites-file", _write(tmp_path, text)],
                              cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (pid_file.exists() and pid_file.read_text()):
            assert time.monotonic() < deadline and runner.poll() is None, "the stage never started"
            time.sleep(0.05)
        pid = int(pid_file.read_text())
        runner.terminate()
        assert runner.wait(timeout=60) != 0
        assert not os.path.exists(f"/proc/{pid}"), "the stage outlived the runner"
    finally:
        if runner.poll() is None:
            runner.kill()
            runner.wait()


def test_budget_cuts_the_running_stage_and_skips_the_rest(tmp_path, monkeypatch):
    import time

    py = shlex.quote(sys.executable)
    text = f"""
s:
  about: more work than the budget
  stages:
    - name: long
      run: "{py} -c 'import time; time.sleep(600)'"
      timeout: 600
    - name: next
      run: "{py} -c 'print(1)'"
      timeout: 60
"""
    monkeypatch.setattr(suites, "MIN_STAGE_S", 1.0)
    suite = suites.load_suites(_write(tmp_path, text))["s"]
    out = str(tmp_path / "out")
    got = suites.run_suite(suite, out, suites.placeholders(out, 2, 0), dict(os.environ),
                           deadline=time.monotonic() + 3)
    assert [(r.stage, r.status) for r in got] == [("long", "timed_out"), ("next", "not_run")]


def _dry_run(capsys, *args: str) -> list[str]:
    assert suites.main([*args, "--dry-run", "--out", "/tmp/o"]) == 0
    return [line.split(" [")[0] for line in capsys.readouterr().out.splitlines()]


def test_stages_selects_and_optional_stages_run_only_when_named(capsys):
    assert _dry_run(capsys, "fp8-kernels") == [
        "fp8-kernels/smoke", "fp8-kernels/tests", "fp8-kernels/tests_mcast_x",
        "fp8-kernels/tests_cluster2", "fp8-kernels/tests_cluster4", "fp8-kernels/tests_one_box",
        "fp8-kernels/tests_wide", "fp8-kernels/bench",
        "fp8-kernels/bench_no_cluster"]
    picked = _dry_run(capsys, "fp8-kernels", "w4a8", "--stages", "smoke,ncu_deepseek_v3_16,variants")
    assert picked == [
        "fp8-kernels/smoke", "fp8-kernels/ncu_deepseek_v3_16", "w4a8/smoke", "w4a8/variants"]
    assert _dry_run(capsys, "fp8-model", "--stages", "breakdown_fp8,run") == [
        "fp8-model/run", "fp8-model/breakdown_fp8"]  # the suite's order, not the option's
    listed = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "suites.py"), "--list"],
                            capture_output=True, text=True, check=True).stdout
    w4a8 = next(line for line in listed.splitlines() if line.startswith("w4a8:"))
    assert "stages: smoke, tests, bench;" in w4a8 and "optional: variants [200 s]" in w4a8


@pytest.mark.parametrize("args, words", [
    (["fp8-kernels", "--stages", "smoke,nope"], ["no stage ['nope']"]),
    (["fp8-kernels", "graphs", "--stages", "smoke"], ["suite 'graphs' has none of ['smoke']"]),
    (["w4a8", "--stages", "smoke", "--extra", "w4a8/bench=--tpe 16"], ["no stage 'bench'"]),
])
def test_a_bad_stage_selection_is_named(capsys, args, words):
    with pytest.raises(SystemExit):
        suites.main([*args, "--dry-run"])
    err = capsys.readouterr().err
    for w in words:
        assert w in err, err


def test_a_selected_stage_needing_one_left_out_runs_without_waiting(tmp_path, caplog):
    text = """
s:
  about: x
  stages:
    - {name: a, run: x, timeout: 5, background: true}
    - {name: b, run: y, timeout: 5, needs: [a]}
"""
    loaded = suites.load_suites(_write(tmp_path, text))
    with caplog.at_level("WARNING", logger="bench.suite_spec"):
        picked = suites.select_stages(loaded, ["b"])
    assert [st.name for st in picked["s"].stages] == ["b"]
    assert "s/b needs ['a']" in caplog.text


@pytest.mark.parametrize("script", ["smoke_fp8_kernels.py", "smoke_fp8_linear.py", "smoke_w4a8.py",
                                    "fp8_quant_summary.py", "ncu_fp8_kernel.py"])
def test_suite_scripts_answer_help(script):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", script), "--help"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "usage:" in proc.stdout, proc.stderr


def test_ncu_command_skips_to_the_second_run():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "ncu_fp8_kernel.py"),
                           "deepseek_v3", "16", "--print"], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": ROOT})
    assert proc.returncode == 0, proc.stderr
    argv = shlex.split(proc.stdout)
    assert argv[:5] == ["ncu", "--clock-control", "none", "-k", "regex:Fp8BlockGemm"]
    # the first FC1, then one run: FC1 + FC2 in 4 chunks of 28 blocks (H = 7168, k = 8, bf16
    # scratch rows, fc2_chunk_blocks), so the second run's FC1 and first chunk are launches 6
    # and 7
    assert argv[argv.index("--launch-skip") + 1] == "6"
    assert argv[argv.index("--launch-count") + 1] == "2"
    assert argv[-3:] == [os.path.join(ROOT, "bench", "profile_fp8_kernel.py"), "deepseek_v3", "16"]


def _quant_record(bitwise: bool = True) -> dict:
    point = {"tokens": 4096, "k": 7168, "ours_graph": {"median_ms": 0.0123},
             "ours_graph_tbps": 3.21, "ours_row": {"median_ms": 0.02},
             "ours_col": {"median_ms": 0.021},
             "reference": {"median_ms": 0.5}, "compiled": None, "floor_ms": 0.011}
    return {"device": "NVIDIA H200", "all_bitwise": bitwise, "compile_seconds": 12.34,
            "compiled_baseline": "torch.compile(dynamic=True, fullgraph=True)",
            "results": [point, {**point, "tokens": 1, "compiled": {"median_ms": 0.3},
                                "floor_ms": None}]}


def test_fp8_quant_summary_prints_the_table_and_fails_when_not_bitwise(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "fp8_quant_summary", os.path.join(ROOT, "bench", "fp8_quant_summary.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    path = tmp_path / "fp8_quant.json"
    path.write_text(json.dumps(_quant_record()))
    assert mod.main([str(path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "NVIDIA H200 all bitwise True compile s 12.3"
    assert out[3] == "4096 7168: 0.0123 (3.21) | 0.0200 | 0.0210 | 0.5000 | - | 0.0110"
    assert out[4].endswith("| 0.3000 | -")
    path.write_text(json.dumps(_quant_record(bitwise=False)))
    assert mod.main([str(path)]) == 1
    broken = _quant_record()
    del broken["results"][0]["ours_row"]
    path.write_text(json.dumps(broken))
    assert mod.main([str(path)]) == 1
    assert mod.main([str(tmp_path / "missing.json")]) == 1
    assert "ours_row" in capsys.readouterr().err


def test_timeout_option_sets_one_stages_limit(tmp_path, capsys):
    py = shlex.quote(sys.executable)
    text = f"""
s:
  about: a stage whose own limit is too long for this run
  stages:
    - name: hangs
      run: "{py} -c 'import time; time.sleep(600)'"
      timeout: 600
    - name: quick
      run: "{py} -c 'print(1)'"
      timeout: 60
"""
    path, out = _write(tmp_path, text), tmp_path / "out"
    assert suites.main(["s", "--suites-file", path, "--out", str(out), "--no-pack",
                        "--timeout", "s/hangs=2"]) == 1
    got = {s["stage"]: s for s in json.loads((out / "stages.json").read_text())["stages"]}
    assert got["hangs"]["status"] == "timed_out" and got["hangs"]["seconds"] < 60
    assert got["quick"]["status"] == "ok"
    for bad, words in (("s/hangs=-1", "positive whole number"), ("s/hangs=1.5", "positive whole"),
                       ("s/nope=5", "no stage 'nope'"), ("hangs=5", "SUITE/STAGE=VALUE")):
        capsys.readouterr()
        with pytest.raises(SystemExit):
            suites.main(["s", "--suites-file", path, "--dry-run", "--timeout", bad])
        assert words in capsys.readouterr().err, bad


def test_if_ok_and_unless_ok_follow_what_earlier_stages_did(tmp_path):
    py = shlex.quote(sys.executable)
    text = f"""
s:
  about: stages run by what earlier ones did
  stages:
    - name: good
      run: "{py} -c 'import time; time.sleep(1)'"
      timeout: 60
      background: true
    - name: bad
      run: "{py} -c 'raise SystemExit(3)'"
      timeout: 60
    - name: after_good
      run: "{py} -c 'print(1)'"
      timeout: 60
      if_ok: [good]
    - name: after_bad
      run: "{py} -c 'print(1)'"
      timeout: 60
      if_ok: [good, bad]
    - name: instead_of_bad
      run: "{py} -c 'print(1)'"
      timeout: 60
      unless_ok: [bad]
    - name: instead_of_good
      run: "{py} -c 'print(1)'"
      timeout: 60
      unless_ok: [good]
"""
    suite = suites.load_suites(_write(tmp_path, text))["s"]
    out = str(tmp_path / "out")
    got = suites.run_suite(suite, out, suites.placeholders(out, 2, 0), dict(os.environ))
    assert [(r.stage, r.status) for r in got] == [
        ("good", "ok"), ("bad", "failed"), ("after_good", "ok"), ("after_bad", "skipped"),
        ("instead_of_bad", "ok"), ("instead_of_good", "skipped")]
