#!/usr/bin/env python3
"""GSM8K through the HTTP API: DWDP parity on a synthetic model, or accuracy on a real one.

parity   (synthetic checkpoint): the same few-shot prompts go, one at a time, to an aggregated
         server without DWDP and to a disaggregated deployment whose context servers form a
         DWDP group; every answer (text and token ids) must be identical.
accuracy (real checkpoint): answers through the DWDP deployment (or ``--url``), strict-match
         scored on the final number ("#### N" or "The answer is N"), against the threshold of
         ``gsm8k_config.yaml`` for the checkpoint's ``model_type`` (or ``--threshold``).

Greedy decoding (temperature 0); a JSON report goes to ``--report``; exit status 0 on pass.

    python tests/accuracy/gsm8k.py --mode parity --model /tmp/tiny \\
        --dwdp-config configs/synthetic_tiny_dwdp2.yaml --num-questions 50 --max-tokens 16 \\
        --report out.json
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "data")
TEST_FILE = os.path.join(DATA, "gsm8k_test_first100.jsonl")
FEWSHOT_FILE = os.path.join(DATA, "gsm8k_train_fewshot8.jsonl")
CONFIG_FILE = os.path.join(HERE, "gsm8k_config.yaml")
STOP = ["Question:", "\n\n\n"]

_CALC = re.compile(r"<<[^>]*>>")
_STRICT = re.compile(r"#### \$?(\-?[0-9\.\,]+)")
_ANSWER_IS = re.compile(r"The answer is \$?(\-?[0-9\.\,]+)")


@dataclass(frozen=True)
class Problem:
    question: str
    answer: str      # worked solution ending in "#### N"
    target: str      # N, normalised


def load_problems(path: str, limit: int | None = None) -> list[Problem]:
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if limit is not None and len(out) >= limit:
                break
            row = json.loads(line)
            target = extract_answer(row["answer"])
            if target is None:
                raise ValueError(f"{path}: reference answer without '#### N': {row['answer'][-80:]!r}")
            out.append(Problem(row["question"], row["answer"], target))
    return out


def normalize_number(text: str) -> str:
    """'1,234.50' -> '1234.5', '$7.' -> '7': the form both sides are compared in."""
    t = text.replace(",", "").replace("$", "").rstrip(".")
    try:
        value = float(t)
    except ValueError:
        return t
    return str(int(value)) if value == int(value) else repr(value)


def extract_answer(text: str) -> str | None:
    """The final number of a solution: "#### N" first, else the last "The answer is N"."""
    m = _STRICT.search(text)
    if m is None:
        found = _ANSWER_IS.findall(text)
        if not found:
            return None
        return normalize_number(found[-1])
    return normalize_number(m.group(1))


def build_prompt(question: str, shots: Sequence[Problem]) -> str:
    """lm-eval's GSM8K format, calculator annotations ``<<...>>`` removed from the shots."""
    parts = [f"Question: {s.question}\nAnswer: {_CALC.sub('', s.answer)}\n\n" for s in shots]
    return "".join(parts) + f"Question: {question}\nAnswer:"


def score(outputs: Sequence[str], problems: Sequence[Problem]) -> tuple[int, list[bool]]:
    correct = [extract_answer(o) == p.target for o, p in zip(outputs, problems)]
    return sum(correct), correct


def threshold_for(model: str, config_path: str = CONFIG_FILE) -> float:
    import yaml

    with open(config_path, encoding="utf-8") as f:
        table = yaml.safe_load(f)["accuracy_thresholds"]
    model_type = "default"
    cfg = os.path.join(model, "config.json")
    if os.path.isfile(cfg):
        with open(cfg, encoding="utf-8") as f:
            model_type = json.load(f).get("model_type", "default")
    return float(table.get(model_type, table["default"]))


# ---- client -----------------------------------------------------------------------------------

async def query_all(url: str, prompts: Sequence[str], *, max_tokens: int, concurrency: int,
                    timeout_s: float, desc: str) -> list[dict[str, Any]]:
    """Greedy completions for every prompt (``concurrency`` in flight), with a progress bar."""
    import aiohttp

    sem = asyncio.Semaphore(concurrency)
    results: list[dict[str, Any] | None] = [None] * len(prompts)
    bar = _progress(len(prompts), desc)

    async def one(session, i: int) -> None:
        body = {"prompt": prompts[i], "max_tokens": max_tokens, "temperature": 0, "stop": STOP,
                "return_token_ids": True}
        async with sem:
            async with session.post(url.rstrip("/") + "/v1/completions", json=body) as resp:
                data = await resp.json()
                if resp.status != 200:
                    raise RuntimeError(f"question {i}: HTTP {resp.status}: {data}")
        choice = data["choices"][0]
        results[i] = {"text": choice["text"], "token_ids": choice.get("token_ids"),
                      "finish_reason": choice["finish_reason"]}
        bar.update(1)

    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as session:
            await asyncio.gather(*(one(session, i) for i in range(len(prompts))))
    finally:
        bar.close()
    return results  # type: ignore[return-value]


