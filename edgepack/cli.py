"""edgepack's command line: export | validate | bench | run | report | serve | bundle | doctor | fleet | bench-export |
tools | targets."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from datetime import datetime, timezone
from pathlib import Path

from edgepack.errors import EdgepackError

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
DEFAULT_DIST = Path("dist")


def _console():
    from rich.console import Console

    return Console(stderr=True, log_path=False, highlight=False)


def _source(args):
    from edgepack.source import resolve

    return resolve(args.model)


def _targets(args):
    from edgepack.targets import load_targets

    return load_targets(args.targets)


def _artifacts(args, source, targets) -> list:
    """Exported artifacts of the source under --out, filtered by --target/--variant; source must match."""
    from edgepack.artifacts import artifacts_in, model_dir, read_manifest

    folder = model_dir(args.out, source.slug)
    if not folder.is_dir():
        return []
    wanted = [t for t in args.target or [] if t != "source"]
    if args.target and not wanted:  # only the source was asked for
        return []
    chosen = {t.name for t in targets.select(wanted)} if wanted else None
    found = []
    for artifact in artifacts_in(folder):
        if chosen is not None and artifact.target not in chosen:
            continue
        if args.variant and artifact.variant not in args.variant:
            continue
        manifest = read_manifest(artifact.dir)
        if manifest["source"]["sha256"] != source.sha256:
            raise EdgepackError(
                f"{artifact.dir}: exported from different weights than --model {source.origin}; "
                f"re-export with edgepack export --target {artifact.target} --force"
            )
        found.append(artifact)
    return found


def cmd_export(args) -> int:
    from edgepack.artifacts import model_dir
    from edgepack.exporters import EXPORTERS, export_target
    from edgepack.targets import FORMATS

    console = _console()
    targets = _targets(args)
    selected = targets.select(args.target)
    explicit = bool(args.target) and "all" not in args.target
    if args.variant:
        valid = {v for t in selected for f in t.formats for v in FORMATS[f]["variants"]}
        unknown = [v for v in args.variant if v not in valid]
        if unknown:
            raise EdgepackError(f"--variant {unknown[0]}: not a variant of {', '.join(t.name for t in selected)}; "
                                f"valid: {', '.join(sorted(valid))}")
    source = _source(args)
    folder = model_dir(args.out, source.slug)
    built, skipped = [], []
    for target in selected:
        plan = {}
        for fmt, spec in target.formats.items():
            names = list(spec.variants) if args.variant is None else [
                v for v in args.variant if v in FORMATS[fmt]["variants"]]
            if not names:
                continue
            if fmt not in EXPORTERS:
                console.print(f"[yellow]{target.name}: {fmt} exporter not available yet (skipped)[/yellow]")
                skipped.append(f"{target.name}/{fmt}")
                continue
            why = EXPORTERS[fmt].unavailable()
            if why:
                raise EdgepackError(f"{target.name}: the {fmt} exporter cannot run here: {why}")
            plan[fmt] = names
        if plan:
            export_target(source, target, plan, folder, args.force, log=console.print)
            built.append(target.name)
    if explicit and not built and skipped:
        raise EdgepackError(f"{', '.join(skipped)}: no exporter available yet; see edgepack doctor")
    console.print(f"exported: {', '.join(built) or 'nothing'} → {folder}"
                  + (f"; not available yet: {', '.join(skipped)}" if skipped else ""))
    return 0


ISOLATE_VALIDATE_PARAMETERS = 300e6  # from here up, validate runs each artifact in a process of its own


def cmd_validate(args) -> int:
    from edgepack.artifacts import model_dir
    from edgepack.fleet import parameter_count
    from edgepack.runtime.parity import reference_trace, validate_artifact, validate_in_child
    from edgepack.runtime.report import update_report

    console = _console()
    targets = _targets(args)
    source = _source(args)
    artifacts = _artifacts(args, source, targets)
    folder = model_dir(args.out, source.slug)
    if not artifacts:
        console.print(f"nothing to validate under {folder}: run edgepack export first")
        return 0
    with console.status("running the reference on the prompt set (or reading its cached trace)…"):
        ref = reference_trace(source)
    # a large model's artifacts each in a process of their own (validate_in_child), the trace read there from its
    # cache and freed here first; a small one's in this process (a child's imports cost more than it saves)
    isolate = len(artifacts) > 1 and parameter_count(str(source.path)) >= ISOLATE_VALIDATE_PARAMETERS
    if isolate:
        del ref
    results, failed = [], []
    for artifact in artifacts:
        thresholds = targets.thresholds(artifact.format, artifact.variant, artifact.target)
        with console.status(f"validating {artifact.key}…"):
            result = (validate_in_child(artifact, thresholds, source) if isolate
                      else validate_artifact(artifact, thresholds, ref))
        update_report(folder, source.slug, artifact, "parity", result)
        results.append(result)
        misses = [c for c in result["checks"] if not c["passed"]]
        failed += [f"{artifact.key} {c['metric']} {c['value']:.4g} (needs {c['op']} {c['bound']:g})" for c in misses]
        m = result["metrics"]
        if not args.json:
            verdict = "[red]FAIL[/red]" if misses else ("[green]pass[/green]" if thresholds else "no thresholds")
            console.print(f"{artifact.key}: KL {m['kl']:.4g}, top-1 {m['top1']:.3f}, max|Δ| {m['max_abs_logit']:.3g}, "
                          f"greedy {' '.join(m['greedy_tokens'])}, ppl ratio {m['ppl_ratio']:.4f} → {verdict}")
            if "baseline" in result:
                b = result["baseline"]
                console.print(f"  its plain build (baseline/): KL {b['kl']:.4g}, top-1 {b['top1']:.3f}")
            if "engine_greedy" in m:
                console.print(f"  LiteRT-LM engine: greedy text equal to this runner's on "
                              f"{m['engine_greedy'] * 100:.0f} % of the chat prompts "
                              f"{'; ' + '; '.join(m['engine_notes']) if m['engine_notes'] else ''}".rstrip())
            for runtime, verdict in result.get("compatibility", {}).items():
                console.print(f"  {runtime}: {verdict}")
    if args.json:
        print(json.dumps(results, indent=2))
    for line in failed:
        console.print(f"[red]threshold missed:[/red] {line}")
    return 1 if failed else 0


def cmd_bench(args) -> int:
    from edgepack.artifacts import model_dir
    from edgepack.native import llama_cpp_missing
    from edgepack.runtime import RUNNERS
    from edgepack.runtime.bench import add_rooflines, anchor_artifact, bench_artifact, memory_read_bandwidth
    from edgepack.runtime.reference import source_artifact
    from edgepack.runtime.report import update_report

    console = _console()
    targets = _targets(args)
    source = _source(args)
    folder = model_dir(args.out, source.slug)
    if args.browser:
        return _bench_browser(args, source, folder, console)
    artifacts = _artifacts(args, source, targets)
    for artifact in list(artifacts):
        runner = RUNNERS.get(artifact.format)
        if runner and (why := runner.speed_unmeasurable()):
            console.print(f"{artifact.key}: not benchmarked — {why}")
            artifacts.remove(artifact)
    if not args.target or "source" in args.target:
        artifacts.insert(0, source_artifact(source))
    if any(a.target != "source" for a in artifacts) and not llama_cpp_missing():
        artifacts.append(anchor_artifact())  # every exported variant's speed as a ratio to llama.cpp, same run
    probes = [memory_read_bandwidth()]
    run_id = datetime.now(timezone.utc).isoformat(timespec="seconds")  # ratios only within one run
    results = {}
    for artifact in artifacts:
        with console.status(f"benchmarking {artifact.key}…"):
            results[artifact.key] = {**bench_artifact(artifact), "run": run_id}
        if not args.json:
            result = results[artifact.key]
            console.print(f"{artifact.key}: load {result['load_s']:.2f} s, TTFT {result['ttft_s']:.3f} s, "
                          f"{result['decode_tok_s']:.1f} tok/s, peak RSS {result['peak_rss_bytes'] / 1e6:.0f} MB")
            if "whole_cache_decode_tok_s" in result:
                console.print(f"  short-cache decode: {result['short_cache_speedup']:.2f}× the whole-cache signature's "
                              f"{result['whole_cache_decode_tok_s']:.1f} tok/s (same run)")
            if engine := result.get("engine"):
                console.print(f"  in {engine['name']}: TTFT {engine['ttft_s']:.3f} s, {engine['decode_tok_s']:.1f} "
                              f"tok/s over {engine['decode_tokens']} tokens")
    probes.append(memory_read_bandwidth())
    bandwidth = add_rooflines(list(results.values()), probes)
    if not args.json:
        console.print(f"memory read bandwidth: {bandwidth['bytes_per_s'] / 1e9:.1f} GB/s ({bandwidth['method']})")
    for artifact in artifacts:
        result = results[artifact.key]
        update_report(folder, source.slug, artifact, "bench", result,
                      bandwidth_gbs=round(bandwidth["bytes_per_s"] / 1e9, 2), bandwidth_method=bandwidth["method"])
        if not args.json:
            console.print(f"{artifact.key}: {100 * result['roofline_ratio']:.0f} % of roofline "
                          f"{result['roofline_tok_s']:.0f} tok/s, {result['bound']}")
    anchor = next((r for k, r in results.items() if k.startswith("anchor/")), None)
    if anchor and not args.json:
        for key, result in results.items():
            if not key.startswith(("anchor/", "source/")):
                console.print(f"{key}: {result['decode_tok_s'] / anchor['decode_tok_s']:.2f}× the llama.cpp anchor's "
                              "decode tok/s")
    if args.json:
        print(json.dumps(results, indent=2))
    return 0


def cmd_run(args) -> int:
    from edgepack.runtime import open_runner
    from edgepack.runtime.reference import source_artifact

    source = _source(args)
    if args.target == "source":
        artifact = source_artifact(source)
    else:
        targets = _targets(args)
        args.target = [args.target]
        candidates = _artifacts(args, source, targets)
        if not candidates:
            raise EdgepackError(f"no exported {args.target[0]} artifact"
                                + (f" of variant {args.variant[0]}" if args.variant else "")
                                + f" under {args.out}; run edgepack export --target {args.target[0]} first")
        artifact = candidates[0]
    runner = open_runner(artifact)
    for text in runner.generate(args.prompt, args.max_new_tokens, args.temperature, args.top_p, args.seed):
        sys.stdout.write(text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def cmd_report(args) -> int:
    from edgepack.artifacts import model_dir
    from edgepack.runtime.report import write_reports

    folder = model_dir(args.out, _source(args).slug)
    print(write_reports(folder), end="")
    _console().print(f"wrote {folder / 'report.json'}, report.md, report.html")
    return 0


def _bench_browser(args, source, folder, console) -> int:
    """The page in headless Chromium: its default engine and variant against stock wllama on the anchor GGUF."""
    from edgepack.artifacts import read_manifest
    from edgepack.runtime.bench import anchor_artifact
    from edgepack.runtime.report import set_report_section
    from edgepack.web.browser import browser_bench

    if read_manifest(folder / "web") is None:
        raise EdgepackError(f"{folder / 'web'}: no web export; run edgepack export --target web first")
    with console.status("benchmarking the page in headless Chromium…"):
        result = browser_bench(Path(args.out), source.slug, anchor_artifact().files[0])
    result["run"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    set_report_section(folder, "browser", result)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    for name, r in result.items():
        if not isinstance(r, dict):
            continue
        heap = f", WASM heap {r['heap_bytes'] / 1e6:.0f} MB" if r.get("heap_bytes") else ""
        mark = " (the page's default)" if name == result["default"] else ""
        console.print(f"browser {name}{mark}: {r['engine']} ({r['device']}) {r['variant']}: {r['decode_tok_s']:.1f} "
                      f"tok/s (runs {r['decode_tok_s_runs']}), first token {r['first_token_after_load_s']:.2f} s after "
                      f"load{heap}")
    if "int8_ratio" in result:
        console.print(f"browser: int8 decodes at {result['int8_ratio']:.2f}× q4dq's tok/s (same run)")
    console.print(f"browser: the page's default ({result['default']}) decodes at {result['ratio']:.2f}× stock "
                  "wllama's tok/s (same run)")
    return 0


def cmd_serve(args) -> int:
    from edgepack.web import create_app

    app = create_app(args.out)
    _console().print(f"serving {Path(args.out).resolve()} on http://{args.host}:{args.port}/ (Ctrl-C stops)")
    app.run(host=args.host, port=args.port, threaded=True)
    return 0


def cmd_bundle(args) -> int:
    from edgepack.mobile import build_bundle, verify_bundle

    if args.verify:
        problems = verify_bundle(Path(args.verify))
        for line in problems:
            print(line)
        return 1 if problems else 0
    if not args.platform:
        raise EdgepackError("bundle: pass --platform ios|android, or --verify DIR")
    source = _source(args)
    print(build_bundle(args.platform, source, args.out))
    return 0


def _print_table(rows: list[dict], columns: tuple[str, ...]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table()
    for column in columns:
        table.add_column(column, overflow="fold")  # paths in full
    for row in rows:
        table.add_row(*(row[c] for c in columns))
    Console(width=max(120, shutil.get_terminal_size().columns)).print(table)


def cmd_doctor(args) -> int:
    from edgepack.doctor import diagnose
    from edgepack.tools import tool_rows

    rows, tools = diagnose(_targets(args)), tool_rows()
    if args.json:
        print(json.dumps({"formats": rows, "tools": tools}, indent=2))
        return 0
    _print_table(rows, ("target", "format", "exporter", "runner", "notes"))
    _print_table(tools, ("tool", "where", "for"))
    return 0


def cmd_tools(args) -> int:
    from edgepack.tools import build_all, tool_rows

    if args.build:
        build_all()
    rows = tool_rows()
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        _print_table(rows, ("tool", "where", "for"))
    return 0


def cmd_targets(args) -> int:
    """Print the targets matrix in use, or write the default one to a file for editing (then pass --targets)."""
    from edgepack.targets import DEFAULT_TARGETS_FILE, load_targets

    if args.write:
        if args.write.exists() and not args.force:
            raise EdgepackError(f"{args.write} exists; pass --force to overwrite it")
        args.write.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(DEFAULT_TARGETS_FILE, args.write)
        print(f"wrote {args.write}; edit it, then pass --targets {args.write}", file=sys.stderr)
        return 0
    targets = load_targets(args.targets)
    print(f"# {targets.path}")
    for spec in targets.targets.values():
        for fmt in spec.formats.values():
            print(f"{spec.name}\t{fmt.name}\t{' '.join(fmt.variants)}")
    return 0


def cmd_fleet(args) -> int:
    from edgepack.fleet import read_fleet, run_fleet

    fleet = read_fleet(args.fleet)
    out = args.out or str(Path(args.fleet).resolve().parent / "dist")
    summary = run_fleet(fleet, out, address=args.ray, retries=args.retries, bench_speed=not args.no_bench,
                        log=_console().print)
    failed = summary["failed"] or [c for c in summary["cells"] if not c["passed"]]
    return 1 if failed else 0


def cmd_bench_export(args) -> int:
    from edgepack.runtime.report import render_export_report
    from edgepack.scale import bench_export, fit, write_rows

    args.work.mkdir(parents=True, exist_ok=True)
    rows = bench_export(args.shape, args.target, args.work, log=_console().print, validate=args.validate)
    path = args.work / "bench-export.json"
    doc = write_rows(rows, path)
    lines = fit(doc["rows"])
    for target, (a, b) in lines.items():
        _console().print(f"{target:>8}: peak ≈ {a:.2f} GB + {b:.2f} GB × billions of parameters")
    markdown, page = render_export_report(doc, lines)
    (args.work / "report.md").write_text(markdown, encoding="utf-8")
    (args.work / "report.html").write_text(page, encoding="utf-8")
    print(path)
    return 0 if all(r["code"] == 0 for r in rows) else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgepack", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name, func, help_text, model=True, targets=True, out=True):
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(func=func)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
        if model:
            p.add_argument("--model", metavar="M", help="Hugging Face folder or .gguf file (default: embedded "
                           "SmolLM2-135M-Instruct)")
        if targets:
            p.add_argument("--targets", metavar="FILE", help="targets file (default: the one edgepack ships; edgepack targets --write FILE copies it)")
        if out:
            p.add_argument("--out", type=Path, default=DEFAULT_DIST, metavar="DIR", help="dist folder (default: dist)")
        return p

    target_help = "web | ios | android | cpu | mac | all (repeatable)"
    p = command("export", cmd_export, "export the source model for each target")
    p.add_argument("--target", nargs="+", action="extend", metavar="T", help=target_help)
    p.add_argument("--variant", nargs="+", action="extend", metavar="V", help="only these variants")
    p.add_argument("--force", action="store_true", help="rebuild even when the manifest says up to date")
    for name, func, text in (("validate", cmd_validate, "check every exported artifact's parity with the source"),
                             ("bench", cmd_bench, "measure load time, TTFT, tokens/s, memory and roofline")):
        p = command(name, func, text)
        p.add_argument("--target", nargs="+", action="extend", metavar="T", help=target_help)
        p.add_argument("--variant", nargs="+", action="extend", metavar="V", help="only these variants")
        p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--browser", action="store_true", help="bench the page in headless Chromium instead: its default "
                   "engine and variant against stock wllama on the anchor GGUF")
    p = command("run", cmd_run, "generate with one artifact; streams only the generated text to stdout")
    p.add_argument("--target", required=True, metavar="T", help="source | web | ios | android | cpu | mac")
    p.add_argument("--variant", nargs=1, metavar="V", help="variant (default: the first exported)")
    p.add_argument("--prompt", required=True, help="user message (the model's chat template is applied)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    command("report", cmd_report, "write report.md and report.html from report.json and print the table",
            targets=False)
    p = command("serve", cmd_serve, "serve the exported models and the in-browser demo", model=False, targets=False)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--dist", dest="out", type=Path, default=argparse.SUPPRESS, help="same as --out")
    p = command("bundle", cmd_bundle, "build an app-ready bundle for iOS or Android", targets=False)
    p.add_argument("--platform", choices=("ios", "android"))
    p.add_argument("--verify", metavar="DIR", help="re-hash a bundle folder against its manifest")
    p = command("doctor", cmd_doctor, "which exporters and runtimes work here, and why not", model=False, out=False)
    p.add_argument("--json", action="store_true", help="print JSON")
    p = command("fleet", cmd_fleet, "export, validate and bench many models × targets as Ray tasks; one report",
                model=False, targets=False, out=False)
    p.add_argument("fleet", metavar="FLEET.toml", help="the models and targets (README: Many models)")
    p.add_argument("--ray", metavar="ADDRESS", help="join this Ray cluster (default: a local Ray sized to this machine)")
    p.add_argument("--out", metavar="DIR_OR_URL", help="where artifacts and fleet.html go: a folder shared by the "
                   "nodes or an fsspec URL (s3://, gs://, file://); default: dist beside FLEET.toml")
    p.add_argument("--retries", type=int, default=2, help="Ray retries of a task whose worker died (default 2)")
    p.add_argument("--no-bench", action="store_true", help="export and validate only")
    p = command("tools", cmd_tools, "the helper tools edgepack builds into its cache on first need (llama.cpp's "
                "converter and quantizer tools, tflite-runtime 2.14's environment)", model=False, targets=False,
                out=False)
    p.add_argument("--build", action="store_true", help="build every missing one now")
    p.add_argument("--json", action="store_true", help="print JSON")
    from edgepack.scale import SHAPES  # a table, no heavy imports
    from edgepack.targets import TARGETS

    p = command("bench-export", cmd_bench_export, "export seconds and peak RSS (process tree) per target for "
                "random-weight models with published configs, built here (no download)", model=False, targets=False,
                out=False)
    p.add_argument("--shape", nargs="+", default=["qwen2.5-0.5b"], choices=list(SHAPES), metavar="S",
                   help=f"model shapes ({', '.join(SHAPES)}); default qwen2.5-0.5b")
    p.add_argument("--target", nargs="+", default=list(TARGETS), choices=TARGETS, metavar="T",
                   help="targets (default: all)")
    p.add_argument("--work", type=Path, default=Path("bench-export"), metavar="DIR",
                   help="models, logs, bench-export.json (merged across runs), report.md and report.html go here "
                        "(default: bench-export)")
    p.add_argument("--validate", action="store_true", help="also measure `edgepack validate` on each export (its "
                   "seconds, peak memory and verdicts, in bench-export.json)")
    p = command("targets", cmd_targets, "show the targets matrix, or write the default one to edit", model=False,
                out=False)
    p.add_argument("--write", type=Path, metavar="FILE", help="write the default targets.toml to FILE")
    p.add_argument("--force", action="store_true", help="overwrite FILE")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except EdgepackError as exc:
        if args.debug:
            raise
        print(f"edgepack: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("edgepack: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug, not a user error: still one line unless --debug
        if args.debug:
            raise
        print(f"edgepack: internal error: {type(exc).__name__}: {exc} (run with --debug for the traceback)",
              file=sys.stderr)
        return 3


if __name__ == "__main__":
    raise SystemExit(main())
