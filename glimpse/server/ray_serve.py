"""`glimpse serve-ray [MODEL]`: `glimpse serve` with its engine in N Ray Serve replicas behind one ingress.

The ingress is `glimpse serve` itself (same flags, checks, protections and drain; glimpse/server/cli.py);
only the engine differs: `start_replicas` starts (or, with --ray-address, joins) a Ray cluster, deploys
`EngineReplica` (glimpse/server/ray_replica.py) with the affinity router, fixed or autoscaled, and hands
back a `RayEngine` (glimpse/server/ray_ingress.py). Flags are checked before Ray or the model load; on
exit the Serve application and the Ray instance this command started are shut down (never `ray stop`).
Importing this module imports no Ray or torch, so `glimpse --help` stays fast.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import ipaddress
import logging
import signal
import sys

from glimpse.errors import InvalidInputError
from glimpse.server import cli as serve_cli

DEPLOYMENT = "GlimpseEngine"


def add_arguments(p: argparse.ArgumentParser) -> None:
    serve_cli.add_arguments(p)
    # A replica is its own process already, off the ingress's HTTP and preprocessing: its engine runs in a thread
    # unless --engine-process gives each replica an engine-core child process too.
    p.set_defaults(engine_process=False)
    ray = p.add_argument_group("Ray Serve replicas (docs/scaling.md)")
    ray.add_argument("--num-replicas", type=int, default=None, metavar="N",
                     help="engine replicas (default: 1; with autoscaling: the number to start with, default "
                          "--min-replicas)")  # fmt: skip
    ray.add_argument("--min-replicas", type=int, default=None, metavar="N",
                     help="autoscaling (on when this or --max-replicas is given): fewest replicas "
                          "(default: 1)")  # fmt: skip
    ray.add_argument("--max-replicas", type=int, default=None, metavar="N",
                     help="autoscaling: most replicas (default: --num-replicas or --min-replicas, the "
                          "larger)")  # fmt: skip
    ray.add_argument("--target-ongoing-requests", type=float, default=None, metavar="N",
                     help="autoscaling: requests per replica Ray Serve scales towards (default: "
                          "--max-num-seqs)")  # fmt: skip
    ray.add_argument("--replica-cpus", type=float, default=1.0,
                     help="CPUs Ray reserves for each replica; also its torch threads (OMP_NUM_THREADS)")  # fmt: skip
    ray.add_argument("--replica-gpus", type=float, default=0.0, help="GPUs Ray reserves for each replica")
    ray.add_argument("--ray-address", default=None, metavar="ADDRESS",
                     help="join this Ray cluster ('auto', or the head's host:6379) instead of starting Ray on this "
                          "machine (default: start one, with --host as its node address when that is one "
                          "non-loopback IPv4 address)")  # fmt: skip
    ray.add_argument("--ray-app-name", default="glimpse",
                     help="the Serve application's name: one per glimpse serve-ray sharing a cluster")  # fmt: skip
    ray.add_argument("--affinity-prefix-blocks", type=int, default=8, metavar="N",
                     help="a prompt of at least N KV blocks (--block-size tokens each) goes to the replica that "
                          "served its first N blocks before (0: route by media only)")  # fmt: skip
    ray.add_argument("--affinity-max-imbalance", type=int, default=8, metavar="N",
                     help="a request goes to the replica caching its media or prefix unless that replica has more "
                          "than N requests more than the least-loaded one")  # fmt: skip


def replica_plan(args: argparse.Namespace) -> tuple[int, dict | None]:
    """(replicas to start, Serve's autoscaling_config or None) from the flags; InvalidInputError names a bad one."""
    for flag, value, low in (("--num-replicas", args.num_replicas, 1), ("--min-replicas", args.min_replicas, 1),
                             ("--max-replicas", args.max_replicas, 1),
                             ("--affinity-prefix-blocks", args.affinity_prefix_blocks, 0),
                             ("--affinity-max-imbalance", args.affinity_max_imbalance, 0)):  # fmt: skip
        if value is not None and value < low:
            raise InvalidInputError(f"{flag} must be >= {low}, got {value}")
    for flag, value in (("--replica-cpus", args.replica_cpus), ("--replica-gpus", args.replica_gpus)):
        if not value >= 0:
            raise InvalidInputError(f"{flag} must be >= 0, got {value:g}")
    if args.target_ongoing_requests is not None and not args.target_ongoing_requests > 0:
        raise InvalidInputError(f"--target-ongoing-requests must be > 0, got {args.target_ongoing_requests:g}")
    if args.min_replicas is None and args.max_replicas is None:
        if args.target_ongoing_requests is not None:
            raise InvalidInputError("--target-ongoing-requests steers autoscaling; give --min-replicas and/or "
                                    "--max-replicas too (or drop it for a fixed --num-replicas)")  # fmt: skip
        return args.num_replicas or 1, None
    low = args.min_replicas or 1
    high = args.max_replicas if args.max_replicas is not None else max(low, args.num_replicas or low)
    if low > high:
        raise InvalidInputError(f"--min-replicas {low} is above --max-replicas {high}")
    start = args.num_replicas or low
    if not low <= start <= high:
        raise InvalidInputError(f"--num-replicas {start} (the replicas to start with) must lie within --min-replicas "
                                f"{low} and --max-replicas {high}")  # fmt: skip
    return start, {"min_replicas": low, "max_replicas": high, "initial_replicas": start,
                   "target_ongoing_requests": args.target_ongoing_requests or args.max_num_seqs}  # fmt: skip


def _node_ip(host: str) -> str | None:
    """A local Ray's node address: --host's when it names one non-loopback IPv4 address (a machine with several
    networks); otherwise Ray's choice (Ray turns a loopback address into the machine's own, so that its services
    stay reachable from its worker processes)."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    return str(ip) if ip.version == 4 and not (ip.is_unspecified or ip.is_loopback) else None


def start_replicas(args: argparse.Namespace, config, replicas: int, autoscaling: dict | None):
    """Start or join Ray, deploy the engine replicas and wait for them; a RayEngine over them, whose shutdown()
    removes the application (and stops the Serve and Ray this command started)."""
    import ray
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    from glimpse.server.async_engine import EngineStartError
    from glimpse.server.ray_ingress import RayEngine
    from glimpse.server.ray_replica import AffinityRouter, EngineReplica

    quiet = max(logging.WARNING, logging.getLevelName(args.log_level.upper()))
    # Several replicas share a node and Ray gives none of them a set of cores: pinning each one's threads
    # from the node's first core would stack them, so replicas leave their threads floating.
    config = dataclasses.replace(config, cpu_binding="off")
    own_ray = not ray.is_initialized()
    sigterm = signal.getsignal(signal.SIGTERM)
    try:
        if own_ray and args.ray_address is None:
            ray.init(include_dashboard=False, _node_ip_address=_node_ip(args.host), logging_level=quiet)
        elif own_ray:
            ray.init(address=args.ray_address, logging_level=quiet)
    finally:  # ray.init sets its own SIGTERM handler (exit 15); glimpse's stops the start-up cleanly (exit 0)
        signal.signal(signal.SIGTERM, sigterm)
    logging.getLogger("ray.serve").setLevel(quiet)
    local = args.ray_address is None

    def close() -> None:
        with contextlib.suppress(Exception):
            if local:
                serve.shutdown()
            else:  # a shared cluster: remove this application only
                serve.delete(args.ray_app_name)
        if own_ray:
            ray.shutdown()

    try:
        if local:
            have = ray.cluster_resources()
            for flag, key, each in (("--replica-cpus", "CPU", args.replica_cpus),
                                    ("--replica-gpus", "GPU", args.replica_gpus)):  # fmt: skip
                if replicas * each > have.get(key, 0):
                    raise InvalidInputError(f"{replicas} replicas x {flag} {each:g} need {replicas * each:g} {key}s "
                                            f"but this machine's Ray has {have.get(key, 0):g}; lower --num-replicas "
                                            f"or {flag} (fractions such as 0.5 are allowed)")  # fmt: skip
        serve.start(proxy_location="Disabled", logging_config={"log_level": logging.getLevelName(quiet)})
        options = dict(
            name=DEPLOYMENT, ray_actor_options={"num_cpus": args.replica_cpus, "num_gpus": args.replica_gpus},
            max_ongoing_requests=args.max_concurrent_requests, health_check_period_s=2.0,
            graceful_shutdown_timeout_s=max(args.shutdown_timeout, 1.0), max_constructor_retry_count=1,
            logging_config={"log_level": logging.getLevelName(quiet), "enable_access_log": False},
            request_router_config=RequestRouterConfig(request_router_class=AffinityRouter, request_router_kwargs={
                "max_imbalance": args.affinity_max_imbalance}))  # fmt: skip
        if autoscaling is None:
            options["num_replicas"] = replicas
        else:
            options["autoscaling_config"] = autoscaling
        replica = serve.deployment(EngineReplica, **options)
        app = replica.bind(config, args.engine_process, args.max_concurrent_requests, args.log_level)
        try:
            handle = serve.run(app, name=args.ray_app_name, route_prefix=None)
        except RuntimeError as exc:  # a replica that could not even be constructed (Serve's message names why)
            why = str(exc).strip().splitlines()[-1]
            raise EngineStartError(f"the engine replicas failed to start: {why}") from None
        answer = handle.ready.remote().result()  # ("ready", CoreInfo) or ("fatal", ErrorInfo), as the engine core's
        if answer[0] != "ready":
            raise answer[1].rebuild() or EngineStartError(f"the engine replicas failed to start: {answer[1]}")
        return RayEngine(handle, answer[1], args.max_concurrent_requests, args.max_queue, args.affinity_prefix_blocks,
                         close)  # fmt: skip
    except BaseException:
        close()
        raise


def run(args: argparse.Namespace) -> int:
    try:
        replicas, autoscaling = replica_plan(args)
    except InvalidInputError as exc:
        print(f"glimpse: error: {exc}", file=sys.stderr)
        return 2
    if importlib.util.find_spec("ray") is None or importlib.util.find_spec("ray.serve") is None:
        print("glimpse: error: glimpse serve-ray needs Ray Serve; install it with pip install 'glimpse[ray]'",
              file=sys.stderr)  # fmt: skip
        return 1
    return serve_cli.run(args, start_engine=lambda config: start_replicas(args, config, replicas, autoscaling),
                         wrap_app=_wrap_app)  # fmt: skip


def _wrap_app(state, app):
    from glimpse.server.ray_ingress import wrap_app  # imports Ray: only once the engine replicas run

    return wrap_app(state, app)
