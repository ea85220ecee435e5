#!/usr/bin/env python3
"""One runner for every device benchmark: named suites of stages (``bench/suites.yaml``).

    python bench/suites.py SUITE [SUITE ...] --out DIR     # run them, in order
    python bench/suites.py A B --out DIR --budget 560      # within one device call's limit
    python bench/suites.py --list                          # the suites and their stages
    python bench/suites.py SUITE --dry-run                 # the commands, resolved, not run
    python bench/suites.py kernels-variants --extra "kernels-variants/variants=--tpe 16,32"
                                                           # more arguments for one stage
    python bench/suites.py fp8-model --stages smoke,tests  # some of a suite's stages
    python bench/suites.py w4a8 --timeout w4a8/tests=180   # another limit for one stage

Each stage is one command under its own time limit (its process group is killed at the limit,
so a hang costs that stage only), optionally on several ranks (mpirun where installed, else
the TCP rendezvous), in the background (joined before a stage that ``needs`` it), or skipped
when a file it would make exists (a checkpoint kept while the machine stays warm), or by what
earlier stages did (``if_ok``: only after they passed, as a variant that could hang until its
tests pass; ``unless_ok``: only when one of them did not), or only when asked for
(``optional``: run when ``--stages`` names it, as a profiler pass). The runner
records per stage its exit code, seconds and which declared outputs exist
(``DIR/stages.json``), what it ran on (``DIR/env.json``: GPU names, torch, CUDA, the CUTLASS
DSL; and ``DIR/env.txt``), and packs the suites' folders (logs and results) into
``DIR/results.tar.gz``: a device call returns at most 8 files. It exits non-zero when a stage
failed.

Commands may use ``{py}`` (this interpreter), ``{out}`` (the suite's folder), ``{work}`` (a
scratch folder kept between calls: checkpoints), ``{root}`` (the repository), ``{ranks}``
(``--ranks``), ``{experts_per_rank}`` (256 / ranks) and ``{gen_device}`` (``cuda:1`` with two
or more GPUs, else ``cuda:0``). Adding a suite is a few lines of YAML; the format is checked on
load and a mistake names the suite, the stage and the key.
"""
from __future__ import annotations

import argparse
import glob
import json
import logging
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from typing import Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as a script: bench/ is on the path, the repository is not
    sys.path.insert(0, ROOT)
from bench.suite_spec import (SUITES_FILE, Stage, Suite, load_suites,  # noqa: E402,F401
                              parse_extra, select_stages, with_timeouts)

WORK_DIR = "/tmp/dwdp_bench"
# NVLink multicast stays off (a program using it can take a shared host's GPUs out of service).
SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
            "NVSHMEM_DISABLE_NVLS": "1", "PYTHONUNBUFFERED": "1"}
WHEEL_SITE = "/tmp/site"
MIN_STAGE_S = 10.0  # under --budget, a stage with less time left than this does not start
logger = logging.getLogger("bench.suites")


@dataclass
class StageResult:
    suite: str
    stage: str
    rc: int | None            # None: skipped (its skip_if file exists) or not run (stopped)
    seconds: float
    status: str               # ok | failed | timed_out | skipped | not_run
    outputs_missing: list[str] = field(default_factory=list)


