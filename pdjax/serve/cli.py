"""`python -m pdjax.serve`: an OpenAI-compatible endpoint with continuous batching.

Loads the model once (as `python -m pdjax.decode` does), compiles the serving
program once, then serves POST /v1/chat/completions, GET /v1/models and
GET /health with uvicorn on 127.0.0.1 (any other host is an explicit choice).
SIGTERM (or Ctrl+C) stops accepting connections, lets the requests in flight
finish for up to --drain_timeout seconds, and exits 0. With --api-key (or
PDJAX_API_KEY) every path but /health needs the key; GET /metrics is for
Prometheus; one access log line per request goes to stderr.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import signal
import socket
import sys
import time
from typing import Sequence

from pdjax import compile_cache
from pdjax.cli_errors import NON_NEGATIVE_INT, POSITIVE_INT, UserError, buckets_type, cli_main, number_type
from pdjax.decode.cli import QUANTIZE_CHOICES
from pdjax.decode.slots import SCHEDULES
from pdjax.serve.access import ACCESS_LOGGER, check_api_key

API_KEY_ENV = "PDJAX_API_KEY"


def build_parser() -> argparse.ArgumentParser:
    """The command line; model and decoding flags keep `python -m pdjax.decode`'s names."""
    p = argparse.ArgumentParser(
        prog="python -m pdjax.serve",
        description="Serve a planned-diffusion model (or its AR / diffusion baselines) over the OpenAI chat "
        "completions API, with continuous batching: finished requests leave the batch between chunks of decoding "
        "and queued ones take their slots.",
    )
    p.add_argument("--model", default=None,
                   help="a local HF-layout folder or a Hugging Face id (default: the shipped model of --mode, "
                   "pdjax/assets/default_model/{pd,ar,diffusion})")
    p.add_argument("--served_model_name", default=None,
                   help="the model id clients send and GET /v1/models lists (default: --model, or 'pdjax-default')")
    p.add_argument("--mode", choices=("pd", "ar", "diffusion"), default="pd", help="decoding mode (default: pd)")
    p.add_argument("--quantize", choices=QUANTIZE_CHOICES, default=None,
                   help="weight-only int8 (or int4) quantization at load time with qwix, as in pdjax.decode; "
                   "GET /v1/models says which weights are served (default: the checkpoint's float weights)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0 picks a free one)")
    p.add_argument("--api-key", "--api_key", dest="api_key", action="append", type=_api_key_type, default=None,
                   metavar="KEY",
                   help="every path but /health then needs 'Authorization: Bearer KEY'; repeat for several keys. "
                   f"Without it, {API_KEY_ENV} (comma-separated keys) is read; prefer the variable, since a flag is "
                   "visible to other users of the host in its process list (default: no key)")
    p.add_argument("--batch_size", type=POSITIVE_INT, default=8,
                   help="decode slots per replica: requests decoded together (default: 8)")
    p.add_argument("--replicas", type=POSITIVE_INT, default=1,
                   help="data-parallel replicas: one copy of the model, its own --batch_size slots and its own thread "
                   "per local device, all fed from one queue (default: 1). On a CPU the host gets that many devices "
                   "(XLA's --xla_force_host_platform_device_count), which keeps more cores busy")
    p.add_argument("--max_length", type=number_type(int, 2, what=">= 2"), default=None,
                   help="prompt + response tokens per request, as in pdjax.decode (default: the model's "
                   "max_position_embeddings, at most 2048)")
    p.add_argument("--max_queue", type=NON_NEGATIVE_INT, default=1024,
                   help="requests that may wait for a slot; more are answered 429 (default: 1024)")
    p.add_argument("--chunk", type=POSITIVE_INT, default=16,
                   help="decoding loop iterations per device call: the host refills slots and streams text between "
                   "chunks (default: 16)")
    p.add_argument("--batching", choices=("continuous", "static"), default="continuous",
                   help="continuous: a finished request's slot is refilled between chunks; static: new requests wait "
                   "until the whole batch has finished (a baseline for benchmarks) (default: continuous)")
    p.add_argument("--schedule", choices=SCHEDULES, default="auto",
                   help="how one decoding iteration serves the slots: shared makes one model call over every slot at "
                   "the widest slot's window; split gives each prefilling, denoising or committing slot its own call "
                   "and lets the plan steps share one. auto: split on a CPU (compute-bound, where padding a slot to "
                   "its neighbour's window costs more than sharing saves), shared on a TPU or GPU (default: auto)")
    p.add_argument("--max_spans", type=POSITIVE_INT, default=16, help="most promises per plan round (default: 16)")
    p.add_argument("--buckets", type=buckets_type, default=None,
                   help="comma-separated static call widths (default: powers of two)")
    p.add_argument("--drain_timeout", type=number_type(float, 0.0, what=">= 0"), default=30.0,
                   help="seconds that requests in flight may take to finish after SIGTERM (default: 30)")
    p.add_argument("--compilation_cache", default=None,
                   help="a folder for JAX's persistent compilation cache: restarts skip the compile (default: pdjax's "
                   "cache folder, as pdjax.decode)")
    compile_cache.add_flag(p)
    p.add_argument("--log_level", default="warning", choices=("critical", "error", "warning", "info", "debug"),
                   help="uvicorn's log level (default: warning)")
    p.add_argument("--no_access_log", action="store_true",
                   help="do not write the access log (one line per request on stderr: request id, status, latency, "
                   "tokens, model calls)")
    return p


