"""``global_mpi_rank`` / ``mpi_world_size``: the MPI world as upstream reads it."""
import os


def _under_mpi() -> bool:
    return any(k in os.environ for k in ("OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK"))


def global_mpi_rank() -> int:
    if not _under_mpi():
        return 0
    from mpi4py import MPI

    return MPI.COMM_WORLD.Get_rank()


def mpi_world_size() -> int:
    if not _under_mpi():
        return 1
    from mpi4py import MPI

    return MPI.COMM_WORLD.Get_size()
