"""The `ptqbench` command line.

    ptqbench run SPEC [--scale smoke] [--executor local|ray [--address HOST:PORT]] [--results-dir DIR] [--no-retry-failed] [--dry-run]
    ptqbench list methods|formats|schemes|models|tasks|executors|papers
    ptqbench show RUN_ID [--results-dir DIR]
    ptqbench table [--results-dir DIR] [--spec NAME] [--metric ppl]
    ptqbench export OUT.parquet [--results-dir DIR]
    ptqbench reproduce PAPER [--scale smoke] [--executor local] [--results-dir DIR]
    ptqbench report PAPER [--scale smoke]        (rebuild a paper's report from recorded runs)
    ptqbench site [--results-dir DIR]            (leaderboard tables + HTML dashboard)

Results go to --results-dir, else $PTQBENCH_RESULTS_DIR, else ./results. Rerunning a spec skips the
runs that are done and retries the failed ones (pass --no-retry-failed to skip those too).
Bad input prints one line to stderr and exits with status 2; `run` exits 1 if any run failed with an
error (a diverged perplexity is a result: recorded as failed, never retried, exit status 0).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from harness.errors import PtqbenchError, UnknownNameError

LIST_KINDS = ("methods", "formats", "schemes", "models", "tasks", "executors", "papers")


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is the same one line as every other bad input (exit code 2)."""

    def error(self, message: str):
        self.exit(2, f"ptqbench: error: {' '.join(message.split())} (see `{self.prog} --help`)\n")


def _parser() -> argparse.ArgumentParser:
    p = _OneLineParser(prog="ptqbench", description="LLM post-training quantization benchmark harness")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run an experiment spec (resumable)")
    run.add_argument("spec", help="experiment YAML")
    run.add_argument("--scale", default=None, help="a scale named in the spec (e.g. smoke, full)")
    run.add_argument("--executor", default="local", help="where cells run (default: local)")
    run.add_argument("--address", default=None,
                     help="with --executor ray: join this Ray cluster (default: $RAY_ADDRESS, else start a local one)")
    run.add_argument("--results-dir", default=None, help="default: $PTQBENCH_RESULTS_DIR or ./results")
    run.add_argument("--no-retry-failed", action="store_true", help="skip runs that failed before")
    run.add_argument("--dry-run", action="store_true", help="list the cells and run ids, run nothing")
    run.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    run.add_argument("--no-track", action="store_true", help="do not log runs to W&B (offline by default)")

    lst = sub.add_parser("list", help="list registered names")
    lst.add_argument("kind", choices=LIST_KINDS)

    show = sub.add_parser("show", help="print one run record (a unique run-id prefix is enough)")
    show.add_argument("run_id")
    show.add_argument("--results-dir", default=None)

    table = sub.add_parser("table", help="pivot of done runs: method x scheme per model and task")
    table.add_argument("--results-dir", default=None)
    table.add_argument("--spec", default=None, help="only runs of this spec name")
    table.add_argument("--metric", default=None, help="metric to show (default: each task's main metric)")

    rep = sub.add_parser("reproduce", help="run a paper's spec and write its report (claims, tables, plots)")
    rep.add_argument("paper", help="a paper id: ptqbench list papers")
    rep.add_argument("--scale", default="smoke", help="smoke (CPU minutes) or full (GPUs)")
    rep.add_argument("--executor", default="local")
    rep.add_argument("--results-dir", default=None)
    rep.add_argument("--device", default=None)
    rep.add_argument("--no-track", action="store_true")
    rep.add_argument("--no-retry-failed", action="store_true")

    report = sub.add_parser("report", help="rebuild a paper's report from the recorded runs")
    report.add_argument("paper")
    report.add_argument("--scale", default="smoke")
    report.add_argument("--results-dir", default=None)

    site = sub.add_parser("site", help="leaderboards (md/html/tex) and the HTML dashboard from recorded runs")
    site.add_argument("--results-dir", default=None)

    cache = sub.add_parser("cache", help="the calibration cache: its size (du) or removing states (prune)")
    cache.add_argument("action", choices=("du", "prune"))
    cache.add_argument("--results-dir", default=None)
    cache.add_argument("--unused", action="store_true", help="prune: states no run record uses")
    cache.add_argument("--older-than", type=float, default=None, metavar="DAYS", help="prune: states older than this")
    cache.add_argument("--all", action="store_true", help="prune: every state")

    export = sub.add_parser("export", help="write the tidy results table to parquet")
    export.add_argument("out")
    export.add_argument("--results-dir", default=None)

    model = sub.add_parser("export-model", help="write a run's quantized model as a servable checkpoint "
                                                "(compressed-tensors), checked bit for bit against what was evaluated")
    model.add_argument("run_id", help="a run id (a unique prefix is enough)")
    model.add_argument("out_dir", help="the checkpoint directory (new or empty)")
    model.add_argument("--format", default="compressed-tensors", dest="export_format")
    model.add_argument("--results-dir", default=None)
    model.add_argument("--fake", action="store_true", help="write the dequantized weights (online transforms folded "
                                                           "in, activation / KV quantization dropped)")
    model.add_argument("--allow-inexact", action="store_true",
                       help="export formats whose compressed-tensors form does not dequantize bit for bit (NVFP4)")
    model.add_argument("--allow-code-change", action="store_true",
                       help="rebuild even if the code has changed since the run was recorded")
    model.add_argument("--no-verify", action="store_true", help="skip reloading the checkpoint to compare weights")
    model.add_argument("--device", default=None, help="rebuild on this device (default: the run's)")
    return p


