"""Expert weight layouts (moe/layouts.py) wired through the library: the ExpertWeights tag, the
in-place per-expert shuffle at load, the torch backends' exact unshuffle (bitwise the linear
set's output), the cutedsl kernel choice, DWDP registration and agreement, the checkpoint
loader and check-config. The kernels that read the layout are tested in tests/kernels."""
import json

import pytest
import torch

from _thread_group import _in_threads
from tensorrt_llm_dwdp.cli import main as cli_main
from tensorrt_llm_dwdp.dwdp.config import DwdpConfig
from tensorrt_llm_dwdp.dwdp.errors import DwdpMismatchError, DwdpRegistrationError
from tensorrt_llm_dwdp.dwdp.manager import DwdpManager
from tensorrt_llm_dwdp.kernels.sm90.preshuffle import shuffle_scale, shuffle_weight
from tensorrt_llm_dwdp.kernels.testing import preshuffled_experts, random_nvfp4_experts
from tensorrt_llm_dwdp.model.batch import BatchInfo
from tensorrt_llm_dwdp.model.checkpoint import load_model
from tensorrt_llm_dwdp.model.presets import get_preset
from tensorrt_llm_dwdp.model.synthetic import write_synthetic_checkpoint
from tensorrt_llm_dwdp.moe.backends import (BACKEND_LAYOUTS, backend_weight_layout,
                                            to_native_layout_)
from tensorrt_llm_dwdp.moe.backends.torch_grouped import TorchGroupedMoeBackend
from tensorrt_llm_dwdp.moe.backends.torch_ref import TorchMoeBackend
from tensorrt_llm_dwdp.moe.configurable_moe import ConfigurableMoE
from tensorrt_llm_dwdp.moe.layouts import (LINEAR, PRESHUFFLED, SHUFFLED, shuffle_experts_,
                                           to_linear, unshuffle_experts_)
from tensorrt_llm_dwdp.moe.weights import ExpertWeights

E, H, I, K = 6, 128, 64, 3


def _experts(num_experts=E, hidden=H, inter=I, seed=3):
    return random_nvfp4_experts(num_experts, hidden, inter, seed=seed, device="cpu")


def _routing(tokens=40, num_experts=E, k=K, seed=4):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, H, generator=gen).bfloat16()
    ids = torch.argsort(torch.rand(tokens, num_experts, generator=gen), dim=-1)[:, :k].int()
    w = torch.rand(tokens, k, generator=gen) + 0.1
    return x, ids, w / w.sum(-1, keepdim=True)


def _params(weights):
    return {name: ts[0] for name, ts in weights.tensors.items()}


def test_tag_is_validated_and_kept_by_views():
    lin = _experts()
    assert lin.weight_layout == LINEAR
    pre = preshuffled_experts(lin)
    assert pre.weight_layout == PRESHUFFLED == "preshuffled"
    assert pre.split([2, 4]).weight_layout == PRESHUFFLED
    assert ExpertWeights.single(_params(pre), PRESHUFFLED).weight_layout == PRESHUFFLED
    assert ExpertWeights.from_view({n: list(t) for n, t in pre.tensors.items()}, (0,),
                                   PRESHUFFLED).weight_layout == PRESHUFFLED
    with pytest.raises(ValueError, match="unknown weight layout 'tiled'"):
        ExpertWeights.single(_params(lin), "tiled")
    bf16 = {"w3_w1_weight": torch.zeros(2, 2 * I, H, dtype=torch.bfloat16),
            "w2_weight": torch.zeros(2, H, I, dtype=torch.bfloat16)}
    with pytest.raises(ValueError, match="'preshuffled' permutes NVFP4 experts; these are 'bf16'"):
        ExpertWeights.single(bf16, PRESHUFFLED)
    narrow = _params(_experts(hidden=64, inter=32))
    with pytest.raises(ValueError, match="H=64 and I=32 to be multiples of 64"):
        ExpertWeights.single(narrow, PRESHUFFLED)
    with pytest.raises(ValueError, match="already 'preshuffled'"):
        preshuffled_experts(pre)


