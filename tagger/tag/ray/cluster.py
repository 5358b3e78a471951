"""Start a local Ray or join a cluster, and decide what the model actors run on, before the partition is touched.

``--ray-address ADDR`` joins that cluster; without it ``ray.init()`` joins ``RAY_ADDRESS`` when it is set
(what ``ray job submit`` sets for the job's driver) and otherwise starts a Ray for this process on this
machine. A process already connected to Ray (a notebook, the tests) keeps its connection.

The model actors' device is decided from the cluster's resources, not the driver's: a head node without a
GPU may drive GPU workers. ``--device cuda`` on a cluster with no GPU fails here, at once: Ray would
otherwise keep actors asking for ``num_gpus=1`` pending for ever (it only logs that the request is
infeasible).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

from ..config import TagConfig
from . import RayEngineError

log = logging.getLogger("tagger.runner")  # the name the job's log lines have always shown

# Model threads per CPU actor: a laptop's cores in one actor; a bigger node runs several actors side by side,
# each with a batch of its own in flight, rather than one actor whose threads share each small convolution.
DEFAULT_ACTOR_THREADS = 4


@dataclass
class Cluster:
    """The Ray this run uses: where, what it holds, and whether this process connected to it (and disconnects)."""

    address: str
    owned: bool  # this process called ray.init (a local Ray it started is stopped with it)
    cpus: float
    gpus: float
    seconds: float
    node_cpus: float = 0.0  # the largest node's CPUs: no actor may ask for more (it would never be placed)
    this_machine: bool = False  # every node of the cluster is this machine: its actors run on the driver's CPU
    started: bool = False  # this process started the Ray it uses (no --ray-address / RAY_ADDRESS): it stops its processes

    def facts(self) -> dict[str, Any]:
        return {"address": self.address, "cpus": self.cpus, "gpus": self.gpus, "connect_s": round(self.seconds, 3)}

    def close(self) -> None:
        if not self.owned:
            return
        import ray

        try:
            if self.started:
                _stop_monitor()
            ray.shutdown()
        except Exception as exc:  # never turn a finished run into a failure
            log.warning("ray.shutdown failed: %s", exc)
        self.owned = False


def _stop_monitor() -> None:
    """Kill the autoscaler monitor of a Ray this process started, before ``ray.shutdown``. Ray stops its processes
    one by one and the monitor after the GCS: on SIGTERM it reports its own end to the GCS, which is gone by then,
    so ray.shutdown waits its 1 s grace before a SIGKILL (1.0 of its 1.4 s, measured). A Ray on one machine
    started for one job has nothing to autoscale, and nothing of the monitor's is kept. Ray keeps the handle in
    a private attribute: if it is not where it was, ray.shutdown stops the monitor as before."""
    import ray

    node = getattr(ray._private.worker, "_global_node", None)  # noqa: SLF001 - no public handle on Ray's processes
    for info in (getattr(node, "all_processes", None) or {}).get("monitor", []):
        try:
            if info.process.poll() is None:
                info.process.kill()
                info.process.wait(timeout=1)
        except Exception as exc:  # ray.shutdown still stops it
            log.debug("could not stop Ray's monitor early: %s", exc)


def connect(address: str | None) -> Cluster:
    """``--ray-address``, else ``RAY_ADDRESS``, else a local Ray started for this process."""
    started = time.time()
    import ray

    owned = launched = False
    if address:
        _check_reachable(address)  # named on the command line: it must answer, whatever this process holds
    if not ray.is_initialized():
        where = address or os.environ.get("RAY_ADDRESS") or None
        options: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": True}
        if where is None:
            options["include_dashboard"] = False  # seconds of start-up and a web server nobody asked for
        elif where != address:
            _check_reachable(where)  # RAY_ADDRESS
        handlers = _signal_handlers()
        try:
            ray.init(address=where, **options)
        except (ConnectionError, ValueError, RuntimeError, TimeoutError) as exc:
            raise RayEngineError(f"cannot reach the Ray cluster at {where}: {type(exc).__name__}: {exc}. Check "
                                 "--ray-address / RAY_ADDRESS (the head's GCS address, host:6379), "
                                 "or leave both unset to start a Ray on this machine") from None
        finally:
            _restore(handlers)  # ray.init installs its own SIGTERM handler; the job's (exit 143, shards kept) stays
        owned, launched = True, where is None
    resources = ray.cluster_resources()
    context = ray.get_runtime_context()
    where = getattr(context, "gcs_address", None) or address or "local"
    alive = [node for node in ray.nodes() if node.get("Alive")]
    nodes = [node.get("Resources", {}) for node in alive]
    cluster = Cluster(address=str(where), owned=owned, started=launched, cpus=float(resources.get("CPU", 0)),
                      gpus=float(resources.get("GPU", 0)), seconds=time.time() - started,
                      node_cpus=max((float(node.get("CPU", 0)) for node in nodes), default=0.0),
                      this_machine=bool(alive) and all(node.get("NodeManagerHostname") == socket.gethostname() for node in alive))
    log.info("ray: %s %s (%g CPU, %g GPU) in %.1fs", "connected to" if address or os.environ.get("RAY_ADDRESS") else
             "using" if not owned else "started", cluster.address, cluster.cpus, cluster.gpus, cluster.seconds)
    return cluster


def _check_reachable(address: str, timeout: float = 10.0) -> None:
    """A ``host:port`` nothing answers on fails now: ``ray.init`` would wait for its GCS for many minutes."""
    if address in ("auto", "local") or "://" in address:
        return  # Ray resolves these itself (the local cluster's address file, Ray Client)
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise RayEngineError(f"--ray-address / RAY_ADDRESS {address!r}: expected the head's GCS address, host:port "
                             "(e.g. ray-head:6379)")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        raise RayEngineError(f"cannot reach the Ray cluster at {address} ({type(exc).__name__}: {exc}); check "
                             "--ray-address / RAY_ADDRESS and that the head is up, or leave both unset to start a "
                             "Ray on this machine") from None


def _signal_handlers() -> dict[int, Any]:
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}


def _restore(handlers: dict[int, Any]) -> None:
    for sig, handler in handlers.items():
        if handler is not None:
            signal.signal(sig, handler)


def actor_device(requested: str, cluster: Cluster) -> str:
    """``--device`` against the cluster: ``cuda`` when asked for (and there is a GPU) or, for ``auto``, when
    the cluster has one; ``cpu`` otherwise. Each GPU actor gets its own GPU from Ray (``cuda:N`` means cuda)."""
    if requested.startswith("cuda"):
        if cluster.gpus < 1:
            raise RayEngineError(
                f"--device {requested}: the Ray cluster ({cluster.address}) has no GPU ({cluster.cpus:g} CPU, 0 GPU); "
                "model actors asking for num_gpus=1 would wait for ever. Use --device cpu or auto, or join a cluster "
                "with GPU nodes (--ray-address)"
            )
        if requested != "cuda":
            log.info("--device %s: with --engine ray each model actor gets its own GPU from Ray; using cuda", requested)
        return "cuda"
    if requested == "auto":
        device = "cuda" if cluster.gpus >= 1 else "cpu"
        log.info("device auto: the Ray cluster has %g GPU(s): model actors on %s", cluster.gpus, device)
        return device
    return "cpu"


class RayModelSettings:
    """The model actors' inference: the device decided against the cluster, then the tag job's own resolution
    (:func:`tagger.model.inference.resolve`) against the bundle, before the partition is touched. On a Ray this
    process started on this machine, ``--runtime auto`` measures here as the local engine does (same runtime,
    same precision: the two engines' tables are equal at default options); on a cluster joined elsewhere the
    actors may run on other CPUs, so the order of preference decides instead of this driver's measurement."""

    def __init__(self, config: TagConfig, cluster: Cluster):
        import torch

        from ..model_part import inference_spec

        self.cluster = cluster
        self.device = torch.device(actor_device(config.device, cluster))
        self.threads = config.threads
        self.spec = inference_spec(config, threads=self.actors()["threads"])
        self.inference: Any = None

    def prepare(self, bundle: Any) -> None:
        """Resolved against ``bundle``; for ONNX Runtime/OpenVINO (CPU actors) the export made here (or the cached
        one checked) and a trial batch run, as the local engine does: the actors on this machine then find it
        cached instead of racing to export. PyTorch actors build their network from the bundle alone."""
        from ...model.inference import resolve

        measure = "always" if self.cluster.this_machine else "never"
        self.inference = resolve(self.spec, bundle, device=self.device, measure=measure)
        if self.inference.runtime.name in ("onnx", "openvino"):
            self.inference.prepare()

    @property
    def runtime(self) -> Any:
        return self.inference.runtime

    @property
    def precision(self) -> dict[str, Any]:
        """The Predictor arguments each actor builds its Predictor with."""
        return self.inference.settings

    def actors(self) -> dict[str, Any]:
        """The model actor pool: one actor per GPU of the cluster (``num_gpus=1`` each), else :func:`cpu_actors`."""
        if self.device.type == "cuda":
            count = max(1, int(self.cluster.gpus))
            return {"min_size": count, "max_size": count, "num_gpus": 1, "num_cpus": 1, "threads": 0}
        return cpu_actors(self.cluster.cpus, self.cluster.node_cpus, self.threads)

    def describe(self) -> dict[str, Any]:
        return self.inference.describe()


def cpu_actors(cpus: float, node_cpus: float, threads: int) -> dict[str, Any]:
    """CPU model actors of ``threads`` model threads (0: up to :data:`DEFAULT_ACTOR_THREADS`, no more than the
    largest node has), as many as the cluster's CPUs hold, autoscaled from one.

    An actor reserves one CPU less than it runs threads: decoding a photo costs a fraction of what the model
    costs, so the CPU left free keeps a decode task running beside each actor and the model's threads take
    the time decoding leaves. (Reserving one CPU per thread, as the first version did, left a 2-CPU machine's
    model on one thread while the one decode task mostly waited for it.) ``num_cpus`` is Ray's bookkeeping,
    not a limit: the threads are what use the cores.
    """
    total = max(1, int(cpus))
    node = max(1, int(node_cpus or total))
    per_actor = max(1, min(threads or DEFAULT_ACTOR_THREADS, node))
    reserved = max(1, per_actor - 1)
    # Every actor leaves its decode slot free: actors that took all the CPUs would starve their own input.
    return {"min_size": 1, "max_size": max(1, total // (reserved + 1)), "num_gpus": 0, "num_cpus": reserved,
            "threads": per_actor}