def describe_format(fmt) -> str:
    """One line: element, scaling and bits per element of a number format."""
    scope = {"row": "per row", "tensor": "per tensor", "group": f"per {fmt.group_size} elements"}.get(
        fmt.granularity, fmt.granularity)
    symmetric = "" if fmt.symmetric else ", asymmetric"
    return (f"{fmt.element} elements ({fmt.bits} bits), {fmt.scale_type} scale {scope}{symmetric}; "
            f"{fmt.bits_per_element:g} bits per element with scales")


def _cmd_list(kind: str) -> None:
    if kind == "methods":
        from harness.registry import broken_methods, get_method, list_methods

        for name in list_methods():
            doc = (get_method(name).__doc__ or "").strip().splitlines()
            print(f"{name:16s} {doc[0] if doc else ''}")
        for name, err in sorted(broken_methods().items()):
            print(f"{name:16s} (failed to import: {err})")
    elif kind == "formats":
        from harness.formats import get_format, list_formats

        for name in list_formats():
            try:
                print(f"{name:26s} {describe_format(get_format(name))}")
            except PtqbenchError:  # a pattern such as int{b}[_asym][_g{N}|_tensor]
                print(f"{name:26s} (a name pattern: fill in the braces)")
    elif kind == "schemes":
        from harness.quant import get_scheme, list_schemes

        for name in list_schemes():
            scheme = get_scheme(name)
            parts = [f"{part} {_kv_name(getattr(scheme, attr)) if attr == 'kv' else getattr(scheme, attr).name}"
                     for part, attr in (("W", "weight"), ("A", "activation"), ("KV", "kv"))
                     if getattr(scheme, attr) is not None]
            print(f"{name:18s} {', '.join(parts) or 'full precision'}")
    elif kind == "models":
        from harness.models import list_models

        print("\n".join(list_models()))
    elif kind == "tasks":
        from harness.spec.catalogs import task_catalog

        for name, task_kind in sorted(task_catalog().items()):
            print(f"{name:24s} {task_kind}")
    elif kind == "papers":
        from harness.reproduce import list_papers

        print("\n".join(list_papers()))
    else:
        from harness.executors import list_executors

        print("\n".join(list_executors()))


def _track(record: dict, root, state: dict) -> None:
    """Log a record to W&B; a tracking problem is reported once and never stops the matrix."""
    if state.get("off"):
        return
    try:
        from harness import tracking

        if not tracking.enabled():
            state["off"] = True
            return
        tracking.log_record(record, directory=root)
    except Exception as exc:  # noqa: BLE001
        state["off"] = True
        print(f"ptqbench: W&B tracking disabled after an error: {type(exc).__name__}: {exc}", file=sys.stderr)


