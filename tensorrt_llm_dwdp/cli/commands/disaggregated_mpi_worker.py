"""``tensorrt_llm_dwdp disaggregated_mpi_worker -c disagg.yaml``: the servers of a disaggregated
deployment as one MPI job, as ``trtllm-serve disaggregated_mpi_worker`` (how upstream launches
DWDP context groups).

World rank r serves the r-th server of the YAML, context servers first. Each context server is
one DWDP rank: the context ranks are cut from the world into their own communicator, and the
DWDP groups are formed inside it (``dwdp_size * num_groups`` must equal the number of context
servers). With ``ep_config`` instead, the context servers are one expert-parallel group
(``ep_size`` = their number), meeting at the first context server's address. Generation servers run without DWDP. ``--server_type context`` (or ``generation``)
runs only that role's servers, so a context group and its generation servers can be started by
separate launchers.
"""
from __future__ import annotations

import argparse
import logging
import sys

NAME = "disaggregated_mpi_worker"
HELP = "Run this MPI rank's context or generation server of a disaggregated YAML."

logger = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from tensorrt_llm_dwdp.serve.options import LOG_LEVELS

    p.add_argument("-c", "--config_file", required=True, help="disaggregated YAML")
    p.add_argument("--server_type", choices=("all", "context", "generation"), default="all",
                   help="which servers this MPI job runs (default: all, context first)")
    p.add_argument("--log_level", dest="serve_log_level", default=None, choices=sorted(LOG_LEVELS))


def main(args: argparse.Namespace) -> int:
    from tensorrt_llm_dwdp.cli.commands.disaggregated import load_config
    from tensorrt_llm_dwdp.run_job import local_rank_from_env
    from tensorrt_llm_dwdp.serve.worker import run_worker_server

    config = load_config(args)
    if config is None:
        return 2
    instances = [i for i in config.instances if args.server_type in ("all", i.role)]
    local_rank = local_rank_from_env()
    _bind_gpu(local_rank)  # before MPI starts, as upstream: CUDA-aware MPI picks up the device
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    rank, size = world.Get_rank(), world.Get_size()
    if size != len(instances):
        print(f"error: {args.config_file} lists {len(instances)} {args.server_type} server(s) but mpirun "
              f"started {size} rank(s); run mpirun -np {len(instances)}", file=sys.stderr)
        return 2
    inst = instances[rank]
    options = config.serve_options(inst)
    # Collective over the world: every rank takes part, the context ranks get their communicator.
    role_comm = world.Split(0 if inst.role == "context" else 1, rank)
    group = rendezvous = None
    try:
        if options.dwdp_config is not None:
            from tensorrt_llm_dwdp.comm import MpiGroupComm

            group = MpiGroupComm(options.dwdp_config, world=role_comm)
        if options.ep_config is not None:
            from tensorrt_llm_dwdp.parallel.group import EpRendezvous

            # The role's rank 0 hosts the EP group's TCP store on its server's own address.
            rendezvous = EpRendezvous.from_mpi(role_comm, inst.hostname)
        logger.info("world rank %d/%d: %s server %d on %s", rank, size, inst.role, inst.index, inst.url)
        run_worker_server(options, local_rank=local_rank, group=group,
                          advertise_host=inst.hostname, ep_rendezvous=rendezvous)
    finally:
        role_comm.Free()
    return 0


def _bind_gpu(local_rank: int) -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