class _PlainProgress:
    """Stand-in for tqdm where it is not installed: a line every 10 answers."""

    def __init__(self, total: int, desc: str) -> None:
        self.total, self.desc, self.n = total, desc, 0

    def update(self, k: int) -> None:
        self.n += k
        if self.n % 10 == 0 or self.n == self.total:
            print(f"{self.desc}: {self.n}/{self.total}", file=sys.stderr, flush=True)

    def close(self) -> None:
        pass


def _progress(total: int, desc: str):
    try:
        from tqdm import tqdm
    except ImportError:
        return _PlainProgress(total, desc)
    return tqdm(total=total, desc=desc, unit="q", file=sys.stderr)


def run_queries(url: str, prompts: Sequence[str], args: argparse.Namespace, desc: str) -> tuple[list[dict], float]:
    start = time.perf_counter()
    out = asyncio.run(query_all(url, prompts, max_tokens=args.max_tokens, concurrency=args.concurrency,
                                timeout_s=args.request_timeout, desc=desc))
    return out, time.perf_counter() - start


# ---- deployments ------------------------------------------------------------------------------

def _llm_options(args: argparse.Namespace, with_dwdp: bool) -> dict[str, Any]:
    from tensorrt_llm_dwdp.serve.options import load_yaml_mapping

    opts: dict[str, Any] = {}
    if args.dwdp_config:  # every server runs the same MoE backend and limits; only DWDP differs
        opts.update(load_yaml_mapping(args.dwdp_config))
        if not with_dwdp:
            opts.pop("dwdp_config", None)
    opts.update(max_seq_len=args.max_seq_len, max_batch_size=args.max_batch_size)
    if args.device:
        opts["device"] = args.device
    return opts


def _dwdp_size(args: argparse.Namespace) -> int:
    from tensorrt_llm_dwdp.dwdp.config import DwdpConfig

    if not args.dwdp_config:
        return 1
    cfg = DwdpConfig.from_yaml(args.dwdp_config)
    return cfg.world_size


def _cluster(args: argparse.Namespace, workdir: str):
    from tensorrt_llm_dwdp.serve.cluster import LocalCluster

    gen = {**_llm_options(args, with_dwdp=False)}
    if args.gen_device:
        gen["device"] = args.gen_device
    return LocalCluster(args.model, os.path.join(workdir, "dwdp"), num_ctx=_dwdp_size(args), num_gen=1,
                        ctx_options=_llm_options(args, with_dwdp=True), gen_options=gen,
                        launcher=args.launcher)


def run_parity(args: argparse.Namespace, problems: list[Problem], prompts: list[str], workdir: str) -> dict:
    from tensorrt_llm_dwdp.serve.cluster import LocalServer

    baseline = LocalServer(args.model, os.path.join(workdir, "baseline"), _llm_options(args, with_dwdp=False))
    cluster = _cluster(args, workdir)
    baseline.spawn()  # both deployments load their models at the same time
    try:
        cluster.spawn(args.start_timeout)
        baseline.wait_ready(args.start_timeout)
        cluster.wait_ready(args.start_timeout)
    except BaseException:
        baseline.stop()
        raise
    with baseline, cluster:
        ref, ref_s = run_queries(baseline.url, prompts, args, "DWDP off (aggregated)")
        got, got_s = run_queries(cluster.router_url, prompts, args, "DWDP on (disaggregated)")
    mismatches = [
        {"index": i, "question": problems[i].question[:120], "dwdp_off": r["text"], "dwdp_on": g["text"],
         "dwdp_off_ids": r["token_ids"], "dwdp_on_ids": g["token_ids"]}
        for i, (r, g) in enumerate(zip(ref, got)) if (r["text"], r["token_ids"]) != (g["text"], g["token_ids"])
    ]
    return {
        "matches": len(prompts) - len(mismatches),
        "mismatches": mismatches[:10],
        "num_mismatches": len(mismatches),
        "seconds": {"dwdp_off": round(ref_s, 3), "dwdp_on": round(got_s, 3)},
        "generated_tokens": sum(len(g["token_ids"] or []) for g in got),
        "passed": not mismatches and len(prompts) >= args.min_parity_questions,
    }