def test_in_place_shuffle_stays_per_expert_and_unshuffles_exactly():
    lin = _params(_experts())
    tensors = {name: t.clone() for name, t in lin.items()}
    ptrs = {name: t.data_ptr() for name, t in tensors.items()}
    shuffle_experts_(tensors, chunk=4)  # chunks of 4 and 2 experts
    assert {name: t.data_ptr() for name, t in tensors.items()} == ptrs
    for name, t in tensors.items():
        if name not in SHUFFLED:
            assert torch.equal(t, lin[name]), name
            continue
        fn = shuffle_scale if name.endswith("_scale") else shuffle_weight
        for e in range(E):  # expert e's bytes come from expert e alone
            want = fn(lin[name][e], gated=SHUFFLED[name])
            assert torch.equal(t[e].view(torch.uint8), want.view(torch.uint8)), (name, e)
        assert not torch.equal(t.view(torch.uint8), lin[name].view(torch.uint8)), name
        back = to_linear(name, t, PRESHUFFLED)
        assert torch.equal(back.view(torch.uint8), lin[name].view(torch.uint8)), name
    assert to_linear("w2_weight", lin["w2_weight"], LINEAR) is lin["w2_weight"]
    pre = ExpertWeights.single(tensors, PRESHUFFLED)
    for e in (0, E - 1):
        got, want = pre.linear_expert(e), _experts().expert(e)
        for n in want:
            assert torch.equal(got[n].reshape(-1).view(torch.uint8),
                               want[n].reshape(-1).view(torch.uint8)), (n, e)


def test_a_set_off_the_grid_is_refused_before_any_tensor_is_converted():
    """H = 64, I = 32: w3_w1 ([64, 64]) is on the kernel's grid, w2 ([64, 32]) is not. The
    in-place conversions must refuse the set before writing w3_w1 (a half-shuffled set would
    be read as linear by whoever catches the error), and ``to_native_layout_`` names the
    layout's constraint (bf16 experts too) instead of a tensor's dtype."""
    lin = _params(_experts(hidden=64, inter=32))
    for convert in (shuffle_experts_, unshuffle_experts_,
                    lambda t: to_native_layout_(t, "cutedsl")):
        tensors = {name: t.clone() for name, t in lin.items()}
        with pytest.raises(ValueError, match="multiples of 64"):
            convert(tensors)
        for name, t in tensors.items():
            assert torch.equal(t.view(torch.uint8), lin[name].view(torch.uint8)), name
    bf16 = {"w3_w1_weight": torch.randn(2, 2 * I, H).bfloat16(),
            "w2_weight": torch.randn(2, H, I).bfloat16()}
    before = {name: t.clone() for name, t in bf16.items()}
    with pytest.raises(ValueError, match="'preshuffled' permutes NVFP4 experts; these are 'bf16'"):
        to_native_layout_(bf16, "cutedsl")
    assert all(torch.equal(bf16[n], before[n]) for n in bf16)
    assert to_native_layout_(bf16, "torch") == LINEAR  # nothing to permute for a torch backend
    assert all(torch.equal(bf16[n], before[n]) for n in bf16)


@pytest.mark.parametrize("backend", [TorchMoeBackend(), TorchGroupedMoeBackend(chunk_experts=4)],
                         ids=["torch", "torch-grouped"])
def test_torch_backends_on_preshuffled_weights_are_bitwise_linear(backend):
    lin = _experts()
    pre = preshuffled_experts(lin)
    x, ids, w = _routing()
    want = backend.run_experts(x, ids, w, lin)
    assert torch.equal(backend.run_experts(x, ids, w, pre), want)
    if backend.accepts_multi_tensor:
        assert torch.equal(backend.run_experts(x, ids, w, pre.split([1, 3, 2])), want)