@cli_main("pdjax.serve")
def main(argv: Sequence[str] | None = None) -> int:
    """Run the server until SIGTERM / Ctrl+C; returns 0 after a clean shutdown, 2 on a usage error."""
    args = build_parser().parse_args(argv)
    args.api_key = api_keys(args.api_key)
    _host_devices(args.replicas)
    return _serve(args)


def _api_key_type(text: str) -> str:
    """An argparse type for --api-key: a usable Bearer token."""
    try:
        return check_api_key(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def api_keys(flags: Sequence[str] | None, environ: dict[str, str] | os._Environ = os.environ) -> list[str]:
    """The accepted keys: --api-key's if given, else PDJAX_API_KEY's (comma-separated); UserError on a set but
    empty or unusable variable (an empty one would silently serve without a key)."""
    if flags:
        return list(flags)
    if API_KEY_ENV not in environ:
        return []
    keys = [k.strip() for k in environ[API_KEY_ENV].split(",")]
    if not any(keys):
        raise UserError(f"{API_KEY_ENV} is set but empty; unset it to serve without a key")
    for i, key in enumerate(keys):
        try:
            check_api_key(key)
        except ValueError as e:
            raise UserError(f"{API_KEY_ENV}: key {i + 1} of {len(keys)}: {e}") from None
    return keys


def is_loopback(host: str) -> bool:
    """Whether a bound address is this machine only (127.0.0.0/8, ::1)."""
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return host == "localhost"


def key_notice(host: str, bound: str, keys: int) -> tuple[str, str | None]:
    """The startup line's words on API keys, and a warning when a server reachable from other machines has none
    (`bound`: the address the socket got)."""
    if keys:
        return f"API key required ({keys} key{'s' if keys > 1 else ''})", None
    if is_loopback(bound):
        return "no API key (this machine only)", None
    return "no API key", (f"--host {host} is reachable from other machines and no API key is set: anyone who can "
                          f"reach it can use the model; pass --api-key or set {API_KEY_ENV}")


def _access_log(enabled: bool) -> None:
    """The access log: one line per request on stderr, prefixed like the server's other lines."""
    log = logging.getLogger(ACCESS_LOGGER)
    log.propagate = False
    log.setLevel(logging.INFO if enabled else logging.CRITICAL + 1)
    if enabled and not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("pdjax.serve access: %(asctime)s %(message)s"))
        log.addHandler(handler)


def _host_devices(replicas: int) -> None:
    """Give the CPU platform `replicas` devices when JAX's backends have not started yet and XLA_FLAGS does not
    say otherwise (XLA reads the flags when it creates a backend).

    The flag applies to the host (CPU) platform only, so on a TPU or GPU host it changes nothing there.
    """
    import os

    from jax._src import xla_bridge

    flags = os.environ.get("XLA_FLAGS", "")
    started = getattr(xla_bridge, "backends_are_initialized", lambda: True)()
    if replicas > 1 and "xla_force_host_platform_device_count" not in flags and not started:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={replicas}".strip()