def _record_line(r: dict) -> str:
    head = f"{r['run_id'][:10]} {r['model']} | {r['method_label']} | {r['scheme'] or '-'} | {r['task']}"
    if r["status"] != "done":
        return f"{head}: FAILED {r['error']}"
    main = r.get("main_metric")
    value = r["metrics"].get(main) if main else None
    shown = f"{main}={value:.4g}" if isinstance(value, (int, float)) else "done"
    t = r.get("timings", {})
    return f"{head}: {shown} (calibrate {t.get('calibrate_s', 0):.1f} s, eval {t.get('eval_s', 0):.1f} s)"


def _track_summary(name: str, run_ids: set[str], store, state: dict) -> None:
    try:
        from harness import tracking
        from harness.store import load_results

        df = load_results(store.root)
        tracking.log_summary(df[df["run_id"].isin(run_ids)], group=name, directory=store.root)
    except Exception as exc:  # noqa: BLE001
        print(f"ptqbench: W&B summary skipped: {type(exc).__name__}: {exc}", file=sys.stderr)


def _cmd_run(args) -> int:
    from harness import progress
    from harness.driver import plan, run_matrix
    from harness.executors import get_executor
    from harness.spec import load_spec
    from harness.store import Store

    store = Store(args.results_dir)
    if not args.dry_run:
        store.open_for_writing()  # an unwritable results directory fails now, not after the first cell's work
    if args.device is not None:  # the local executor runs here: the device must exist here
        from harness.devices import check_device

        check_device(args.device, need_available=args.executor == "local" and not args.dry_run)
    spec = load_spec(args.spec)
    cells = spec.cells(args.scale, device=args.device)
    address = getattr(args, "address", None)  # `reproduce` reuses this without the flag
    if address and args.executor != "ray":
        raise PtqbenchError(f"--address {address!r} needs --executor ray (got --executor {args.executor!r})")
    executor = get_executor(args.executor, **({"address": address} if address else {}))
    if args.dry_run:
        todo, skipped = plan(cells, store, retry_failed=not args.no_retry_failed)
        pending = {rid for c in todo for rid in c.run_ids.values()}
        for cell in cells:
            for task in cell.tasks:
                rid = cell.run_ids[task.name]
                mark = "todo" if rid in pending else "skip"
                print(f"{rid}  {mark}  {cell.describe()} | {task.name}")
        print(f"{len(cells)} cells, {sum(len(c.tasks) for c in cells)} runs, {skipped} already recorded")
        return 0
    t0 = time.perf_counter()
    track_state = {"off": args.no_track}
    pending = sum(len(c.tasks) for c in plan(cells, store, retry_failed=not args.no_retry_failed)[0])
    finished = [0]
    progress.announce_stages = True  # a long step (a 5-minute evaluation) is never silent

    def on_record(record: dict) -> None:
        finished[0] += 1
        elapsed = time.perf_counter() - t0
        eta = elapsed / finished[0] * max(pending - finished[0], 0)
        progress.write(f"[{finished[0]}/{pending} {progress.clock(elapsed)} elapsed, ETA {progress.clock(eta)}] "
                       f"{_record_line(record)}")
        _track(record, store.root, track_state)

    try:
        summary = run_matrix(cells, store, executor, retry_failed=not args.no_retry_failed, on_record=on_record)
    finally:
        progress.announce_stages = False
    wall = time.perf_counter() - t0
    if not track_state.get("off") and summary.done + summary.failed:
        _track_summary(spec.name, {rid for c in cells for rid in c.run_ids.values()}, store, track_state)
    progress.write(f"{spec.name}{'/' + args.scale if args.scale else ''}: {summary.total} runs: "
                   f"{summary.done} done, {summary.failed} failed, {summary.skipped} skipped "
                   f"(already recorded{f'; {summary.adopted} adopted: code they ran is unchanged' if summary.adopted else ''}) "
                   f"in {wall:.1f} s; records in {store.runs}")
    cache_bytes, states = store.cache_bytes()
    if states:
        progress.write(f"calibration cache: {_mb(cache_bytes)} in {states} states (`ptqbench cache du`, "
                       f"`ptqbench cache prune --unused`)")
    for line in summary.failures:
        progress.write(f"  failed: {line}")
    return 1 if summary.errors else 0  # a diverged run is a measured outcome, not an error