def placeholders(out: str, ranks: int, gpus: int, work: str = WORK_DIR) -> dict[str, str]:
    return {"py": sys.executable, "out": out, "work": work, "root": ROOT, "ranks": str(ranks),
            "experts_per_rank": str(256 // ranks), "gen_device": "cuda:1" if gpus >= 2 else "cuda:0"}


def resolve(stage: Stage, values: dict[str, str], extra_args: Sequence[str] = ()
            ) -> tuple[list[str], dict[str, str], str | None]:
    """(argv, extra environment, skip_if path) with the placeholders filled and ``extra_args``
    appended to the command; an unknown placeholder raises ValueError naming it."""
    def fill(text: str) -> str:
        try:
            return text.format(**values)
        except KeyError as exc:
            raise ValueError(f"stage {stage.name!r}: unknown placeholder {exc} in {text!r}; "
                             f"known: {sorted(values)}") from None

    argv = shlex.split(fill(stage.run)) + list(extra_args)
    ranks = int(fill(str(stage.ranks))) if stage.ranks is not None else None
    if ranks is not None:  # this runner's --launch mode starts the ranks (mpirun or TCP)
        argv = [sys.executable, os.path.abspath(__file__), "--launch", str(ranks),
                "--launch-timeout", str(stage.timeout), "--"] + argv
    return argv, {k: fill(v) for k, v in stage.env.items()}, (fill(stage.skip_if)
                                                              if stage.skip_if else None)


def prepare_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment every stage gets: the safe NCCL settings, unbuffered output, this
    checkout first on PYTHONPATH, and the CUTLASS DSL from carried wheels (``WHEEL_DIR`` or
    ``.whl/``) when it does not import yet (installed once into /tmp/site)."""
    env = dict(os.environ if base is None else base)
    env.update(SAFE_ENV)
    paths = [ROOT]
    if subprocess.run([sys.executable, "-c", "import cutlass"], capture_output=True,
                      env=env).returncode != 0:
        for wheels in (env.get("WHEEL_DIR", ""), os.path.join(ROOT, ".whl")):
            found = sorted(glob.glob(os.path.join(wheels, "*.whl"))) if wheels else []
            if not found:
                continue
            if not os.path.isdir(os.path.join(WHEEL_SITE, "nvidia_cutlass_dsl")):
                subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index",
                                "--no-deps", "--no-compile", "--no-cache-dir", "--target",
                                WHEEL_SITE, *found], check=True)
            paths += [WHEEL_SITE, os.path.join(WHEEL_SITE, "nvidia_cutlass_dsl", "python_packages")]
            break
    env["PYTHONPATH"] = os.pathsep.join(paths + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


def _start(argv: list[str], log_path: str, env: dict[str, str]) -> tuple[subprocess.Popen, object]:
    log = open(log_path, "w")
    log.write("$ " + shlex.join(argv) + "\n")
    log.flush()
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)  # its own group: the limit kills it all
    return proc, log


def _finish(proc: subprocess.Popen, log, deadline: float) -> tuple[int, bool]:
    """Wait until ``deadline`` (monotonic); past it, kill the stage's process group."""
    try:
        rc = proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        timed_out = False
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        rc, timed_out = proc.wait(), True
    log.close()
    return rc, timed_out


def _kill_group(proc: subprocess.Popen, grace_s: float = 5.0) -> None:
    """SIGTERM the stage's process group, SIGKILL what is left after ``grace_s``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace_s)
            return
        except subprocess.TimeoutExpired:
            continue


def run_suite(suite: Suite, out_dir: str, values: dict[str, str], env: dict[str, str],
              extra: dict[str, list[str]] | None = None, deadline: float = math.inf
              ) -> list[StageResult]:
    """Run every stage of ``suite`` with its logs and outputs under ``out_dir``; ``extra``:
    stage name -> arguments appended to its command; ``deadline`` (monotonic seconds): no stage
    runs past it (a stage starting with less than ``MIN_STAGE_S`` left does not run)."""
    return _SuiteRun(suite, out_dir, env, extra or {}, deadline).run(values)


class _SuiteRun:
    """One suite's stages: foreground ones in order, background ones joined before a stage that
    needs them and at the end; whatever still runs when this is interrupted is killed."""

    def __init__(self, suite: Suite, out_dir: str, env: dict[str, str],
                 extra: dict[str, list[str]], deadline: float) -> None:
        self.suite, self.out_dir, self.env, self.extra = suite, out_dir, env, extra
        self.deadline = deadline
        self.results: dict[str, StageResult] = {}
        self.running: dict[str, tuple[subprocess.Popen, object, float, Stage]] = {}

    def run(self, values: dict[str, str]) -> list[StageResult]:
        os.makedirs(self.out_dir, exist_ok=True)
        try:
            self._stages(values)
        finally:  # interrupted (SIGTERM, Ctrl-C): no stage outlives the runner
            for proc, log, *_ in self.running.values():
                _kill_group(proc)
                log.close()
        return [self.results[s.name] for s in self.suite.stages]

    def _stages(self, values: dict[str, str]) -> None:
        stopped = False
        for stage in self.suite.stages:
            for dep in (*stage.needs, *stage.if_ok, *stage.unless_ok):
                if dep in self.running:
                    self._join(dep)
            argv, extra, skip_if = resolve(stage, values, self.extra.get(stage.name, ()))
            out_of_time = self.deadline - time.monotonic() < MIN_STAGE_S
            passed = {n for n, r in self.results.items() if r.status == "ok"}
            condition_unmet = (not set(stage.if_ok) <= passed
                               or bool(stage.unless_ok) and set(stage.unless_ok) <= passed)
            if stopped or out_of_time or condition_unmet or (skip_if and os.path.exists(skip_if)):
                status = "not_run" if stopped or out_of_time else "skipped"
                self.results[stage.name] = StageResult(self.suite.name, stage.name, None, 0.0, status)
                logger.info("%s/%s: %s%s", self.suite.name, stage.name, status,
                            f" (if_ok {list(stage.if_ok)}, unless_ok {list(stage.unless_ok)})"
                            if condition_unmet and not (stopped or out_of_time) else "")
                continue
            start = time.monotonic()
            proc, log = _start(argv, os.path.join(self.out_dir, f"{stage.name}.log"),
                               {**self.env, **extra})
            self.running[stage.name] = (proc, log, start, stage)
            if not stage.background:
                self._join(stage.name)
                if stage.stop_on_fail and self.results[stage.name].status != "ok":
                    logger.error("%s/%s failed: the suite's later stages do not run",
                                 self.suite.name, stage.name)
                    stopped = True
        for name in list(self.running):
            self._join(name)

    def _join(self, name: str) -> None:
        proc, log, start, stage = self.running[name]
        rc, timed_out = _finish(proc, log, min(start + stage.timeout, self.deadline))
        del self.running[name]  # only once it is gone: an interrupted wait leaves it to kill
        r = _result(self.suite.name, stage, rc, timed_out, time.monotonic() - start, self.out_dir)
        self.results[name] = r
        logger.info("%s/%s: %s in %.0f s", self.suite.name, name, r.status, r.seconds)


def _result(suite: str, stage: Stage, rc: int, timed_out: bool, seconds: float,
            out_dir: str) -> StageResult:
    missing = [o for o in stage.outputs if not os.path.exists(os.path.join(out_dir, o))]
    status = "timed_out" if timed_out else ("ok" if rc == 0 else "failed")
    return StageResult(suite, stage.name, rc, round(seconds, 1), status, missing)


def write_env(out: str, env: dict[str, str]) -> dict:
    """What the run ran on, read in a child process (the runner itself keeps no CUDA context):
    ``env.json`` (GPU names, torch, CUDA, the CUTLASS DSL) and ``env.txt`` (bench/device_report.py)."""
    probe = ("import json, importlib.metadata as m, torch\n"
             "def v(p):\n"
             "    try: return m.version(p)\n"
             "    except m.PackageNotFoundError: return None\n"
             "n = torch.cuda.device_count()\n"
             "print(json.dumps({'gpus': [torch.cuda.get_device_name(i) for i in range(n)],"
             " 'torch': torch.__version__, 'cuda': torch.version.cuda,"
             " 'nvidia-cutlass-dsl': v('nvidia-cutlass-dsl'), 'cuda-bindings': v('cuda-bindings')}))")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=120)
    try:
        record = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        record = {"error": (proc.stderr or proc.stdout)[-2000:]}
    record.update(python=sys.version.split()[0], host=os.uname().nodename,
                  date_utc=time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()))
    with open(os.path.join(out, "env.json"), "w") as f:
        json.dump(record, f, indent=1)
    with open(os.path.join(out, "env.txt"), "w") as f:
        subprocess.run([sys.executable, os.path.join(ROOT, "bench", "device_report.py")],
                       stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT, timeout=120)
    return record


def pack(out: str, folders: list[str]) -> str:
    """Move the suites' folders into ``out/results.tar.gz``; the path."""
    path = os.path.join(out, "results.tar.gz")
    with tarfile.open(path, "w:gz") as tar:
        for name in folders:
            if os.path.isdir(os.path.join(out, name)):
                tar.add(os.path.join(out, name), arcname=name)
    for name in folders:
        shutil.rmtree(os.path.join(out, name), ignore_errors=True)
    return path


def _launch(argv: list[str]) -> int:
    """``--launch N [--launch-timeout S] -- CMD...``: CMD on N ranks (mpirun or TCP), waited."""
    from tensorrt_llm_dwdp.launcher import launch

    ap = argparse.ArgumentParser(prog="suites.py --launch")
    ap.add_argument("--launch", type=int, required=True)
    ap.add_argument("--launch-timeout", type=float, default=1800.0)
    ap.add_argument("cmd", nargs=argparse.REMAINDER)
    args = ap.parse_args(argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        raise SystemExit("--launch needs a command after --")
    res = launch(args.launch, cmd, timeout_s=args.launch_timeout)
    print(f"ranks exited {list(res.returncodes)} ({res.launcher})", flush=True)
    return 0 if res.ok else 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--launch"]:
        return _launch(argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("suites", nargs="*", help="suite names (see --list)")
    ap.add_argument("--out", default=os.path.join(ROOT, "device_out"))
    ap.add_argument("--ranks", type=int, default=2, help="ranks for stages with ranks: '{ranks}'")
    ap.add_argument("--suites-file", default=SUITES_FILE)
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--dry-run", action="store_true", help="print the resolved commands only")
    ap.add_argument("--no-pack", action="store_true", help="leave the suites' folders unpacked")
    ap.add_argument("--budget", type=float, default=math.inf, metavar="SECONDS",
                    help="the whole run's time: no stage runs past it, later ones do not start "
                         "(a device call's limit, less a margin for packing)")
    ap.add_argument("--stages", metavar="A,B", default=None,
                    help="run only these stages of the suites named (optional ones included)")
    ap.add_argument("--timeout", action="append", default=[], metavar="SUITE/STAGE=SECONDS",
                    help="another time limit for one stage (repeatable)")
    ap.add_argument("--extra", action="append", default=[], metavar="SUITE/STAGE=ARGS",
                    help="arguments appended to one stage's command (repeatable)")
    ap.add_argument("--print-env", action="store_true",
                    help="print `export` lines for the stages' environment (bench/device_env.sh)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args.print_env:
        env = prepare_env()
        for key in [*SAFE_ENV, "PYTHONPATH"]:
            print(f"export {key}={shlex.quote(env[key])}")
        return 0
    suites = load_suites(args.suites_file)
    if args.list:
        for s in suites.values():
            default = [st for st in s.stages if not st.optional]
            optional = [f"{st.name} [{st.timeout} s]" for st in s.stages if st.optional]
            print(f"{s.name}: {s.about} (stages: {', '.join(st.name for st in default)}; "
                  f"limits add up to {sum(st.timeout for st in default)} s"
                  + (f"; optional: {', '.join(optional)}" if optional else "") + ")")
        return 0
    unknown = [n for n in args.suites if n not in suites]
    if unknown or not args.suites:
        ap.error(f"unknown suite(s) {unknown}; known: {', '.join(suites)}" if unknown
                 else f"name one or more suites: {', '.join(suites)}")
    if args.ranks < 1:
        ap.error(f"--ranks must be >= 1, got {args.ranks}")
    try:
        chosen = select_stages({n: suites[n] for n in dict.fromkeys(args.suites)},
                               None if args.stages is None
                               else [x.strip() for x in args.stages.split(",") if x.strip()])
        extra = parse_extra(args.extra, chosen)
        chosen = with_timeouts(args.timeout, chosen)
    except ValueError as exc:
        ap.error(str(exc))
    suites = chosen
    out = os.path.abspath(args.out)
    gpus = _gpu_count()
    if args.dry_run:
        for name in args.suites:
            values = placeholders(os.path.join(out, name), args.ranks, gpus)
            for stage in suites[name].stages:
                argv_, env_, _ = resolve(stage, values, extra.get(name, {}).get(stage.name, ()))
                prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in env_.items())
                when = "".join(f" {key} {','.join(names)}" for key, names in
                               (("if_ok", stage.if_ok), ("unless_ok", stage.unless_ok)) if names)
                print(f"{name}/{stage.name} [{stage.timeout} s{when}]: "
                      f"{prefix + ' ' if prefix else ''}{shlex.join(argv_)}")
        return 0
    t0 = time.monotonic()
    deadline = t0 + args.budget
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind: stop running stages
    os.makedirs(out, exist_ok=True)
    os.makedirs(WORK_DIR, exist_ok=True)
    env = prepare_env()
    record = write_env(out, env)
    logger.info("on %s, torch %s", record.get("gpus"), record.get("torch"))
    results: list[StageResult] = []
    for name in args.suites:
        values = placeholders(os.path.join(out, name), args.ranks, gpus)
        results += run_suite(suites[name], os.path.join(out, name), values, env,
                             extra.get(name, {}), deadline)
        _write_stages(out, results, time.monotonic() - t0)
    if not args.no_pack:
        logger.info("packed into %s", pack(out, list(dict.fromkeys(args.suites))))
    failed = [f"{r.suite}/{r.stage} ({r.status})" for r in results
              if r.status not in ("ok", "skipped")]
    for r in results:
        print(f"{r.suite}/{r.stage}: {r.status} rc={r.rc} {r.seconds} s"
              + (f" missing {r.outputs_missing}" if r.outputs_missing else ""))
    if failed:
        print("failed: " + ", ".join(failed))
    return 1 if failed else 0


def _gpu_count() -> int:
    """GPUs visible, from nvidia-smi (the runner keeps no CUDA context of its own)."""
    if shutil.which("nvidia-smi") is None:
        return 0
    proc = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
    return sum(1 for line in proc.stdout.splitlines() if line.startswith("GPU "))


def _write_stages(out: str, results: list[StageResult], seconds: float) -> None:
    with open(os.path.join(out, "stages.json"), "w") as f:
        json.dump({"seconds": round(seconds, 1), "stages": [r.__dict__ for r in results]}, f,
                  indent=1)


if __name__ == "__main__":
    raise SystemExit(main())
