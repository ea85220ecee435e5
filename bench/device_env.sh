# Sourced by the bench/run_device_*.sh scripts, from the repository root: what every device run
# sets up before its first command.
# - NVLink multicast stays off (a program using it can take a shared host's GPUs out of service);
# - unbuffered Python output; PY is the interpreter (PYTHON overrides);
# - the CUTLASS DSL (nvidia-cutlass-dsl) from carried wheels when it does not import yet: WHEEL_DIR,
#   else .whl/ of this checkout or of the checkout a stage copy (.stage/NAME) lives in;
# - this checkout first on PYTHONPATH, so its package and kernels are the ones that run.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
if ! "$PY" -c "import cutlass" >/dev/null 2>&1; then
  for wheels in "${WHEEL_DIR:-}" .whl ../../.whl; do
    [ -n "$wheels" ] && ls "$wheels"/*.whl >/dev/null 2>&1 || continue
    [ -d /tmp/site/nvidia_cutlass_dsl ] || "$PY" -m pip install -q --no-index --no-deps --no-compile \
        --no-cache-dir --target /tmp/site "$wheels"/*.whl
    export PYTHONPATH="/tmp/site:/tmp/site/nvidia_cutlass_dsl/python_packages${PYTHONPATH:+:$PYTHONPATH}"
    break
  done
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
