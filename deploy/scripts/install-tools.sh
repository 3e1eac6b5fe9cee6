#!/usr/bin/env bash
# Installs the outside tools the integration tests drive, from Debian packages, when missing:
#   prometheus      -> `prometheus` and `promtool` (real scrape + query API, `promtool check metrics`)
#   docker-compose  -> `docker-compose config -q` validates docker-compose*.yml without a Docker engine
#   nginx           -> deploy/nginx/nginx.conf run in front of live replicas (tests/integration/test_replicas.py)
#   chromium        -> headless browser rendering /docs and /redoc offline (tests/integration/test_docs_browser.py)
# Never fails hard: when a tool cannot be installed it says why and exits 0; the tests that need it
# then skip with a clear message.
set -u

missing=()
command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
command -v docker-compose >/dev/null 2>&1 || missing+=(docker-compose)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing+=(nginx)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)

if [ ${#missing[@]} -eq 0 ]; then
    echo "install-tools: prometheus, promtool, docker-compose, nginx and chromium already present"
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-tools: apt-get not found; cannot install ${missing[*]} (integration tests needing them will skip)"
    exit 0
fi

sudo_cmd=()
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        sudo_cmd=(sudo -n)
    else
        echo "install-tools: not root and no passwordless sudo; cannot install ${missing[*]} (tests needing them will skip)"
        exit 0
    fi
fi

echo "install-tools: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
if ! "${sudo_cmd[@]}" apt-get update -qq; then
    echo "install-tools: apt-get update failed (no network?); trying the existing package lists"
fi
if ! "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"; then
    echo "install-tools: apt-get install ${missing[*]} failed; tests needing them will skip"
    exit 0
fi

# The Debian packages start prometheus/nginx daemons where an init system runs; the tests start their
# own on free loopback ports.
for tool in prometheus promtool docker-compose /usr/sbin/nginx chromium; do
    if command -v "$tool" >/dev/null 2>&1; then
        echo "install-tools: $tool -> $(command -v "$tool")"
    else
        echo "install-tools: $tool still missing after install"
    fi
done
exit 0
