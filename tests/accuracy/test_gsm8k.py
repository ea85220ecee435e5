"""GSM8K runner: vendored data, prompts, answer extraction and scoring; parity through the servers.

The parity run (marked ``accuracy``) starts an aggregated server without DWDP and a disaggregated
deployment whose context servers are a 2-rank DWDP group (mpirun), on a tiny synthetic
checkpoint, and requires every one of 50 answers to match. The accuracy run needs a real
checkpoint: set GSM8K_MODEL (and optionally GSM8K_DWDP_CONFIG).
"""
import json
import os
import subprocess
import sys

import pytest

import gsm8k

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_vendored_data_and_licence():
    problems = gsm8k.load_problems(gsm8k.TEST_FILE)
    shots = gsm8k.load_problems(gsm8k.FEWSHOT_FILE)
    assert len(problems) == 100 and len(shots) == 8
    assert problems[0].target == "18"  # Janet's ducks
    with open(os.path.join(gsm8k.DATA, "LICENSE")) as f:
        assert "MIT License" in f.read()


@pytest.mark.parametrize("text,expected", [
    ("so 5 + 4 = 9\n#### 9", "9"),
    ("#### 1,234", "1234"),
    ("#### -3.50", "-3.5"),
    ("#### $18.", "18"),
    ("The answer is 7. Then The answer is 12.", "12"),
    ("#### 5 and The answer is 6", "5"),
    ("no number here", None),
    ("The answer is $40", "40"),
])
def test_extract_answer(text, expected):
    assert gsm8k.extract_answer(text) == expected


def test_prompt_format_and_scoring():
    shots = gsm8k.load_problems(gsm8k.FEWSHOT_FILE, 2)
    prompt = gsm8k.build_prompt("What is 2+2?", shots)
    assert prompt.count("Question: ") == 3 and prompt.endswith("Question: What is 2+2?\nAnswer:")
    assert "<<" not in prompt and "#### " in prompt
    problems = gsm8k.load_problems(gsm8k.TEST_FILE, 3)
    n, correct = gsm8k.score(["... #### 18", "The answer is 3.", "#### 70001"], problems)
    assert correct == [True, problems[1].target == "3", problems[2].target == "70001"] and n == sum(correct)


def test_threshold_lookup(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "deepseek_v3"}))
    assert gsm8k.threshold_for(str(tmp_path)) == 0.85
    assert gsm8k.threshold_for(str(tmp_path / "missing")) == 0.5


def test_cli_rejects_bad_arguments(tmp_path):
    with pytest.raises(SystemExit):
        gsm8k.parse_args(["--mode", "parity", "--model", "m", "--report", "r", "--num-fewshot", "9"])
    with pytest.raises(SystemExit):
        gsm8k.parse_args(["--mode", "parity", "--model", "m", "--report", "r", "--url", "http://x"])
    args = gsm8k.parse_args(["--mode", "parity", "--model", "m", "--report", "r"])
    assert (args.num_questions, args.num_fewshot, args.concurrency) == (50, 2, 1)


def _tiny_checkpoint(path, quant="nvfp4"):
    preset = "tiny-deepseek-v3-fp8" if quant == "fp8" else "tiny-deepseek-v3"
    subprocess.run([sys.executable, "-m", "tensorrt_llm_dwdp", "make-checkpoint", "--preset",
                    preset, "--num-layers", "2", "--quant", quant, "--out", str(path)],
                   check=True, timeout=300, capture_output=True)
    return str(path)


@pytest.mark.accuracy
@pytest.mark.multirank
@pytest.mark.parametrize("quant", ["nvfp4", "fp8"])
def test_parity_dwdp_on_equals_off_through_servers(tmp_path, quant):
    """fp8: DeepSeek's FP8 format (every projection linear and expert e4m3 with 128x128 scales)
    through the same servers and workers."""
    model = _tiny_checkpoint(tmp_path / "tiny", quant)
    report = tmp_path / "parity.json"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tests", "accuracy", "gsm8k.py"), "--mode", "parity",
         "--model", model, "--dwdp-config", os.path.join(ROOT, "configs", "synthetic_tiny_dwdp2.yaml"),
         "--num-questions", "50", "--num-fewshot", "1", "--max-tokens", "8", "--max-seq-len", "1024",
         "--device", "cpu",
         "--workdir", str(tmp_path / "work"), "--report", str(report)],
        capture_output=True, text=True, timeout=600)
    assert report.exists(), proc.stderr[-3000:]
    result = json.loads(report.read_text())
    assert result["num_questions"] == 50 and result["generated_tokens"] > 50
    assert result["num_mismatches"] == 0, result["mismatches"][:2]
    assert result["passed"] and proc.returncode == 0


@pytest.mark.accuracy
@pytest.mark.skipif(not os.environ.get("GSM8K_MODEL"), reason="set GSM8K_MODEL to a real checkpoint folder")
def test_accuracy_real_checkpoint(tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, "tests", "accuracy", "gsm8k.py"), "--mode", "accuracy",
           "--model", os.environ["GSM8K_MODEL"], "--report", str(tmp_path / "acc.json")]
    if os.environ.get("GSM8K_DWDP_CONFIG"):
        cmd += ["--dwdp-config", os.environ["GSM8K_DWDP_CONFIG"]]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=7200)
    result = json.loads((tmp_path / "acc.json").read_text())
    assert result["passed"], (result["accuracy"], result["threshold"], proc.stderr[-2000:])
