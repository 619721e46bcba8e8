#!/usr/bin/env bash
# Installs layergrad (server and SDK) into a virtual environment. `make setup`, CI and the Dockerfile
# all run this script, so every install step an image uses is exercised by CI.
#
# Chainer 7.8.1 ships only as an sdist that needs pkg_resources at build time: it is installed first,
# with setuptools<81 and without build isolation, then the package with its server extras.
set -euo pipefail

usage() {
    cat <<'USAGE'
usage: scripts/install.sh [--venv DIR] [--dev] [--no-editable]

  --venv DIR      virtual environment to create or update (default: .venv)
  --dev           also install the dev tools (pytest, ruff, grpcio-tools, ...)
  --no-editable   install a copy of the package instead of an editable one (images)

$PYTHON picks the interpreter that creates the environment (default: python3).
USAGE
}

venv=.venv
extras=server
editable=(-e)
while [ $# -gt 0 ]; do
    case "$1" in
        --venv) venv="${2:?--venv needs a directory}"; shift 2 ;;
        --dev) extras=server,dev; shift ;;
        --no-editable) editable=(); shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "install.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
    esac
done

cd "$(dirname "$0")/.."
"${PYTHON:-python3}" -m venv "$venv"
pip=("$venv/bin/python" -m pip)
"${pip[@]}" install --upgrade pip "setuptools>=77,<81" wheel
"${pip[@]}" install --no-build-isolation "chainer==7.8.1"
"${pip[@]}" install "${editable[@]}" ".[$extras]"
