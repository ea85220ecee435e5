"""Distributed Weight Data Parallelism (DWDP) for Mixture-of-Experts inference.

Data-parallel ranks each hold a slice of every MoE layer's experts and prefetch the rest from
peers over CUDA IPC (or POSIX shared memory on CPU ranks) while earlier layers compute.
"""
__version__ = "0.1.0"


def _attach_source_kernels() -> None:
    """Expose the checkout's top-level ``kernels/`` as ``tensorrt_llm_dwdp.kernels``.

    ``kernels/`` has no ``__init__.py`` on purpose: with the repository root on ``sys.path``
    (``python -m pytest`` from the root) a regular package there would shadow Hugging Face's
    ``kernels`` distribution, which transformers 5 imports. As an implicit namespace it only
    ever loses to an installed ``kernels``. An install maps the folder through ``package_dir``;
    a plain source checkout on ``PYTHONPATH`` (as on the device machine) has no such mapping,
    so attach it here as a namespace package. A checkout's own ``kernels/`` wins over an
    editable install of another checkout (a worktree on ``PYTHONPATH`` must not run the main
    tree's kernels).
    """
    import importlib.machinery
    import importlib.util
    import os
    import sys

    name = __name__ + ".kernels"
    if name in sys.modules:
        return
    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels")
    if not os.path.isfile(os.path.join(root, "compile_cache.py")):
        return
    spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
    spec.submodule_search_locations = [root]
    sys.modules[name] = importlib.util.module_from_spec(spec)


_attach_source_kernels()
