#!/usr/bin/env bash
# Creates (or reuses) the virtual environment of the real KServe v2 clients the tests run:
# tritonclient[grpc] and kserve. Both need protobuf < 7, which layergrad's own environment
# cannot use, so they live in a separate one; the tests run each client in its own
# subprocess (the two register the same inference.* protobuf messages and cannot share one).
#
# The environment is reused while its stamp names the same requirements; otherwise it is
# built again from scratch. Prints the environment's python on the last line.
set -euo pipefail

usage() {
    cat <<'USAGE'
usage: scripts/client_env.sh [--venv DIR]

  --venv DIR   the environment to create or reuse (default: .venv-clients)

$PYTHON picks the interpreter that creates it (default: python3).
USAGE
}

venv=.venv-clients
while [ $# -gt 0 ]; do
    case "$1" in
        --venv) venv="${2:?--venv needs a directory}"; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "client_env.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
    esac
done

cd "$(dirname "$0")/.."
requirements=("tritonclient[grpc]==2.73.0" "kserve==0.21.0")
stamp="$venv/.layergrad-clients"
wanted="${requirements[*]}"

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$wanted" ] && "$venv/bin/python" -c "import tritonclient.grpc" 2>/dev/null; then
    echo "$venv/bin/python"
    exit 0
fi

started=$(date +%s)
rm -rf "$venv"
"${PYTHON:-python3}" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check "${requirements[@]}" >&2
echo "$wanted" > "$stamp"
echo "client_env.sh: built $venv in $(( $(date +%s) - started ))s" >&2
echo "$venv/bin/python"