def test_configurable_moe_tags_local_weights():
    lin = _experts()
    layers = {}
    for layout, weights in ((LINEAR, lin), (PRESHUFFLED, preshuffled_experts(lin))):
        moe = ConfigurableMoE(E, K, H, I)
        torch.manual_seed(0)
        moe.gate.weight.normal_()
        moe.set_local_weights(_params(weights), layout)
        assert moe.weight_layout == moe.local_weights.weight_layout == layout
        layers[layout] = moe
    x = _routing()[0]
    assert torch.equal(layers[LINEAR](x), layers[PRESHUFFLED](x))


def test_each_backend_names_the_layouts_it_reads():
    assert backend_weight_layout("cutedsl") == backend_weight_layout("cutedsl", "auto") \
        == PRESHUFFLED
    assert backend_weight_layout("torch") == backend_weight_layout("torch-grouped") == LINEAR
    assert backend_weight_layout("torch", PRESHUFFLED) == PRESHUFFLED
    with pytest.raises(ValueError, match="MoE backend 'cutedsl' reads preshuffled expert "
                       "weights, not 'linear'"):
        backend_weight_layout("cutedsl", LINEAR)
    with pytest.raises(ValueError, match="unknown weight layout 'tiled'"):
        backend_weight_layout("torch", "tiled")
    with pytest.raises(ValueError, match="unknown MoE backend 'fast'"):
        backend_weight_layout("fast")
    # the objects agree with the registry (the torch ones import without a GPU)
    assert TorchMoeBackend.weight_layouts == BACKEND_LAYOUTS["torch"]
    assert TorchGroupedMoeBackend.weight_layouts == BACKEND_LAYOUTS["torch-grouped"]


def test_cutedsl_refuses_linear_weights_before_any_launch():
    pytest.importorskip("cutlass")
    from tensorrt_llm_dwdp.moe.backends.cutedsl import CuteDslMoeBackend

    assert CuteDslMoeBackend.weight_layouts == BACKEND_LAYOUTS["cutedsl"]
    x, ids, w = _routing()
    with pytest.raises(ValueError, match="reads preshuffled expert weights, got 'linear'"):
        CuteDslMoeBackend().run_experts(x, ids, w, _experts())


def test_a_layer_refuses_a_layout_its_backend_cannot_read():
    class PreshuffledOnly(TorchMoeBackend):
        weight_layouts = (PRESHUFFLED,)

    moe = ConfigurableMoE(E, K, H, I, backend=PreshuffledOnly())
    lin = _experts()
    with pytest.raises(ValueError, match="MoE layer 0: backend PreshuffledOnly reads "
                       "preshuffled expert weights, got 'linear'"):
        moe.set_local_weights(_params(lin))
    assert moe.local_weights is None
    moe.set_local_weights(_params(preshuffled_experts(lin)), PRESHUFFLED)
    assert moe.weight_layout == PRESHUFFLED


def test_a_cutedsl_layer_takes_fp8_experts_linear():
    """FP8 experts stay linear under every backend (the FP8 kernel reads checkpoint rows), so a
    cutedsl layer whose native NVFP4 layout is preshuffled takes them linear and refuses them
    preshuffled, saying why."""
    pytest.importorskip("cutlass")
    from tensorrt_llm_dwdp.moe.backends.cutedsl import CuteDslMoeBackend
    from tensorrt_llm_dwdp.moe.specs import FP8, allocate_experts

    params = allocate_experts(FP8, E, 128, 128, lambda shape, dt: torch.zeros(shape, dtype=dt))
    moe = ConfigurableMoE(E, K, 128, 128, backend=CuteDslMoeBackend())
    with pytest.raises(ValueError, match="FP8 experts stay linear"):
        moe.set_local_weights(params, PRESHUFFLED)
    moe.set_local_weights(params, LINEAR)
    assert moe.weight_layout == LINEAR and moe.local_weights.quant == FP8


def _config(**kw):
    return DwdpConfig(dwdp_size=2, num_experts_per_worker=2, num_prefetch_experts=1,
                      peer_timeout_s=10.0, **kw)


