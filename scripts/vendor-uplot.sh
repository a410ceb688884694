#!/usr/bin/env bash
# Refreshes the vendored uPlot (the dashboard's chart library) from the npm registry: ./scripts/vendor-uplot.sh [version]
set -euo pipefail; v="${1:-1.6.32}"; d="$(cd "$(dirname "$0")/.." && pwd)/crates/metric/assets"; t="$(mktemp -d)"; trap 'rm -rf "$t"' EXIT; (cd "$t" && npm pack --silent "uplot@$v" >/dev/null && tar xzf "uplot-$v.tgz") && cp "$t/package/dist/uPlot.iife.min.js" "$t/package/dist/uPlot.min.css" "$d/" && cp "$t/package/LICENSE" "$d/LICENSE-uPlot.txt" && echo "$v" > "$d/uPlot.VERSION" && echo "uPlot $v vendored in $d"
