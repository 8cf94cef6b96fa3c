#!/usr/bin/env bash
# Quick start, step 1: install QEMU and the test guest, build Tandem, run the demo.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
./scripts/setup.sh
cargo build --release --bin tandem --bin tandem-lab
exec ./target/release/tandem-lab demo "$@"