def _cmd_reproduce(args) -> int:
    from harness.reproduce import paper_spec_path, write_report
    from harness.spec import load_spec
    from harness.store import Store

    args.spec = str(paper_spec_path(args.paper))
    args.dry_run = False
    status = _cmd_run(args)
    spec = load_spec(args.spec)
    path = write_report(spec, spec.cells(args.scale, device=args.device), Store(args.results_dir), args.scale)
    print(f"report: {path}")
    return status


def _cmd_report(args) -> None:
    from harness.reproduce import paper_spec_path, write_report
    from harness.spec import load_spec
    from harness.store import Store

    spec = load_spec(paper_spec_path(args.paper))
    print(f"report: {write_report(spec, spec.cells(args.scale), Store(args.results_dir), args.scale)}")


def _cmd_site(args) -> None:
    from harness.report.leaderboard import headline_leaderboards
    from harness.report.site import build_site, styled_page
    from harness.store import Store, load_results

    store = Store(args.results_dir)
    df = load_results(store.root)
    out = store.root / "leaderboard"
    out.mkdir(parents=True, exist_ok=True)
    boards = headline_leaderboards(df)
    md, html, tex = ([board.to_markdown() for board in boards], [board.to_html() for board in boards],
                     [board.to_latex() for board in boards])
    (out / "leaderboard.md").write_text("\n".join(md) or "(no runs)\n")
    (out / "leaderboard.html").write_text(styled_page("ptqbench leaderboards", "\n".join(html) or "<p>(no runs)</p>"))
    (out / "leaderboard.tex").write_text("\n".join(tex) or "% no runs\n")
    print(f"tables: {out}/leaderboard.{{md,html,tex}}")
    print(f"dashboard: {build_site(df, store.root / 'site')}")


def _cmd_show(args) -> None:
    from harness.store import Store

    print(json.dumps(Store(args.results_dir).find(args.run_id), indent=2, sort_keys=True))


def _cmd_table(args) -> None:
    from harness.report.leaderboard import build_leaderboards
    from harness.store import load_results

    df = load_results(args.results_dir)
    if df.empty:
        print("(no runs recorded)")
        return
    if args.spec:
        if args.spec not in set(df["spec"]):
            raise UnknownNameError("spec name in the recorded runs", args.spec, sorted(set(df["spec"].dropna())))
        df = df[df["spec"] == args.spec]
    if args.metric and args.metric not in set(df["metric"]):
        raise UnknownNameError("metric in the recorded runs", args.metric, sorted(set(df["metric"].dropna())))
    for (model, task), rows in df.groupby(["model", "task"], sort=True):
        metrics = [args.metric] if args.metric else sorted(set(rows["main_metric"].dropna()))
        for metric in metrics or ["ppl"]:
            for board in build_leaderboards(rows, metric, task, model):  # one table per evaluation protocol
                print(board.to_markdown())
                print()


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MB"


def _cmd_cache(args) -> None:
    from harness.store import Store

    store = Store(args.results_dir)
    store.check_readable()
    if args.action == "du":
        entries = store.calib_entries()
        for e in sorted(entries, key=lambda e: -e["bytes"]):
            print(f"{e['key']}  {_mb(e['bytes']):>10}  {'used  ' if e['used'] else 'unused'}  {e['created_at']}  {e['cell']}")
        total = sum(e["bytes"] for e in entries)
        print(f"{len(entries)} calibration states, {_mb(total)} in {store.calib_cache}")
        return
    if args.older_than is not None and args.older_than < 0:
        raise PtqbenchError(f"invalid --older-than {args.older_than:g}; valid: a number of days >= 0")
    removed = store.prune_calib(unused=args.unused, older_than_days=args.older_than, everything=args.all)
    print(f"removed {len(removed)} calibration states, {_mb(sum(e['bytes'] for e in removed))} freed")


def _cmd_export(args) -> None:
    from harness.store import export_parquet

    print(export_parquet(args.out, args.results_dir))


