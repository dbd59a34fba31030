"""How precise are the paper reports' comparisons? The 95% interval half-width of every compared ratio.

    python benchmarks/ci_widths.py [--papers DIR] [--out FILE]

Reads every `<DIR>/<paper>/claims.json` (default: results/examples/papers) and writes a Markdown table
(default: results/examples/papers/ci_widths.md): per paper and model, each comparison's ratio, its 95%
interval, the relative half-width and whether it was paired, plus the median half-width per paper. The
smoke-scale target is a half-width of at most 5% for a paper's key comparisons (issue #12): this file is
where the achieved widths are recorded.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def widths(papers: Path) -> list[dict]:
    rows = []
    for claims_file in sorted(papers.glob("*/claims.json")):
        for claim in json.loads(claims_file.read_text()):
            for c in claim.get("comparisons") or []:
                if "ratio_ci95" not in c:
                    continue
                low, high = c["ratio_ci95"]
                rows.append({"paper": claims_file.parent.name, "model": claim.get("model") or "–", "claim": claim["id"],
                             "verdict": claim["verdict"], "ratio": c["ratio"], "low": low, "high": high,
                             "half_width": (high - low) / 2 / abs(c["ratio"]) if c["ratio"] else float("inf"),
                             "paired": c["paired"]})
    return rows


def markdown(rows: list[dict]) -> str:
    out = ["# 95% interval half-widths of the paper reports' comparisons", "",
           "Relative half-width = (high - low) / 2 / ratio; target at smoke scale: <= 5% for the key comparisons.", "",
           "| paper | model | median half-width | comparisons <= 5% |", "|---|---|---|---|"]
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["paper"], r["model"]), []).append(r)
    for (paper, model), rs in groups.items():
        hw = [r["half_width"] for r in rs]
        out.append(f"| {paper} | {model} | {statistics.median(hw):.1%} | {sum(h <= 0.05 for h in hw)} / {len(hw)} |")
    out += ["", "| paper | model | claim | verdict | ratio | 95% interval | half-width | paired |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['paper']} | {r['model']} | {r['claim']} | {r['verdict']} | {r['ratio']:.4g} | "
                   f"{r['low']:.4g} – {r['high']:.4g} | {r['half_width']:.1%} | {'yes' if r['paired'] else 'no'} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--papers", type=Path, default=ROOT / "results" / "examples" / "papers")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    out = args.out or args.papers / "ci_widths.md"
    out.write_text(markdown(widths(args.papers)))
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
