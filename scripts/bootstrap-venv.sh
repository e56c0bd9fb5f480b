#!/usr/bin/env bash
# Create .venv in the repo root (if needed) and install the package with its
# dev extras. The install only reruns when pyproject.toml is newer than
# .venv/.installed-stamp, so repeated `make test` stays fast.
set -euo pipefail

say() { echo "bootstrap-venv: $*"; }
die() { echo "bootstrap-venv: error: $*" >&2; exit 1; }

cd "$(dirname "${BASH_SOURCE[0]}")/.."
[[ -f pyproject.toml ]] || die "pyproject.toml not found in $(pwd)"

command -v python3 >/dev/null 2>&1 || die "python3 not found; install Python >= 3.11"
pyver=$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || die "python3 is $pyver but nobs_amqp needs Python >= 3.11 (put a newer python3 first on PATH)"

# A venv is usable only if it has pip: a failed `python3 -m venv` (no
# ensurepip) leaves .venv/bin/python behind without pip.
venv_ok() { [[ -x .venv/bin/python ]] && .venv/bin/python -m pip --version >/dev/null 2>&1; }

if ! venv_ok; then
    say "creating .venv with python3 $pyver"
    if ! python3 -m venv --clear .venv; then
        # Debian/Ubuntu ship venv/ensurepip in a separate package.
        [[ -f /etc/debian_version && $(id -u) == 0 ]] \
            || die "python3 -m venv failed; on Debian/Ubuntu install python3-venv (or python$pyver-venv) and rerun"
        say "installing python3-venv with apt-get"
        apt-get update -q
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-venv
        python3 -m venv --clear .venv || die "python3 -m venv still fails; try: apt-get install python$pyver-venv"
    fi
fi

# -nt is also true when the stamp does not exist yet.
if [[ pyproject.toml -nt .venv/.installed-stamp ]]; then
    say "installing nobs_amqp[dev] into .venv"
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -e '.[dev]'
    touch .venv/.installed-stamp
else
    say ".venv is up to date"
fi
