"""Distributed Weight Data Parallelism (DWDP) for Mixture-of-Experts inference.

Data-parallel ranks each hold a slice of every MoE layer's experts and prefetch the rest from
peers over CUDA IPC (or POSIX shared memory on CPU ranks) while earlier layers compute.
"""
__version__ = "0.1.0"


def _attach_source_kernels() -> None:
    """Expose the checkout's top-level ``kernels/`` as ``tensorrt_llm_dwdp.kernels``.

    An install maps that folder through ``package_dir``; a plain source checkout on
    ``PYTHONPATH`` (as on the device machine) has no such mapping, so attach it here. A
    checkout's own ``kernels/`` wins over an editable install of another checkout (a worktree
    on ``PYTHONPATH`` must not run the main tree's kernels).
    """
    import importlib.util
    import os
    import sys

    name = __name__ + ".kernels"
    if name in sys.modules:
        return
    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels")
    init = os.path.join(root, "__init__.py")
    if not os.path.isfile(os.path.join(root, "compile_cache.py")):
        return
    spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[root])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)


_attach_source_kernels()
