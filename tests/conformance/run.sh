#!/usr/bin/env bash
# Runs the verification cases of the public sigstore-conformance suite against fixity's
# verifier, through the adapter beside this script. By hand, not part of tests/run.sh: the
# suite is fetched separately and never committed.
#
# Usage: tests/conformance/run.sh SUITE_DIR [PYTEST_ARGS...]
#   SUITE_DIR   a checkout of github.com/sigstore/sigstore-conformance
#
# It builds the adapter (cargo build --example conformance), makes a Python virtualenv with
# the suite's requirements (from PyPI, in a temporary directory), and runs
#   pytest SUITE_DIR/test --skip-signing --entrypoint <adapter>
# The suite fetches an OIDC token for its signing tests even when it skips them; this
# machine has no network beyond package registries, so a pytest plugin written here answers
# that fetch with an unsigned placeholder token (the verification tests only read its claims).
set -euo pipefail

suite=$(cd "${1:?usage: $0 SUITE_DIR [PYTEST_ARGS...]}" && pwd)
shift
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)

cargo build --quiet --manifest-path "$root/Cargo.toml" --example conformance
adapter=$(cargo metadata --quiet --format-version 1 --manifest-path "$root/Cargo.toml" --no-deps \
  | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/debug/examples/conformance

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m venv "$work/venv"
"$work/venv/bin/pip" install --quiet -r "$suite/requirements.txt"
cat >"$work/fixity_offline.py" <<'PY'
# Loaded with -p before the suite's conftest imports urllib3.request: the testing-token fetch
# gets an unsigned placeholder token instead of a network error.
import base64
import json
import time

import urllib3


def _part(value):
    return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=")


class _Token:
    status = 200
    data = b".".join([
        _part({"alg": "none"}),
        _part({"email": "unused@fixity.invalid", "iss": "https://fixity.invalid",
               "exp": int(time.time()) + 3600}),
        b"",
    ])


urllib3.request = lambda *args, **kwargs: _Token()
PY

cd "$suite"
PYTHONPATH="$work" "$work/venv/bin/python" -m pytest test -p fixity_offline --skip-signing \
  --entrypoint "$adapter" -q -rfE "$@"
