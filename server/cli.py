"""``loraplex``: the product's command line. One subcommand per feature; each is a thin shell
over a library function, and user errors print one line on stderr with exit code 2.

Subcommands: ``serve`` (the HTTP server), ``export-onnx`` (base + adapters -> onnxruntime-genai
model), ``bench``, ``keys``, ``base`` (resolve / materialize the base and print its
fingerprint) and ``adapters`` (list and inspect the adapter store; ``adapters mix`` writes a
named weighted mix into it, docs/mixes.md). ``loraplex --help`` lists
what exists.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from loraplex.server import __version__
from loraplex.server.errors import LoraplexError


def _cmd_base(args: argparse.Namespace) -> int:
    from loraplex.server.basemodel import resolve_base

    ref = resolve_base(args.model_name_or_path)
    info = {"id": ref.id, "path": str(ref.path), "fingerprint": ref.fingerprint}
    print(json.dumps(info, indent=2))
    return 0


def _adapter_summary(store, name: str) -> dict:
    from loraplex.server.store import read_lora_spec, read_manifest

    folder = store.existing(name)
    summary: dict = {"name": name, "path": str(folder)}
    try:
        spec = read_lora_spec(folder)
        summary.update(rank=spec.max_rank, alpha=spec.lora_alpha, target_modules=list(spec.target_modules))
        manifest = read_manifest(folder)
        if manifest is not None:
            summary.update(
                task=manifest.task,
                base_model_id=manifest.base_model_id,
                base_fingerprint=manifest.base_fingerprint,
                method=manifest.method,
                weights_sha256=manifest.weights_sha256,
                metrics=manifest.metrics.model_dump() if manifest.metrics else None,
                created_at=manifest.created_at,
            )
        summary["status"] = "ok"
        verdict = (summary.get("metrics") or {}).get("verdict")  # train-adapter's judgement of its own result
        if verdict and verdict != "ok":
            summary["status"] = verdict
    except LoraplexError as exc:
        summary.update(status="invalid", error=str(exc))
    return summary


def _cmd_adapters_list(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from loraplex.server.store import AdapterStore

    store = AdapterStore(args.adapters_dir)
    rows = [_adapter_summary(store, name) for name in store.names()]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    table = Table(title=f"adapters in {store.root}")
    for column in ("name", "rank", "task", "metric: base -> adapter", "status"):
        table.add_column(column)
    for row in rows:
        metrics = row.get("metrics") or {}
        score = ""
        if metrics.get("base") is not None and metrics.get("adapter") is not None:
            score = f"{metrics['metric']}: {metrics['base']:.3f} -> {metrics['adapter']:.3f}"
        status = row["error"] if row["status"] == "invalid" else row["status"]
        if row["status"] not in ("ok", "invalid"):
            status = f"{row['status']}: {metrics.get('verdict_detail') or ''}"
        table.add_row(row["name"], str(row.get("rank", "")), str(row.get("task") or ""), score, status)
    Console(width=None if sys.stdout.isatty() else 140).print(table)
    return 0


def _cmd_adapters_show(args: argparse.Namespace) -> int:
    from loraplex.server.store import AdapterStore

    print(json.dumps(_adapter_summary(AdapterStore(args.adapters_dir), args.name), indent=2))
    return 0


def _cmd_adapters_mix(args: argparse.Namespace) -> int:
    from loraplex.server.basemodel import resolve_base
    from loraplex.server.errors import RequestInvalid
    from loraplex.server.mixes import parse_members
    from loraplex.server.store import AdapterStore
    from loraplex.server.store.mix import write_mix
    from loraplex.server.store.validation import BaseShapes

    try:
        spec = parse_members(args.recipe, param="RECIPE", max_members=args.max_members)
    except RequestInvalid as exc:
        raise RequestInvalid(f"adapters mix: {exc} (e.g. extract:0.7+datefmt:0.3 or extract:0.7,datefmt:0.3)") from None
    store = AdapterStore(args.adapters_dir)
    for member in spec.names:
        store.existing(member)  # an unknown member fails before the base is resolved
    ref = resolve_base(args.model_name_or_path)
    shapes = BaseShapes.from_config(ref.path, ref.fingerprint)
    folder = write_mix(
        store, args.name, spec.members, shapes, base_model_id=ref.id, max_lora_rank=args.max_lora_rank,
        overwrite=args.overwrite, loraplex_version=__version__,
    )
    print(json.dumps({**_adapter_summary(store, args.name), "mix": spec.label, "path": str(folder)}, indent=2))
    return 0


def _settings_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per ServerSettings field (--max-loras ...); only flags given override env/defaults."""
    from loraplex.server.settings import ServerSettings

    for name, field in ServerSettings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        annotation = field.annotation
        help_text = f"{field.description} (env LORAPLEX_{name.upper()}; default: {field.default if field.default_factory is None else '[]'})"
        if annotation is bool:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
        elif name == "preload":
            parser.add_argument(flag, dest=name, default=argparse.SUPPRESS, metavar="NAMES", help=help_text)
        else:
            choices = getattr(annotation, "__args__", None) if "Literal" in str(annotation) else None
            kind = int if annotation is int else float if annotation is float else str
            parser.add_argument(flag, dest=name, type=kind, choices=choices, default=argparse.SUPPRESS, help=help_text)


