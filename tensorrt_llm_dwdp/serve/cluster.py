"""A whole disaggregated deployment on one machine, as processes: for tests, GSM8K and demos.

``LocalCluster`` writes the disaggregated YAML (free loopback ports), starts the context servers
as one DWDP group (``mpirun -np S ... disaggregated_mpi_worker --server_type context``, or S
``serve`` processes meeting through the TCP rendezvous when there is no mpirun), the generation
server(s) with ``serve``, and the router with ``disaggregated``; it waits for every ``/health``
and stops everything (process groups: SIGTERM, then SIGKILL) on ``stop()`` or when leaving its
``with`` block. ``examples/disaggregated/launch_local.sh`` is the shell spelling of the same.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

import yaml

from tensorrt_llm_dwdp.launcher import SAFE_GPU_ENV, choose_launcher, free_port, mpirun_command
from tensorrt_llm_dwdp.serve.launch import wait_for_health

logger = logging.getLogger(__name__)


@dataclass
class _Proc:
    name: str
    popen: subprocess.Popen
    log_path: str
    url: str | None = None


@dataclass
class LocalCluster:
    """``ctx_options`` / ``gen_options`` are LLM-API mappings (``dwdp_config`` on the context
    side makes the context servers one DWDP group of ``num_ctx`` ranks, ``ep_config`` one
    expert-parallel group). ``gen_model`` (default: ``model``) is what the generation servers
    load: a prefill benchmark whose requests end at the first token can give them a tiny one.
    ``router_options``: top-level keys of the disaggregated YAML for the router (``max_retries``)."""

    model: str
    workdir: str
    num_ctx: int = 1
    num_gen: int = 1
    ctx_options: Mapping[str, Any] = field(default_factory=dict)
    gen_options: Mapping[str, Any] = field(default_factory=dict)
    host: str = "127.0.0.1"
    launcher: str = "auto"
    env: Mapping[str, str] = field(default_factory=dict)
    gen_model: str | None = None
    router_options: Mapping[str, Any] = field(default_factory=dict)
    procs: list[_Proc] = field(default_factory=list)
    config_path: str = ""
    router_url: str = ""
    context_urls: list[str] = field(default_factory=list)
    _urls: list[str] = field(default_factory=list)

    def write_config(self) -> dict:
        ports = _distinct_ports(1 + self.num_ctx + self.num_gen)
        models = ({"model": self.model}, {}, {}) if self.gen_model is None else \
            ({}, {"model": self.model}, {"model": self.gen_model})
        config = {
            "hostname": self.host, "port": ports[0], **models[0], "backend": "pytorch",
            **self.router_options,
            "context_servers": {"num_instances": self.num_ctx,
                                "urls": [f"{self.host}:{p}" for p in ports[1:1 + self.num_ctx]],
                                **models[1], **self.ctx_options},
            "generation_servers": {"num_instances": self.num_gen,
                                   "urls": [f"{self.host}:{p}" for p in ports[1 + self.num_ctx:]],
                                   **models[2], **self.gen_options},
        }
        os.makedirs(self.workdir, exist_ok=True)
        self.config_path = os.path.join(self.workdir, "disagg.yaml")
        with open(self.config_path, "w", encoding="utf-8") as f:
            yaml.safe_dump(config, f, sort_keys=False)
        self.router_url = f"http://{self.host}:{ports[0]}"
        return config

    def start(self, timeout_s: float = 180.0) -> str:
        """Start every process and wait for health; returns the router URL."""
        self.spawn(timeout_s)
        self.wait_ready(timeout_s)
        return self.router_url

    def spawn(self, timeout_s: float = 180.0) -> None:
        """Start every process without waiting (``wait_ready`` waits), so several deployments
        can load their models at the same time."""
        config = self.write_config()
        self.context_urls = [f"http://{u}" for u in config["context_servers"]["urls"]]
        gen_urls = [f"http://{u}" for u in config["generation_servers"]["urls"]]
        try:
            self._start_context(config, self.context_urls)
            for i, url in enumerate(gen_urls):
                self._start_generation(i, url)
            self._spawn("router", [*_cli(), "disaggregated", "-c", self.config_path,
                                   "-t", str(int(timeout_s)), "-r", str(int(timeout_s))], self.router_url)
        except BaseException:
            self.stop()
            raise
        self._urls = [*self.context_urls, *gen_urls, self.router_url]

    def wait_ready(self, timeout_s: float = 180.0) -> None:
        """Wait for every server's /health; on failure stop everything, raising with log tails."""
        try:
            self._wait(self._urls, timeout_s)
        except BaseException:
            self.stop()
            raise

    def _start_context(self, config: dict, urls: list[str]) -> None:
        kind = choose_launcher(self.launcher)
        argv = [*_cli(), "disaggregated_mpi_worker", "-c", self.config_path, "--server_type", "context"]
        if kind == "mpirun":
            self._spawn("context-group", mpirun_command(self.num_ctx, argv), None)
            return
        port = str(free_port())
        extra = os.path.join(self.workdir, "ctx_options.yaml")
        with open(extra, "w", encoding="utf-8") as f:
            yaml.safe_dump(dict(self.ctx_options), f)
        for rank, url in enumerate(urls):
            env = {"TRTLLM_DWDP_RANK": str(rank), "TRTLLM_DWDP_MASTER_ADDR": self.host,
                   "TRTLLM_DWDP_MASTER_PORT": port}
            self._spawn(f"context-{rank}", [*_cli(), "serve", self.model, "--host", self.host,
                                             "--port", url.rsplit(":", 1)[1], "--extra_llm_api_options", extra],
                        url, env)

    def _start_generation(self, index: int, url: str) -> None:
        extra = os.path.join(self.workdir, "gen_options.yaml")
        with open(extra, "w", encoding="utf-8") as f:
            yaml.safe_dump(dict(self.gen_options), f)
        self._spawn(f"generation-{index}", [*_cli(), "serve", self.gen_model or self.model, "--host", self.host,
                                             "--port", url.rsplit(":", 1)[1], "--extra_llm_api_options", extra], url)

    def _spawn(self, name: str, argv: list[str], url: str | None, env: Mapping[str, str] | None = None) -> None:
        log_path = os.path.join(self.workdir, f"{name}.log")
        full_env = {**os.environ, **SAFE_GPU_ENV, **self.env, **(env or {})}
        with open(log_path, "wb") as log:
            popen = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=full_env,
                                     start_new_session=True)
        self.procs.append(_Proc(name, popen, log_path, url))
        logger.info("started %s (pid %d): %s", name, popen.pid, " ".join(argv))

    def _wait(self, urls: list[str], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            dead = [p for p in self.procs if p.popen.poll() is not None]
            if dead:
                raise RuntimeError(f"{dead[0].name} exited with {dead[0].popen.returncode} during start-up:\n"
                                   f"{self.log_tail(dead[0].name)}")
            try:
                wait_for_health(urls, timeout_s=min(5.0, max(0.1, deadline - time.monotonic())))
                return
            except TimeoutError as e:
                if time.monotonic() > deadline:
                    tails = "\n".join(f"--- {p.name}\n{self.log_tail(p.name)}" for p in self.procs)
                    raise TimeoutError(f"{e}\n{tails}") from e

    def log_tail(self, name: str, num_bytes: int = 3000) -> str:
        for p in self.procs:
            if p.name == name:
                with open(p.log_path, "rb") as f:
                    data = f.read()
                return data[-num_bytes:].decode(errors="replace")
        raise KeyError(f"no process named {name!r}; have {[p.name for p in self.procs]}")

    def procs_by_name(self, name: str) -> subprocess.Popen:
        for p in self.procs:
            if p.name == name:
                return p.popen
        raise KeyError(f"no process named {name!r}; have {[p.name for p in self.procs]}")

    def kill(self, name: str) -> None:
        """SIGKILL one process group (a worker dying mid-request, for failure tests)."""
        for p in self.procs:
            if p.name == name:
                _signal_group(p.popen, signal.SIGKILL)
                p.popen.wait(timeout=30)
                return
        raise KeyError(f"no process named {name!r}; have {[p.name for p in self.procs]}")

    def stop(self, grace_s: float = 15.0) -> None:
        for p in reversed(self.procs):
            if p.popen.poll() is None:
                _signal_group(p.popen, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for p in reversed(self.procs):
            try:
                p.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.warning("%s ignored SIGTERM for %.0f s; killing it", p.name, grace_s)
                _signal_group(p.popen, signal.SIGKILL)
                p.popen.wait(timeout=30)

    def __enter__(self) -> "LocalCluster":
        if not self.procs:  # not spawned yet
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass
class LocalServer:
    """One aggregated ``serve`` process on a free loopback port (a reference to compare with)."""

    model: str
    workdir: str
    options: Mapping[str, Any] = field(default_factory=dict)
    host: str = "127.0.0.1"
    env: Mapping[str, str] = field(default_factory=dict)
    url: str = ""
    _cluster: LocalCluster | None = None

    def start(self, timeout_s: float = 180.0) -> str:
        self.spawn()
        self.wait_ready(timeout_s)
        return self.url

    def spawn(self) -> None:
        os.makedirs(self.workdir, exist_ok=True)
        extra = os.path.join(self.workdir, "serve_options.yaml")
        with open(extra, "w", encoding="utf-8") as f:
            yaml.safe_dump(dict(self.options), f)
        port = free_port()
        self.url = f"http://{self.host}:{port}"
        # The cluster's process handling (logs, process groups, health wait) for one process.
        self._cluster = LocalCluster(self.model, self.workdir, host=self.host, env=self.env)
        self._cluster._spawn("serve", [*_cli(), "serve", self.model, "--host", self.host, "--port",
                                       str(port), "--extra_llm_api_options", extra], self.url)
        self._cluster._urls = [self.url]

    def wait_ready(self, timeout_s: float = 180.0) -> None:
        self._cluster.wait_ready(timeout_s)

    @property
    def returncode(self) -> int | None:
        return self._cluster.procs[0].popen.returncode if self._cluster is not None else None

    def stop(self) -> None:
        if self._cluster is not None:
            self._cluster.stop()

    def __enter__(self) -> "LocalServer":
        if self._cluster is None:  # not spawned yet
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _cli() -> list[str]:
    return [sys.executable, "-m", "tensorrt_llm_dwdp"]


def _distinct_ports(n: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < n:
        p = free_port()
        if p not in ports:
            ports.append(p)
    return ports


def _signal_group(popen: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(popen.pid, sig)
    except ProcessLookupError:
        pass
