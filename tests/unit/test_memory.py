"""model/memory.py reads what the process holds (RSS on the CPU), within its stated resolution."""
import torch

from tensorrt_llm_dwdp.model.memory import RESOLUTION_BYTES, RSS, dense_model_bytes, in_use


def test_rss_sees_an_allocation_and_its_release():
    before = in_use("cpu")
    assert before.source == RSS
    t = torch.ones(64 << 20, dtype=torch.uint8)          # 64 MiB, every page written
    held = in_use("cpu") - before
    assert abs(held - (64 << 20)) <= RESOLUTION_BYTES[RSS], held
    del t
    assert in_use("cpu") - before <= RESOLUTION_BYTES[RSS]


def test_dense_model_bytes_is_what_its_tensors_hold():
    from tensorrt_llm_dwdp.model.builder import build_model
    from tensorrt_llm_dwdp.model.config import ModelConfig
    from tensorrt_llm_dwdp.model.moe_block import make_moe
    from tensorrt_llm_dwdp.model.presets import get_preset

    config = ModelConfig.from_hf(get_preset("tiny-deepseek-v3", vocab_size=262144))  # ~64 MiB
    with torch.device("meta"):
        model = build_model(config, lambda i: make_moe(config, i, "torch"))
    tensors = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    assert tensors >= 4 * RESOLUTION_BYTES[RSS]
    assert abs(dense_model_bytes(config, "cpu") - tensors) <= RESOLUTION_BYTES[RSS]


def test_vmm_ledger_counts_what_this_process_created_per_device_until_released():
    """The composite view's memory comes from cuMemCreate, which the CUDA allocator never sees:
    the ledger ``in_use`` adds on a GPU holds created handles only (imports are a peer's)."""
    from tensorrt_llm_dwdp.dwdp.vmm import PhysicalLedger, physical_bytes

    ledger = PhysicalLedger()
    ledger.created(0xA, 0, 2 << 20)
    ledger.created(0xB, 0, 4 << 20)
    ledger.created(0xC, 1, 8 << 20)
    assert (ledger.bytes_on(0), ledger.bytes_on(1), ledger.bytes_on(2)) == (6 << 20, 8 << 20, 0)
    ledger.released(0xA)
    ledger.released(0xD)  # an imported handle: never counted, released without effect
    assert ledger.bytes_on(0) == 4 << 20
    assert physical_bytes("cpu") == 0  # CPU pages are in RSS already


def test_vmm_ledger_holds_a_released_allocation_until_its_last_mapping_is_gone():
    """cuMemRelease of a handle that is still mapped (``VmmTransport.close`` while weights and
    composite views map its memory) frees nothing: the bytes count until the last unmap. A
    mapping of an imported handle is never counted."""
    from tensorrt_llm_dwdp.dwdp.vmm import PhysicalLedger

    ledger = PhysicalLedger()
    ledger.created(0xA, 0, 2 << 20)
    ledger.mapped(0x1000, 0xA)            # the owner's mapping
    ledger.mapped(0x9000, 0xA)            # the composite view's second mapping
    ledger.mapped(0x5000, 0xD)            # an imported peer allocation
    assert ledger.bytes_on(0) == 2 << 20  # counted once however often it is mapped
    ledger.released(0xA)
    assert ledger.bytes_on(0) == 2 << 20
    ledger.unmapped(0x1000)
    assert ledger.bytes_on(0) == 2 << 20
    ledger.created(0xA, 0, 4 << 20)       # the driver may hand the released value out again
    assert ledger.bytes_on(0) == 6 << 20
    ledger.unmapped(0x9000)
    ledger.unmapped(0x5000)
    assert ledger.bytes_on(0) == 4 << 20
    ledger.released(0xA)
    assert ledger.bytes_on(0) == 0