def _serve(args: argparse.Namespace) -> int:
    from pdjax.decode.cli import build, resolve_model

    if args.compilation_cache:  # another folder than pdjax's default, shared with decode, train and eval
        import jax

        jax.config.update("jax_compilation_cache_dir", args.compilation_cache)
    compile_cache.enable(disabled=args.no_compilation_cache)
    import uvicorn

    from pdjax.model.quantize import weight_format
    from pdjax.serve.app import create_app
    from pdjax.serve.engine import Engine, Replicas

    t0 = time.perf_counter()
    build_args = argparse.Namespace(model=args.model, mode=args.mode, max_length=args.max_length,
                                    batch_size=args.batch_size, max_spans=args.max_spans, buckets=args.buckets,
                                    profile=False, quantize=args.quantize)
    path = resolve_model(args.model, args.mode)
    if args.replicas == 1:
        decoder, tokenizer, _ = build(build_args, path)
        engine: Engine | Replicas = Engine(decoder, chunk=args.chunk, max_queue=args.max_queue,
                                           static=args.batching == "static", schedule=args.schedule)
    else:
        import jax

        devices = jax.local_devices()
        if args.replicas > len(devices):
            raise UserError(f"--replicas {args.replicas} needs {args.replicas} local devices; this host has "
                            f"{len(devices)} ({devices[0].platform}). On a CPU, start with "
                            f"XLA_FLAGS=--xla_force_host_platform_device_count={args.replicas} (or without XLA_FLAGS "
                            f"set: pdjax.serve then sets it)")
        decoders = []
        for device in devices[: args.replicas]:
            with jax.default_device(device):
                decoder, tokenizer, _ = build(argparse.Namespace(**{**vars(build_args), "device": device}), path)
            decoders.append(decoder)
        engine = Replicas(decoders, devices[: args.replicas], chunk=args.chunk, max_queue=args.max_queue,
                          static=args.batching == "static", schedule=args.schedule)
    args.max_length = engine.config.max_length  # the model's default when not given
    name = args.served_model_name or args.model or "pdjax-default"
    weights = weight_format(engine.decoder.forward.params)
    print(f"pdjax.serve: loaded {name} ({args.mode}, {weights} weights) in {time.perf_counter() - t0:.1f} s; "
          "compiling ...", flush=True)
    seconds = engine.warmup()
    replicas = f"{args.replicas} replicas x " if args.replicas > 1 else ""
    print(f"pdjax.serve: compiled the serving program in {seconds:.1f} s ({engine.slots.compiled_programs()} "
          f"program{' per replica' if args.replicas > 1 else ''}; {args.batching} batches of {replicas}"
          f"{args.batch_size}, max_length {args.max_length}, chunk {args.chunk}, schedule {engine.slots.schedule})",
          flush=True)

    try:
        sock = socket.create_server((args.host, args.port), family=_family(args.host))
    except OSError as e:
        raise UserError(f"cannot listen on {args.host}:{args.port}: {e}") from None
    port = sock.getsockname()[1]
    app = create_app(engine, tokenizer, model_name=name, drain_timeout=max(1.0, args.drain_timeout),
                     api_keys=args.api_key)
    import prometheus_client

    prometheus_client.disable_created_metrics()  # this process is the server: no *_created series in /metrics
    # our access log replaces uvicorn's: it carries the request id, tokens and model calls
    config = uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=args.drain_timeout,
                            access_log=False)
    _access_log(not args.no_access_log)
    server = uvicorn.Server(config)
    # uvicorn handles SIGTERM/SIGINT (stop accepting, drain) and re-raises the signal after shutting down:
    # these handlers receive it, so that a drained server exits 0
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    host = f"[{args.host}]" if ":" in args.host else args.host
    auth, warning = key_notice(args.host, sock.getsockname()[0], len(args.api_key))
    print(f"pdjax.serve: serving http://{host}:{port}/v1 (POST /v1/chat/completions, GET /v1/models, "
          f"GET /metrics, GET /health); model {name!r}; {auth}", flush=True)
    if warning:
        print(f"pdjax.serve: warning: {warning}", file=sys.stderr, flush=True)
    server.run(sockets=[sock])
    print(f"pdjax.serve: stopped ({engine.stats()['completed']} requests answered)", flush=True)
    return 0


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET
