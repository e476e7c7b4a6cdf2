#!/usr/bin/env bash
# Regenerates the configuration reference (docs/configuration.md) from the
# binaries' own --help: every block between `<!-- help: COMMAND -->` and
# `<!-- end help -->` becomes COMMAND's output. router/tests/docs_help.rs
# and keygen/tests/docs_help.rs fail when a block and its command differ,
# so the reference cannot drift from the flags.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked -p tunmesh-router -p tunmesh-keygen >&2
python3 - <<'PY'
import re, subprocess
p = "docs/configuration.md"
s = open(p).read()
def block(m):
    cmd = m.group(1).split()
    out = subprocess.run(["target/release/" + cmd[0]] + cmd[1:], env={},
                         capture_output=True, text=True, check=True).stdout
    return "<!-- help: %s -->\n```text\n%s\n```\n<!-- end help -->" % (m.group(1), out.rstrip())
s = re.sub(r"<!-- help: (.*?) -->.*?<!-- end help -->", block, s, flags=re.S)
open(p, "w").write(s)
PY
echo "docs/configuration.md: reference regenerated" >&2
