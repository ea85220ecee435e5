#!/usr/bin/env bash
# One rank of a disaggregated deployment, launched by mpirun or srun (the counterpart of
# upstream's start_worker_dwdp.sh, which runs `trtllm-serve disaggregated_mpi_worker`):
#
#   mpirun -np 4 examples/disaggregated/start_worker_dwdp.sh disagg.yaml context logs/
#   srun --mpi=pmix --ntasks=8 --ntasks-per-node=8 start_worker_dwdp.sh disagg.yaml context logs/
#
# Arguments: CONFIG (disaggregated YAML), SERVER_TYPE (all | context | generation; default all),
# LOG_DIR (optional: one log per rank). World rank r serves the r-th server of that type in the
# YAML, context servers first; the context ranks form the DWDP group(s) of its dwdp_config.
#
# GPU: each rank computes on GPU (local rank % GPUs on the node). CUDA_VISIBLE_DEVICES is left
# alone on purpose: a DWDP rank opens its peers' expert memory through CUDA IPC, which needs the
# peer GPUs visible. `device: cpu` in the YAML runs the ranks on the CPU (shared-memory transport).
set -euo pipefail

config=${1:?usage: start_worker_dwdp.sh CONFIG [SERVER_TYPE] [LOG_DIR]}
server_type=${2:-all}
log_dir=${3:-}

rank=${OMPI_COMM_WORLD_RANK:-${PMIX_RANK:-${SLURM_PROCID:-0}}}
local_rank=${OMPI_COMM_WORLD_LOCAL_RANK:-${MPI_LOCALRANKID:-${SLURM_LOCALID:-0}}}
export OMPI_COMM_WORLD_LOCAL_RANK=${local_rank}

# NVLink multicast / NVLS stays off (DWDP needs plain peer copies; the shared GPU hosts forbid it).
export NCCL_NVLS_ENABLE=0
export TORCH_SYMM_MEM_DISABLE_MULTICAST=1
export NVSHMEM_DISABLE_NVLS=1

python_bin=${PYTHON:-python3}
cmd=("${python_bin}" -m tensorrt_llm_dwdp)
if [ -n "${DWDP_LOG_LEVEL:-}" ]; then
    cmd+=(--log-level "${DWDP_LOG_LEVEL}")
fi
cmd+=(disaggregated_mpi_worker -c "${config}" --server_type "${server_type}")

echo "start_worker_dwdp: rank=${rank} local_rank=${local_rank} host=$(hostname) type=${server_type}" >&2
if [ -n "${log_dir}" ]; then
    mkdir -p "${log_dir}"
    exec "${cmd[@]}" >"${log_dir}/worker_${server_type}_rank${rank}.log" 2>&1
fi
exec "${cmd[@]}"
