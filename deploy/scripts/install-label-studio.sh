#!/usr/bin/env bash
# Installs an unmodified Label Studio from PyPI into its own virtual environment (default .venv-label-studio),
# apart from the service's .venv: its pinned Django stack must not meet the service's dependencies.
# Idempotent: a venv whose `label-studio --version` already answers is kept. Never fails hard: without network
# it says why and exits 0; the tests that need Label Studio then skip with that reason.
#   LABEL_STUDIO_VENV     where to install (default: .venv-label-studio at the repository root)
#   LABEL_STUDIO_VERSION  pip specifier (default: 1.23.*, the version the protocol notes were measured with)
set -u

root="$(cd "$(dirname "$0")/../.." && pwd)"
venv="${LABEL_STUDIO_VENV:-$root/.venv-label-studio}"
version="${LABEL_STUDIO_VERSION:-1.23.*}"
python="${PYTHON:-python3}"

if [ -x "$venv/bin/label-studio" ] && "$venv/bin/python" -c "import label_studio" >/dev/null 2>&1; then
    echo "install-label-studio: present in $venv ($("$venv/bin/python" -c 'import label_studio; print(label_studio.__version__)'))"
    exit 0
fi

if [ ! -x "$venv/bin/python" ]; then
    if ! "$python" -m venv "$venv"; then
        echo "install-label-studio: could not create $venv with $python -m venv; Label Studio tests will skip"
        exit 0
    fi
fi

echo "install-label-studio: installing label-studio==$version into $venv (about 150 s and 1 GB)"
# nice: the install competes with the test run on small machines
if ! nice -n 10 "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "label-studio==$version"; then
    echo "install-label-studio: pip install label-studio==$version failed (PyPI unreachable?); Label Studio tests will skip"
    exit 0
fi
echo "install-label-studio: installed $("$venv/bin/python" -c 'import label_studio; print(label_studio.__version__)') in $venv"
exit 0
