#!/usr/bin/env bash
# Quick start, step 2: the whole test suite (unit, property, integration with real agents, real
# QEMU guests and network namespaces). Needs root for namespaces; installs what it needs.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
./scripts/setup.sh
# Only the tests need these, not the demo: headless Chromium for the dashboard test, openssl
# for the TLS test's throwaway CA, python3 for the HTTP services the power-loss test probes.
test_pkgs=()
command -v chromium >/dev/null || test_pkgs+=(chromium)
command -v openssl >/dev/null || test_pkgs+=(openssl)
command -v python3 >/dev/null || test_pkgs+=(python3)
if ((${#test_pkgs[@]})); then
  echo "installing: ${test_pkgs[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${test_pkgs[@]}" >/dev/null
fi
export TANDEM_GUEST_DIR="$here/.cache/guest"
# Style and lints first: the workspace lints (clippy all and unwrap_used denied) on every target,
# and rustfmt with the project's rustfmt.toml.
command -v cargo-clippy >/dev/null && command -v rustfmt >/dev/null || rustup component add clippy rustfmt
cargo fmt --all --check
cargo clippy --workspace --all-targets -- -D warnings
cargo build --bin tandem
# The API fuzzed from its own OpenAPI document (schemathesis from PyPI), bounded.
./scripts/fuzz-api.sh "$here/target/debug/tandem"
# Cluster tests share two cores with real guests: run them one at a time so timing stays honest.
cargo test --workspace --exclude tandem-sim --no-fail-fast -- --test-threads=1
# The deterministic simulator (hundreds of seeds) runs optimized: see [profile.sim].
cargo test --profile sim -p tandem-sim --no-fail-fast