def run_accuracy(args: argparse.Namespace, problems: list[Problem], prompts: list[str], workdir: str) -> dict:
    threshold = args.threshold if args.threshold is not None else threshold_for(args.model)
    if args.url:
        outputs, secs = run_queries(args.url, prompts, args, "GSM8K")
    else:
        cluster = _cluster(args, workdir)
        cluster.start(args.start_timeout)
        with cluster:
            outputs, secs = run_queries(cluster.router_url, prompts, args, "GSM8K")
    n_correct, correct = score([o["text"] for o in outputs], problems)
    accuracy = n_correct / len(problems)
    return {
        "correct": n_correct, "accuracy": round(accuracy, 4), "threshold": threshold,
        "seconds": round(secs, 3),
        "wrong": [{"index": i, "target": problems[i].target, "answer": outputs[i]["text"][-200:]}
                  for i, ok in enumerate(correct) if not ok][:10],
        "passed": accuracy >= threshold,
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=("parity", "accuracy"), required=True)
    p.add_argument("--model", required=True, help="checkpoint folder")
    p.add_argument("--dwdp-config", default=None, help="LLM-API YAML with dwdp_config (context servers)")
    p.add_argument("--num-questions", type=int, default=None, help="default: 50 (parity), 100 (accuracy)")
    p.add_argument("--num-fewshot", type=int, default=None, help="default: 2 (parity), 8 (accuracy)")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--max-seq-len", type=int, default=4096)
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--concurrency", type=int, default=None, help="default: 1 (parity), 8 (accuracy)")
    p.add_argument("--device", default=None, help="engine device of every server (cpu, cuda)")
    p.add_argument("--gen-device", default=None, help="device of the generation server (e.g. cuda:1)")
    p.add_argument("--launcher", choices=("auto", "mpirun", "tcp"), default="auto")
    p.add_argument("--url", default=None, help="accuracy: query this running server instead")
    p.add_argument("--threshold", type=float, default=None, help="accuracy: override gsm8k_config.yaml")
    p.add_argument("--min-parity-questions", type=int, default=50)
    p.add_argument("--request-timeout", type=float, default=600.0)
    p.add_argument("--start-timeout", type=float, default=600.0, help="server start-up limit (s)")
    p.add_argument("--data", default=TEST_FILE, help="GSM8K test jsonl (default: the vendored 100)")
    p.add_argument("--workdir", default=None, help="logs and YAMLs (default: a temporary folder)")
    p.add_argument("--report", required=True, help="JSON report path")
    args = p.parse_args(argv)
    parity = args.mode == "parity"
    args.num_questions = args.num_questions or (50 if parity else 100)
    args.num_fewshot = 2 if parity and args.num_fewshot is None else (8 if args.num_fewshot is None else args.num_fewshot)
    args.concurrency = args.concurrency or (1 if parity else 8)
    if not 0 <= args.num_fewshot <= 8:
        p.error(f"--num-fewshot must be in [0, 8] (8 examples are vendored), got {args.num_fewshot}")
    if parity and args.url:
        p.error("--url is for accuracy mode; parity starts its own two deployments")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    problems = load_problems(args.data, args.num_questions)
    if len(problems) < args.num_questions:
        print(f"error: {args.data} holds only {len(problems)} problems", file=sys.stderr)
        return 2
    shots = load_problems(FEWSHOT_FILE, args.num_fewshot)
    prompts = [build_prompt(p.question, shots) for p in problems]
    workdir = args.workdir or tempfile.mkdtemp(prefix="gsm8k-")
    run = run_parity if args.mode == "parity" else run_accuracy
    result = run(args, problems, prompts, workdir)
    report = {"mode": args.mode, "model": args.model, "dwdp_config": args.dwdp_config,
              "num_questions": len(problems), "num_fewshot": args.num_fewshot,
              "max_tokens": args.max_tokens, "concurrency": args.concurrency, "workdir": workdir,
              **result}
    os.makedirs(os.path.dirname(os.path.abspath(args.report)), exist_ok=True)
    with open(args.report, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    summary = {k: v for k, v in report.items() if k not in ("mismatches", "wrong")}
    print(json.dumps(summary))
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
    raise SystemExit(main())