def _cmd_serve(args: argparse.Namespace) -> int:
    import contextlib
    import logging
    import signal

    import uvicorn
    from pydantic import ValidationError

    from loraplex.server.api.http.connections import guarded_protocol
    from loraplex.server.runtime import begin_drain, create_server_app, reload_keys
    from loraplex.server.settings import ServerSettings

    given = {k: v for k, v in vars(args).items() if k not in ("func", "command")}
    try:
        settings = ServerSettings(**given)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        message = first["msg"].removeprefix("Value error, ")
        if field:  # one flag's value
            message = f"--{field.replace('_', '-')}: {message} (got {first.get('input')!r})"
        print(f"loraplex serve: error: {message}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    failures: list[BaseException] = []
    server: uvicorn.Server | None = None

    def on_fatal(exc: BaseException) -> None:
        failures.append(exc)
        if server is not None:
            server.should_exit = True

    app = create_server_app(settings, on_fatal=on_fatal)
    print(f"loraplex: listening on http://{settings.host}:{settings.port} (loading base {settings.base!r}; /ready turns 200 when done)", flush=True)
    class _Server(uvicorn.Server):
        def handle_exit(self, sig, frame):  # SIGTERM / SIGINT: stop taking work at once, then drain
            begin_drain(app)
            super().handle_exit(sig, frame)

        @contextlib.contextmanager
        def capture_signals(self):
            # like uvicorn's, without re-raising the signal afterwards: a drained shutdown exits 0
            handled = (signal.SIGINT, signal.SIGTERM)
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
            previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, lambda *_: reload_keys(app))
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    http = guarded_protocol(header_timeout=settings.http_header_timeout, body_timeout=settings.http_body_timeout, max_connections=settings.http_max_connections)
    server = _Server(uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level, http=http,
                                    timeout_keep_alive=settings.http_keep_alive_timeout, timeout_graceful_shutdown=settings.shutdown_timeout + 5))
    # the event loop's thread: any torch it calls runs on one thread (engine/cpu_threads.py);
    # ENGINE_THREADS was taken on this thread before (importing runtime)
    from loraplex.server.engine import cpu_threads

    cpu_threads.helper_thread()
    server.run()
    if failures:
        print(f"loraplex serve: error: {failures[0]}", file=sys.stderr)
        return 2
    return 0


def _cmd_export_onnx(args: argparse.Namespace) -> int:
    from loraplex.server.onnx.export import ExportConfig, export_onnx

    def split(value: str | None) -> tuple[str, ...]:
        return tuple(v.strip() for v in (value or "").split(",") if v.strip())

    config = ExportConfig(
        output_path=Path(args.output_path),
        model_name_or_path=args.model_name_or_path,
        adapter_paths=tuple(Path(p) for p in split(args.adapter_paths)),
        adapter_names=split(args.adapter_names),
        precision=args.precision,
        lora_targets=args.lora_targets,
        max_lora_rank=args.max_lora_rank,
        overwrite=args.overwrite,
        builder_options=tuple(args.builder_option or ()),
    )
    manifest = export_onnx(config, say=lambda line: print(f"loraplex export-onnx: {line}", file=sys.stderr, flush=True))
    print(json.dumps({"output_path": str(config.output_path), "precision": manifest.precision, "base_fingerprint": manifest.base_fingerprint,
                      "adapters": [a.name for a in manifest.adapters], "lora_modules": len(manifest.lora_modules)}, indent=2))
    return 0


