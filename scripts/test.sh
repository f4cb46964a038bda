#!/usr/bin/env bash
# pier's whole test suite, as CI runs it: install the real clients the interop tier drives and
# the network tools of the cluster tier, then the gate (format, lints) and every test, interop
# and cluster tiers included (the cluster tier needs root: it skips, saying so, without).
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages the interop tier needs, by the command each provides. docker.io brings
# dockerd and the docker CLI (and depends on containerd and runc); podman brings conmon, runc
# and the containers configuration it reads. Run as root with the vfs storage driver, neither
# needs uidmap or fuse-overlayfs; gzip (essential on Debian) unpacks the layers they push.
# The cluster tier puts each node in a network namespace (ip), cuts nodes off with iptables,
# slows a link with tc, and drops root for skopeo inside a namespace with setpriv.
declare -A packages=([skopeo]=skopeo [containerd]=containerd [ctr]=containerd
    [docker-registry]=docker-registry [openssl]=openssl
    [docker]=docker.io [dockerd]=docker.io [podman]=podman [gzip]=gzip
    [ip]=iproute2 [tc]=iproute2 [iptables]=iptables [setpriv]=util-linux [curl]=curl [htpasswd]=apache2-utils
    [systemd-analyze]=systemd [promtool]=prometheus [python3]=python3 [pip3]=python3-pip
    [chromium]=chromium)
missing=()
for cmd in "${!packages[@]}"; do
    command -v "$cmd" >/dev/null 2>&1 || missing+=("${packages[$cmd]}")
done
if ((${#missing[@]})); then
    echo "installing: ${missing[*]}"
    if [[ $(id -u) -ne 0 ]]; then
        echo "error: need root (or sudo) to apt-get install ${missing[*]}" >&2
        exit 1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        $(printf '%s\n' "${missing[@]}" | sort -u) >/dev/null
fi

# The deploy tier renders and lints the Helm chart offline with Helm's own SDK and checks the
# rendered objects against the Kubernetes schema (crates/pier/tests/deploy.rs); the dashboard
# test drives Debian's chromium with Playwright (crates/pier/tests/ui.rs).
python_packages=(helm-python-sdk==0.2.2 kubernetes-validate==1.37.0 playwright==1.65.2)
if ! python3 -c 'import helm_python, kubernetes_validate, playwright' 2>/dev/null; then
    echo "installing: ${python_packages[*]} (pip)"
    python3 -m pip install --quiet --disable-pip-version-check --break-system-packages \
        "${python_packages[@]}" 2>/dev/null ||
        python3 -m pip install --quiet --disable-pip-version-check "${python_packages[@]}"
fi
# A real S3-compatible server and a real PostgreSQL for the storage tests, the HA tier and the
# API tier's second run (scripts/storage-services.sh; stopped when this script exits).
source scripts/storage-services.sh
trap storage_services_stop EXIT
storage_services_start

echo "== cargo fmt --check"
cargo fmt --all --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
echo "== cargo test (interop and cluster tiers on)"
PIER_INTEROP=1 PIER_CLUSTER=1 cargo test --workspace
echo "== cargo test: the API and mirror tiers (eviction too) and the collector's races again, on S3 + PostgreSQL"
PIER_TEST_BACKEND=s3pg cargo test -p pier-server --test api --test mirror
PIER_TEST_BACKEND=s3pg cargo test -p pier-registry --test gc