def test_registration_takes_one_known_layout_per_rank():
    def rank_fn(r, comm):
        with DwdpManager(_config(), 3, comm, "cpu") as mgr:
            assert mgr.weight_layout == LINEAR
            t = {"w": mgr.allocate((2, 4), torch.uint8)}
            if r == 0:
                with pytest.raises(DwdpRegistrationError, match="unknown weight_layout 'tiled'"):
                    mgr.register_layer(0, t, weight_layout="tiled")
            mgr.register_layer(0, t, weight_layout=PRESHUFFLED)
            if r == 0:
                with pytest.raises(DwdpRegistrationError, match="layer 1: weight_layout 'linear' "
                                   "but layer 0 was registered 'preshuffled'"):
                    mgr.register_layer(1, {"w": mgr.allocate((2, 4), torch.uint8)})
            mgr.exchange()
            return mgr.weight_layout

    assert _in_threads(2, rank_fn) == [PRESHUFFLED, PRESHUFFLED]


def test_a_dwdp_layer_refuses_local_weights_in_another_layout_than_its_registration():
    """Rank 0 keeps preshuffled experts (``set_local_weights(.., PRESHUFFLED)``) but registers
    them with ``register_layer``'s default, linear, like rank 1: the exchange agrees on linear,
    so rank 0's views would hold rank 1's linear bytes under its preshuffled tag. Its layer
    refuses to run instead of reading them in the wrong layout."""
    lin = _experts(num_experts=3)
    pre = preshuffled_experts(lin)
    x = _routing(tokens=8, num_experts=3, k=2)[0]

    def rank_fn(r, comm):
        src, tag = (pre, PRESHUFFLED) if r == 0 else (lin, LINEAR)
        with DwdpManager(_config(), 3, comm, "cpu") as mgr:
            lo, hi = mgr.layout.owned_range()
            own = {}
            for name, (t,) in src.tensors.items():
                own[name] = mgr.allocate((hi - lo,) + tuple(t.shape[1:]), t.dtype)
                own[name].copy_(t[lo:hi])
            mgr.register_layer(0, own)
            moe = ConfigurableMoE(3, 2, H, I, dwdp=mgr, layer_idx=0)
            moe.set_local_weights(own, tag)
            mgr.exchange()
            mgr.start_step()
            if r == 0:
                with pytest.raises(RuntimeError, match="layer 0: local experts are 'preshuffled' "
                                   "but the DWDP manager's registered layers are 'linear'"):
                    moe(x)
                return mgr.weight_layout
            moe(x)
            return mgr.weight_layout

    assert _in_threads(2, rank_fn) == [LINEAR, LINEAR]


@pytest.mark.parametrize("view", ["multi", "composite"])
def test_ranks_in_other_layouts_fail_the_exchange_naming_both(view):
    def rank_fn(r, comm):
        with DwdpManager(_config(expert_view=view), 3, comm, "cpu") as mgr:
            mgr.register_layer(0, {"w": mgr.allocate((2, 4), torch.uint8)},
                               weight_layout=PRESHUFFLED if r == 1 else LINEAR)
            mgr.exchange()

    for res in _in_threads(2, rank_fn):
        assert isinstance(res, DwdpMismatchError), res
        assert "rank 1 has weight_layout = 'preshuffled' but rank 0 has 'linear'" in str(res)


def _prefill_logits(model, prompts=([5, 9, 200, 31, 7], [400, 3])):
    cache = model.make_cache(len(prompts), 16, "cpu")
    batch = BatchInfo(tuple(range(len(prompts))), (0,) * len(prompts),
                      tuple(len(p) for p in prompts))
    with torch.inference_mode():
        return model(torch.tensor([t for p in prompts for t in p]), batch, cache)


