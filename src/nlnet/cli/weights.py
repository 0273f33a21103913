"""``nlnet weights``: list, inspect and download the released models (:mod:`nlnet.models.hub`)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from nlnet.models.hub import (
    WeightsEntry,
    WeightsError,
    download_weights,
    get_weights,
    list_weights,
    resolve_weights,
)


# -- the ``nlnet weights`` command ------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "List the released weights (`nlnet weights [PATTERN]`), show one (`nlnet weights info "
        "NAME`) or download, verify and convert them into the torch hub cache (`nlnet weights "
        "download NAME...`)."
    )
    parser.add_argument(
        "words",
        nargs="*",
        metavar="ARG",
        help="[PATTERN] | info NAME | download NAME... (PATTERN: shell-style, e.g. '*nl5*')",
    )
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument(
        "--offline", action="store_true", help="download: never use the network (cache only)"
    )
    parser.add_argument(
        "--cache-dir",
        default=None,
        help="download: cache folder (default $TORCH_HOME/hub/checkpoints)",
    )
    parser.add_argument(
        "--raw",
        action="store_true",
        help="download: only fetch and verify the publisher's file, do not convert",
    )
    parser.add_argument("--quiet", action="store_true", help="download: no progress bar")


def _fmt_score(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"


def _print_table(entries: list[WeightsEntry]) -> None:
    rows = [("name", "arch", "source", "top-1", "top-5", "frames", "protocol / kind", "url")]
    for e in entries:
        clip = f"{e.frames}x{e.stride}" if e.frames else "-"
        what = e.protocol if e.kind == "classifier" else f"init ({e.dataset})"
        if e.kind == "classifier" and not e.convertible:
            what += " [download only]"
        url = e.url + (f" :: {e.member}" if e.member else "")
        rows.append(
            (e.name, e.arch, e.source, _fmt_score(e.top1), _fmt_score(e.top5), clip, what, url)
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r[:-1], widths)) + "  " + r[-1])


def run(args: argparse.Namespace) -> int:
    words: list[str] = list(args.words)
    action = words[0] if words and words[0] in ("download", "info", "list") else "list"
    if words and words[0] in ("download", "info", "list"):
        words = words[1:]
    try:
        if action == "list":
            if len(words) > 1:
                print(f"nlnet weights: error: one PATTERN expected, got {words}", file=sys.stderr)
                return 2
            entries = list_weights(words[0] if words else "*")
            if not entries:
                print(f"nlnet weights: no registered weights match {words[0]!r}", file=sys.stderr)
                return 1
            if args.json:
                print(json.dumps([e.to_dict() for e in entries], indent=2))
            else:
                _print_table(entries)
            return 0
        if not words:
            print(f"nlnet weights {action}: error: give at least one NAME", file=sys.stderr)
            return 2
        if action == "info":
            entries = [get_weights(n) for n in words]
            if args.json:
                print(json.dumps([e.to_dict() for e in entries], indent=2))
            else:
                for e in entries:
                    for k, v in e.to_dict().items():
                        print(f"{k:18s} {v}")
                    print()
            return 0
        # download
        failed = 0
        results: list[dict[str, Any]] = []
        for name in words:
            try:
                entry = get_weights(name)
                if args.raw or not entry.convertible:
                    path = download_weights(
                        entry,
                        offline=args.offline,
                        progress=not args.quiet,
                        cache_dir=args.cache_dir,
                    )
                else:
                    path = resolve_weights(
                        entry,
                        offline=args.offline,
                        progress=not args.quiet,
                        cache_dir=args.cache_dir,
                    )
                results.append({"name": name, "path": str(path)})
                if not args.json:
                    print(f"{name}: {path}")
            except (WeightsError, ValueError, OSError) as err:
                failed += 1
                results.append({"name": name, "error": str(err)})
                print(f"nlnet weights download: {name}: error: {err}", file=sys.stderr)
        if args.json:
            print(json.dumps(results, indent=2))
        return 1 if failed else 0
    except ValueError as err:
        print(f"nlnet weights: error: {err}", file=sys.stderr)
        return 1
