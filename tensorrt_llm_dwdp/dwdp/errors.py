"""Errors of the DWDP runtime: each names the rank, layer, tensor or key that is wrong."""
from __future__ import annotations


class DwdpError(RuntimeError):
    """Base class of DWDP runtime failures."""


class DwdpPeerError(DwdpError):
    """A peer did not answer in time, died, or failed on its side (timeouts, lost store)."""


class DwdpMismatchError(DwdpError):
    """Ranks of one DWDP group disagree (config, expert count, layers, names, dtypes, shapes)."""


class DwdpRegistrationError(ValueError):
    """A tensor handed to the manager cannot be shared (layout, device, memory, dim 0)."""


class DwdpStateError(DwdpError):
    """A manager call came out of protocol order (e.g. weights() before start_step())."""


class DwdpStepRetry(DwdpError):
    """A peer whose memory this step read went down; the manager has already moved its ranges
    to the host store. Run the step again (its outputs may hold bytes of a dying process)."""
