#!/usr/bin/env bash
# Prints the medians of the last `cargo bench` run as a Markdown table, with the ratio of each
# peer to Tollgate. Run from bench/ after `cargo bench --bench decide`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
python3 - <<'PY'
import json, pathlib
root = pathlib.Path("target/criterion")
rows = {}
for est in sorted(root.glob("*/*/new/estimates.json")):
    engine = est.parent.parent.name
    scenario = est.parent.parent.parent.name.replace("_", "/", 1)
    rows.setdefault(scenario, {})[engine] = json.loads(est.read_text())["median"]["point_estimate"]
def fmt(ns):
    return f"{ns/1000:.2f} µs" if ns >= 1000 else f"{ns:.0f} ns"
print("| scenario | tollgate | cedar-policy | regorus | cedar / tollgate | regorus / tollgate |")
print("|---|---|---|---|---|---|")
for scenario, r in rows.items():
    t = r.get("tollgate")
    cells = [fmt(r[e]) if e in r else "n/a" for e in ("tollgate", "cedar", "regorus")]
    ratios = [f"{r[e]/t:.1f}x" if e in r and t else "n/a" for e in ("cedar", "regorus")]
    print(f"| {scenario} | " + " | ".join(cells + ratios) + " |")
PY