def test_loader_shuffles_in_place_and_the_model_is_bitwise_linear(tmp_path):
    write_synthetic_checkpoint(tmp_path / "nvfp4", get_preset("tiny-deepseek-v3", num_layers=2),
                               quant="nvfp4", seed=2)
    lin = load_model(tmp_path / "nvfp4")
    pre = load_model(tmp_path / "nvfp4", weight_layout=PRESHUFFLED)
    for layer, moe in pre.moe_modules().items():
        assert moe.weight_layout == PRESHUFFLED
        want = preshuffled_experts(lin.moe_modules()[layer].local_weights)
        for name, (t,) in moe.local_weights.tensors.items():
            assert torch.equal(t.view(torch.uint8), want.tensors[name][0].view(torch.uint8)), name
    assert torch.equal(_prefill_logits(pre), _prefill_logits(lin))
    write_synthetic_checkpoint(tmp_path / "bf16", get_preset("tiny-deepseek-v3", num_layers=2),
                               quant="bf16", seed=2)
    with pytest.raises(ValueError, match="'preshuffled' permutes NVFP4 experts; these are 'bf16'"):
        load_model(tmp_path / "bf16", weight_layout=PRESHUFFLED)
    # a layout the backend cannot read fails before the backend is built or anything is read
    with pytest.raises(ValueError, match="MoE backend 'cutedsl' reads preshuffled"):
        load_model(tmp_path / "nvfp4", moe_backend="cutedsl", weight_layout=LINEAR)


GOOD = """
dwdp_config:
  dwdp_size: 4
  num_experts_per_worker: 100
  num_prefetch_experts: 52
"""


def test_check_config_reports_the_layout(tmp_path, capsys):
    path = tmp_path / "opts.yaml"
    path.write_text(GOOD)
    assert cli_main(["check-config", str(path), "--model", "deepseek-v3", "--json",
                     "--weight-layout", "preshuffled"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["weight_layout"] == "preshuffled"
    assert cli_main(["check-config", str(path), "--model", "deepseek-v3"]) == 0
    assert "expert weights: linear layout for MoE backend torch" in capsys.readouterr().out
    assert cli_main(["check-config", str(path), "--model", "deepseek-v3",
                     "--moe-backend", "cutedsl"]) == 0
    assert "expert weights: preshuffled layout for MoE backend cutedsl" in capsys.readouterr().out
    cutedsl = tmp_path / "cutedsl.yaml"
    cutedsl.write_text(GOOD + "moe_config:\n  backend: CUTEDSL\n")
    assert cli_main(["check-config", str(cutedsl), "--model", "deepseek-v3", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["moe_backend"], report["weight_layout"]) == ("cutedsl", "preshuffled")
    assert cli_main(["check-config", str(cutedsl), "--weight-layout", "linear"]) == 1
    assert "MoE backend 'cutedsl' reads preshuffled" in capsys.readouterr().err
    assert cli_main(["check-config", str(path), "--model", "deepseek-v3",
                     "--weight-layout", "preshuffled"]) == 0
    assert "expert weights: preshuffled layout" in capsys.readouterr().out
    assert cli_main(["check-config", str(path), "--model", "deepseek-v3", "--quant", "bf16",
                     "--weight-layout", "preshuffled"]) == 1
    err = capsys.readouterr().err
    assert "--model deepseek-v3" in err and "permutes NVFP4 experts" in err


def test_fp8_experts_stay_linear_under_every_backend():
    """The preshuffle is NVFP4's: FP8 experts are kept (and read by cutedsl) in checkpoint
    rows, for 'auto' and an explicit 'linear'; asking to shuffle them is refused up front."""
    from tensorrt_llm_dwdp.moe.backends import expert_weight_layout

    for backend in ("torch", "cutedsl", "torch-grouped"):
        for requested in (None, "auto", "linear"):
            assert expert_weight_layout(backend, requested, "fp8", 7168, 2048) == "linear"
    with pytest.raises(ValueError, match="permutes NVFP4 experts"):
        expert_weight_layout("cutedsl", "preshuffled", "fp8", 7168, 2048)
    with pytest.raises(ValueError, match="unknown MoE backend"):
        expert_weight_layout("nope", None, "fp8")
    assert expert_weight_layout("cutedsl", None, "nvfp4", 7168, 2048) == "preshuffled"