def _cmd_export_model(args) -> None:
    from harness.export import METADATA, export_model

    meta = export_model(args.run_id, args.out_dir, args.results_dir, fmt=args.export_format, fake=args.fake,
                        allow_inexact=args.allow_inexact, allow_code_change=args.allow_code_change,
                        verify=not args.no_verify, device=args.device)
    record = meta["record"]
    metric = record.get("main_metric")
    value = (record.get("metrics") or {}).get(metric) if metric else None
    print(f"{meta['run_id']}: {record['model']} | {record['method_label']} | {record['scheme']} "
          f"({record['task']} {metric}={value}) -> {args.out_dir} as {meta['export_format']}; "
          f"calibration: {meta['calibration']}")
    check = meta.get("verification")
    if check:
        print(f"reloaded with {check['loader']}: {check['bit_identical']}/{check['tensors_compared']} tensors bit-identical"
              + (f", max |diff| {check['max_abs_diff']:.3g}" if check["max_abs_diff"] else ""))
    for item in meta["dropped"]:
        print(f"dropped: {item}")
    print(f"metadata: {Path(args.out_dir) / METADATA}")


def _format_warning(message, category, filename, lineno, line=None, _default=None):
    from harness.store import StoreWarning

    if issubclass(category, StoreWarning):
        return f"{message}\n"  # one line naming the file, no source excerpt
    return _default(message, category, filename, lineno, line)


class Terminated(KeyboardInterrupt):
    """SIGTERM / SIGHUP, raised like Ctrl-C so that every `finally` runs (records kept, Ray shut down)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_terminated(signum, frame):
    raise Terminated(signum)


def _terminate_as_interrupt() -> dict:
    """Install the handlers; returns the previous ones (main() puts them back)."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {sig: signal.signal(sig, _raise_terminated) for sig in (signal.SIGTERM, signal.SIGHUP)}


def main(argv: Sequence[str] | None = None) -> int:
    import functools
    import warnings

    from harness import fingerprint

    fingerprint.start()  # before any computing code runs: records say what they executed

    if not getattr(warnings.formatwarning, "_ptqbench", False):
        fmt = functools.partial(_format_warning, _default=warnings.formatwarning)
        fmt._ptqbench = True  # type: ignore[attr-defined]
        warnings.formatwarning = fmt
    args = _parser().parse_args(argv)
    previous_handlers = _terminate_as_interrupt()
    try:
        if args.command == "run":
            return _cmd_run(args)
        if args.command == "list":
            _cmd_list(args.kind)
        elif args.command == "show":
            _cmd_show(args)
        elif args.command == "table":
            _cmd_table(args)
        elif args.command == "export":
            _cmd_export(args)
        elif args.command == "export-model":
            _cmd_export_model(args)
        elif args.command == "cache":
            _cmd_cache(args)
        elif args.command == "reproduce":
            return _cmd_reproduce(args)
        elif args.command == "report":
            _cmd_report(args)
        elif args.command == "site":
            _cmd_site(args)
        return 0
    except PtqbenchError as exc:
        print(f"ptqbench: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `ptqbench list formats | head`: the reader left; not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (OSError, UnicodeError) as exc:  # an unwritable output, a full disk: one line, not a traceback
        print(f"ptqbench: error: {type(exc).__name__}: {' '.join(str(exc).split())[:500]}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        print("ptqbench: interrupted; finished runs are recorded, rerun to resume", file=sys.stderr)
        return 128 + getattr(exc, "signum", signal.SIGINT)
    finally:
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    sys.exit(main())


def _kv_name(kv) -> str:
    """A KV format's name, or a KV policy in one line (K / V formats, granularity, window, sinks, pre-RoPE)."""
    if hasattr(kv, "name"):
        return kv.name
    fmt = (lambda f: f.name if f is not None else "fp")
    text = f"K {fmt(kv.key)} ({kv.key_granularity}) / V {fmt(kv.value)} ({kv.value_granularity})"
    text += f", window {kv.window}" if kv.window else ""
    text += f", sinks {kv.sinks}" if kv.sinks else ""
    return text + (", pre-RoPE keys" if kv.pre_rope_keys else "")