def _cmd_keys_add(args: argparse.Namespace) -> int:
    from loraplex.server.auth import KeyFile

    adapters = [a.strip() for a in args.adapters.split(",") if a.strip()]
    secret, key = KeyFile(args.file).add(args.name, args.role, adapters, requests_per_minute=args.requests_per_minute, tokens_per_minute=args.tokens_per_minute)
    print(f"created key {key.name!r} (role {key.role}, adapters {', '.join(key.adapters)}) in {args.file}", file=sys.stderr)
    print("the secret is shown once; only its sha256 is stored:", file=sys.stderr)
    print(secret)
    return 0


def _cmd_keys_list(args: argparse.Namespace) -> int:
    from loraplex.server.auth import KeyFile

    for key in KeyFile(args.file).load():
        limits = f" rpm={key.requests_per_minute}" if key.requests_per_minute else ""
        limits += f" tpm={key.tokens_per_minute}" if key.tokens_per_minute else ""
        state = "revoked" if key.revoked else "active"
        print(f"{key.name}\t{key.role}\t{','.join(key.adapters)}\t{key.prefix}...\t{state}{limits}\t{key.created_at}")
    return 0


def _cmd_keys_revoke(args: argparse.Namespace) -> int:
    from loraplex.server.auth import KeyFile

    key = KeyFile(args.file).revoke(args.name)
    print(f"revoked key {key.name!r} in {args.file} (a running server re-reads the file within a second, or on SIGHUP)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraplex", description="One base model, many LoRA adapters.")
    parser.add_argument("--version", action="version", version=f"loraplex {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = sub.add_parser("serve", help="serve the base and every adapter in the store over HTTP (OpenAI-compatible)")
    _settings_flags(serve)
    serve.set_defaults(func=_cmd_serve)

    bench = sub.add_parser("bench", help="benchmark a server against this machine's measured ceilings: mixed vs base at concurrency 64, single stream, burst TTFT, hot-load, memory")
    from loraplex.server import bench as bench_module

    bench_module.add_arguments(bench)
    bench.set_defaults(func=lambda args: bench_module.run(args))

    export = sub.add_parser(
        "export-onnx",
        help="export the base + adapters to one multi-adapter onnxruntime-genai model (CPU) with one .onnx_adapter per adapter",
        description="Olive's generate-adapter flow, natively: the base with swappable LoRA inputs (empty by default, so no "
        "adapter = the exact base), one <name>.onnx_adapter per adapter, loraplex-export.json. Plain onnxruntime-genai "
        "(og.Model, og.Adapters, set_active_adapter) loads the result; loraplex serve --backend onnx --model DIR serves it.",
    )
    export.add_argument("--model_name_or_path", "--base", default="embedded", help="the base: 'embedded' (default), a model folder or a hub id")
    export.add_argument("--adapter_paths", default="", help="comma-separated peft adapter folders (e.g. adapters/sentiment,adapters/extract)")
    export.add_argument("--adapter_names", default="", help="comma-separated names for them (default: each folder's name)")
    export.add_argument("--output_path", required=True, help="the model folder to write (e.g. models/multi-adapter)")
    export.add_argument("--precision", choices=["int4", "fp32"], default="int4", help="base weights: int4 (default; LoRA stays float32) or fp32")
    export.add_argument("--lora_targets", choices=["all", "union"], default="all",
                        help="modules with LoRA inputs: all (every attention/MLP projection; adapters trained later fit) or union (the given adapters' modules)")
    export.add_argument("--max_lora_rank", type=int, default=64, help="refuse adapters above this rank (default 64)")
    export.add_argument("--overwrite", action="store_true", help="replace --output_path if it exists")
    export.add_argument("--builder_option", action="append", metavar="KEY=VALUE",
                        help="passed to the onnxruntime-genai model builder's extra options (repeatable), e.g. algo_config=k_quant or "
                        "matmul_mixed_precision=last_matmul:int8; loraplex sets adapter_path and nodes_to_exclude itself")
    export.set_defaults(func=_cmd_export_onnx)

    keys = sub.add_parser("keys", help="manage API keys (a YAML file of hashes): add, list, revoke")
    keys_sub = keys.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    add = keys_sub.add_parser("add", help="create a key; prints the secret once")
    add.add_argument("--file", required=True, help="the key file (created if missing)")
    add.add_argument("--name", required=True, help="a name for the key (shown in metrics as label key)")
    add.add_argument("--role", choices=["user", "admin"], default="user", help="admin may load/unload adapters")
    add.add_argument("--adapters", required=True, help="comma-separated names or glob patterns the key may use; '*' for all (the base counts by its served name)")
    add.add_argument("--requests-per-minute", type=int, help="optional request rate limit")
    add.add_argument("--tokens-per-minute", type=int, help="optional token rate limit (prompt + generated)")
    add.set_defaults(func=_cmd_keys_add)
    listing_keys = keys_sub.add_parser("list", help="keys in the file (never their secrets)")
    listing_keys.add_argument("--file", required=True)
    listing_keys.set_defaults(func=_cmd_keys_list)
    revoke = keys_sub.add_parser("revoke", help="revoke a key by name")
    revoke.add_argument("--file", required=True)
    revoke.add_argument("--name", required=True)
    revoke.set_defaults(func=_cmd_keys_revoke)

    base = sub.add_parser("base", help="resolve the base model (materializing the embedded one) and print its fingerprint")
    base.add_argument("--model_name_or_path", "--base", default="embedded", help="'embedded' (default), a model folder or a hub id")
    base.set_defaults(func=_cmd_base)

    adapters = sub.add_parser("adapters", help="list or inspect the adapter store")
    adapters_sub = adapters.add_subparsers(dest="adapters_command", metavar="ACTION", required=True)
    listing = adapters_sub.add_parser("list", help="every adapter in the store with its rank, task and scores")
    listing.add_argument("--adapters-dir", default="adapters", help="the adapter store (default: adapters)")
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    listing.set_defaults(func=_cmd_adapters_list)
    show = adapters_sub.add_parser("show", help="one adapter's config and manifest as JSON")
    show.add_argument("name")
    show.add_argument("--adapters-dir", default="adapters", help="the adapter store (default: adapters)")
    show.set_defaults(func=_cmd_adapters_show)
    mix = adapters_sub.add_parser(
        "mix",
        help="write a weighted mix of store adapters as a new adapter (exact rank concatenation; served like any adapter)",
        description="Writes NAME into the store: a normal peft LoRA folder whose every module holds the members' LoRAs side by "
        "side (A stacked, B times weight and the member's own scale), equal to peft's add_weighted_adapter(combination_type='cat'). "
        "loraplex.json records the recipe. Published atomically. See docs/mixes.md.",
    )
    mix.add_argument("name", help="the new adapter's name")
    mix.add_argument("recipe", metavar="RECIPE", help="members and weights: a:0.7+b:0.3 or a:0.7,b:0.3 (a member without :w weighs 1)")
    mix.add_argument("--adapters-dir", default="adapters", help="the adapter store (default: adapters)")
    mix.add_argument("--model_name_or_path", "--base", default="embedded", help="the base the members were trained on: 'embedded' (default), a model folder or a hub id")
    mix.add_argument("--max-lora-rank", type=int, default=64, help="refuse a mix whose summed rank at any module exceeds this (the server's --max-lora-rank; default 64)")
    mix.add_argument("--max-members", type=int, default=8, help="members at most (default 8)")
    mix.add_argument("--overwrite", action="store_true", help="replace an existing adapter NAME (atomically)")
    mix.set_defaults(func=_cmd_adapters_mix)
    return parser


def main(argv: list[str] | None = None) -> int:
    from loraplex.server.logs import quiet_third_party

    quiet_third_party()  # before any subcommand imports bitsandbytes / peft / transformers
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "serve":
        quiet_third_party(progress_bars=False)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except LoraplexError as exc:
        print(f"loraplex: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
