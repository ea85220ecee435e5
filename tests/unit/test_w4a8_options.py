"""moe_config.nvfp4_compute: W4A16 (bf16, the default) or W4A8 (fp8) for NVFP4 experts, checked
where the options are read and again where the backend is made, before anything loads."""
import pytest

from tensorrt_llm_dwdp.moe.backends import check_nvfp4_compute, get_backend
from tensorrt_llm_dwdp.serve.options import OptionsError, ServeOptions, merge_options

BASE = ServeOptions(model="m")


def test_default_is_bf16_and_fp8_selects_w4a8_on_cutedsl():
    assert merge_options(BASE, {"moe_config": {"backend": "CUTEDSL"}}).nvfp4_compute == "bf16"
    opts = merge_options(BASE, {"moe_config": {"backend": "CUTEDSL", "nvfp4_compute": "fp8"}})
    assert (opts.moe_backend, opts.nvfp4_compute) == ("cutedsl", "fp8")


@pytest.mark.parametrize("section,match", [
    ({"backend": "TORCH", "nvfp4_compute": "fp8"}, "CUTEDSL MoE backend only"),
    ({"backend": "CUTEDSL", "nvfp4_compute": "fp4"}, "choose 'bf16'"),
])
def test_bad_choices_are_refused_when_read(section, match):
    with pytest.raises(OptionsError, match=match):
        merge_options(BASE, {"moe_config": section})


def test_backend_factory_checks_and_passes_it():
    check_nvfp4_compute("torch", "bf16")
    with pytest.raises(ValueError, match="cutedsl MoE backend only"):
        get_backend("torch", "fp8")
    with pytest.raises(ValueError, match="must be one of"):
        check_nvfp4_compute("cutedsl", "e4m3")
    pytest.importorskip("cutlass", reason="the cutedsl backend needs nvidia-cutlass-dsl")
    from tensorrt_llm_dwdp.moe.backends.cutedsl import CuteDslMoeBackend, create_backend

    assert create_backend(nvfp4_compute="fp8").compute == "e4m3"
    assert create_backend().compute == "bf16"
    with pytest.raises(ValueError, match="nvfp4_compute must be one of"):
        CuteDslMoeBackend(nvfp4_compute="int4")


def test_load_model_refuses_fp8_compute_off_cutedsl_before_reading(tmp_path):
    from tensorrt_llm_dwdp.model.checkpoint import load_model

    with pytest.raises(ValueError, match="cutedsl MoE backend only"):
        load_model(tmp_path / "does-not-exist", moe_backend="torch", nvfp4_compute="fp8")


def test_capturable_formats_per_backend():
    """What the executor may capture in decode graphs: the cutedsl kernels over NVFP4 and FP8
    experts (both replayed bitwise on a GPU, ``tests/gpu/test_cuda_graphs_gpu.py``), nothing of
    the host-driven torch reference; bf16 experts have no cutedsl kernel."""
    from tensorrt_llm_dwdp.moe.backends import graph_safe

    assert not graph_safe(get_backend("torch"), "fp8")
    pytest.importorskip("cutlass", reason="the cutedsl backend needs nvidia-cutlass-dsl")
    from tensorrt_llm_dwdp.moe.backends.cutedsl import create_backend

    backend = create_backend()
    assert graph_safe(backend, "nvfp4") and graph_safe(backend, "fp8")
    assert not graph_safe(backend, "bf16")
