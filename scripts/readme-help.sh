#!/usr/bin/env bash
# Regenerates the README's configuration reference from `tunmesh-router
# --help` (router/tests/readme_help.rs fails when the two differ).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked -p tunmesh-router --bin tunmesh-router >&2
help=$(env -i target/release/tunmesh-router --help)
python3 - "$help" <<'PY'
import re, sys
help = sys.argv[1]
p = "README.md"
s = open(p).read()
start, end = "<!-- router-help:start -->", "<!-- router-help:end -->"
a, b = s.index(start) + len(start), s.index(end)
s = s[:a] + "\n```text\n" + help + "\n```\n" + s[b:]
open(p, "w").write(s)
PY
echo "README.md: configuration reference updated" >&2
