"""`tuneforge serve`: the verb, its options, and a server in a background thread (tests, benchmarks).

    tuneforge serve --model builtin:smollm2-135m-instruct
    tuneforge serve --model /tmp/tiny --adapter math=outputs/math chat=outputs/chat --api-key sk-local
    tuneforge serve --model outputs/merged --backend vllm          # vLLM's own server (GPU, vllm installed)
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass
from typing import Literal

from tuneforge.configs.typed import opt
from tuneforge.errors import UserError

API_KEY_ENV = "TUNEFORGE_API_KEY"


@dataclass
class ServeArgs:
    model: str = opt("builtin:smollm2-135m-instruct", "Base model: a local folder, a hub id or builtin:<name>. "
                                                      "Served under its folder/hub name (see --served-model-name).")
    adapter: list[str] = opt(factory=list, help="Adapters to serve next to the base, as NAME=DIR (several after one "
                                                "--adapter). Clients pick one with `model: NAME`.")
    host: str = opt("127.0.0.1", "Address to bind. The default is this machine only; 0.0.0.0 exposes the server "
                                 "to the network (use --api-key then).")
    port: int = opt(8000, "TCP port.")
    api_key: str | None = opt(None, f"Require `Authorization: Bearer KEY` on /v1 (env {API_KEY_ENV} also works).")
    backend: Literal["tuneforge", "vllm"] = opt("tuneforge", "tuneforge: this package's engine (CPU or GPU). vllm: "
                                                             "exec vLLM's OpenAI server (needs vllm and a GPU).")
    device: str = opt("auto", "Where the model runs: auto (the GPU when there is one), cpu, cuda or cuda:N.")
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = opt(
        "auto", "Precision of the served weights. auto: bf16 on a GPU that computes it, fp32 on CPU. On CPUs with "
                "AVX512-BF16/AMX, bf16 decoded a batch 1.5x faster (bench/RESULTS.md) with replies that can differ "
                "slightly from fp32's.")
    max_batch_size: int = opt(16, "Requests decoded together; more wait and join as slots free up.")
    max_body_bytes: int = opt(4 * 1024 * 1024, "Largest request body accepted (413 above).")
    max_tokens_limit: int = opt(4096, "Largest max_tokens a request may ask for (400 above); also the default "
                                      "when a chat request gives none.")
    max_n: int = opt(16, "Largest `n` (choices per request) accepted.")
    served_model_name: str | None = opt(None, "The id of the base model in /v1/models (default: folder or hub "
                                              "name).")
    tool_parser: Literal["auto", "hermes", "llama3", "mistral", "none"] = opt(
        "auto", "How tool calls are read from replies; auto picks from the chat template.")
    chat_template: str | None = opt(None, "Override the chat template (chatml, llama3, qwen, default or a .jinja) "
                                          "for the base and every adapter. Default: each adapter's requests use the "
                                          "template its run trained with (model.chat_template), the base its own.")
    trust_remote_code: bool = opt(False, "Run Python code shipped with the model (only for sources you trust).")
    allow_pickle: bool = opt(False, "Allow pickle (.bin/.pt) weights, which can execute code when loaded.")
    vllm_args: list[str] = opt(factory=list, help="Extra arguments passed to vLLM's server as they are "
                                                  "(--backend vllm only), e.g. --vllm-args=--gpu-memory-utilization=0.8.")
    log_level: str = opt("info", "uvicorn's log level (debug, info, warning, error).")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def resolve_api_key(args: ServeArgs) -> str | None:
    return args.api_key or os.environ.get(API_KEY_ENV) or None


def build_state(args: ServeArgs):
    """Load the model and adapters, build the engine: everything but the HTTP server."""
    from tuneforge.configs.schema import ModelConfig
    from tuneforge.inference import Engine
    from tuneforge.inference.serve.app import ServerState
    from tuneforge.inference.serve.completions import Limits
    from tuneforge.inference.serve.models import load_served, parse_adapter_specs
    from tuneforge.inference.serve.tools import tool_family
    from tuneforge.models.loading import inference_placement

    for name in ("max_batch_size", "max_body_bytes", "max_tokens_limit", "max_n"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} is {getattr(args, name)}; it must be at least 1.")
    model_cfg = ModelConfig(name_or_path=args.model, trust_remote_code=args.trust_remote_code,
                            allow_pickle=args.allow_pickle, chat_template=args.chat_template)
    placement = inference_placement(args.device, args.dtype)
    served = load_served(model_cfg, parse_adapter_specs(args.adapter), args.served_model_name, placement)
    engine = Engine(served.model, served.tokenizer, max_batch_size=args.max_batch_size)
    family = None if args.tool_parser == "none" else (
        tool_family(getattr(served.tokenizer, "chat_template", None)) if args.tool_parser == "auto"
        else args.tool_parser)
    families = {name: tool_family(t) for name, t in served.templates.items()} if args.tool_parser == "auto" else {}
    limits = Limits(max_tokens=args.max_tokens_limit, max_n=args.max_n, max_body_bytes=args.max_body_bytes)
    return ServerState(engine=engine, served=served, limits=limits, api_key=resolve_api_key(args),
                       tool_family=family, tool_families=families)


def check_port_free(host: str, port: int) -> None:
    """Refuse a port out of range, a host that is not an address of this machine, or a port another program holds,
    by binding it once as uvicorn will (SO_REUSEADDR, as uvicorn sets it)."""
    if not 1 <= port <= 65535:
        raise UserError(f"--port {port} is not a TCP port to serve on: give one from 1 to 65535 (e.g. 8000).")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET  # as uvicorn picks it (`localhost`: IPv4)
    try:
        infos = socket.getaddrinfo(host, port, family=family, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise UserError(f"--host {host} is not an address of this machine ({e.strerror}): give an address such as "
                        f"127.0.0.1 (this machine only) or 0.0.0.0 (every interface).") from None
    address = infos[0][4]
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as e:
            taken = e.errno == errno.EADDRINUSE
            why = "is in use (another `tuneforge serve`?)" if taken else f"cannot be bound ({e.strerror})"
            raise UserError(f"Port {port} on {host} {why}: stop what holds it, or pass another --port.") from None


def serve_cli(args: ServeArgs) -> int:
    if args.backend == "vllm":
        from tuneforge.inference.serve.vllm import run_vllm

        return run_vllm(args)
    import uvicorn

    from tuneforge.inference.serve.app import create_app

    check_port_free(args.host, args.port)  # before the model loads: a taken port is said at once, not a minute on
    state = build_state(args)
    if not is_loopback(args.host) and not state.api_key:
        print(f"warning: serving on {args.host} without an API key: anyone who can reach this port can use the "
              f"model. Pass --api-key (or set {API_KEY_ENV}).", file=sys.stderr)
    print(f"Serving {', '.join(state.served.ids())} at http://{args.host}:{args.port}/v1", flush=True)
    if state.served.built_in:
        print(f"note: adapter `{state.served.ids()[0]}` is built into the model (a TuneForge adapter cannot be switched "
              f"off per request): every request gets it, and the base model alone is not served.", flush=True)
    for note in state.served.template_notes():
        print(note, flush=True)
    uvicorn.run(create_app(state), host=args.host, port=args.port, log_level=args.log_level)
    return 0


class ServerThread:
    """A uvicorn server on a free loopback port in a daemon thread: `with ServerThread(app) as url: ...`."""

    def __init__(self, app, host: str = "127.0.0.1", log_level: str = "warning"):
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))  # bound before the thread starts: no race for the port
        self.url = f"http://{host}:{self.sock.getsockname()[1]}"
        config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=2, backlog=4096)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()
