#!/usr/bin/env bash
# Fuzzes the agent's API from its own OpenAPI document with schemathesis (from PyPI), for a
# bounded number of examples per operation, against a one-host cluster whose QEMU binary is a
# harmless stand-in (it sleeps) and whose policy lets no spec reach a real file. Every check
# schemathesis has but one: it fails on any server error, undocumented status code or content
# type, response not matching its schema, schema-violating request the agent accepts, or
# unsupported method not answered 405. Request and response schemas are generated from the API's
# types (tandem_agent::views), so the fuzzer sends well-formed bodies and checks every answer's
# shape. Left out: "a schema-valid request must be accepted" — the agent validates more than a
# schema says (sizes within a host's capacity, names, paths its policy allows, conflicts), and
# answers those 400/409 by design. Run by scripts/test.sh; usage: scripts/fuzz-api.sh [path/to/tandem]
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
bin=${1:-$here/target/debug/tandem}
examples=${TANDEM_FUZZ_EXAMPLES:-100}
venv="$here/.cache/fuzz-venv"
if [ ! -x "$venv/bin/schemathesis" ]; then
  python3 -m venv "$venv" 2>/dev/null || {
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-venv >/dev/null
    python3 -m venv "$venv"
  }
  "$venv/bin/pip" install -q schemathesis==4.32.5
fi

work=$(mktemp -d /tmp/tandem-fuzz.XXXXXX)
agent_pid=
cleanup() {
  if [ -n "$agent_pid" ]; then kill "$agent_pid" 2>/dev/null || true; wait "$agent_pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

ip=127.0.0.1
port=7491
mkdir -p "$work/data" "$work/images"
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$work/secret"
chmod 600 "$work/secret"
# The stand-in "QEMU": whatever arguments a fuzzed spec produces, it runs nothing but a sleep.
printf '#!/bin/sh\nexec sleep 20\n' > "$work/fake-qemu"
chmod 755 "$work/fake-qemu"
cat > "$work/agent.toml" <<EOF
host_id = 0
name = "fuzz0"
api_addr = "$ip:$port"
heartbeat_addr = "$ip:$((port + 1))"
data_dir = "$work/data"
heartbeat_disk = "$work/heartbeat.disk"
secret_file = "$work/secret"
driver = "qemu"
capacity = { vcpus = 8, memory_mib = 8192 }
[qemu]
binary = "$work/fake-qemu"
accel = "tcg"
[policy]
path_prefixes = ["$work/images"]
EOF
"$bin" disk format --config "$work/agent.toml" >/dev/null
RUST_LOG=warn "$bin" agent --config "$work/agent.toml" > "$work/agent.log" 2>&1 &
agent_pid=$!
export TANDEM_SECRET_FILE="$work/secret"
for _ in $(seq 100); do
  "$bin" --api "$ip:$port" cluster status >/dev/null 2>&1 && break
  sleep 0.2
done
"$bin" --api "$ip:$port" cluster init >/dev/null
# A name the fuzzer cannot guess, so that DELETE /v1/tokens/{name} never revokes it mid-run.
token=$("$bin" --api "$ip:$port" token create "fuzz-$(head -c 8 /dev/urandom | od -An -tx1 | tr -d ' \n')" --role admin | tail -1)

# /v1/hosts/join would make the agent call whatever address the fuzzer invents, and
# /v1/hosts/{name}/shutdown stops the agent under test by design (the first time the fuzzer
# names its host, the run would end). /raft/* and
# /v1/internal/* take the cluster token, not an API token: fuzzed, they must all answer 401.
status=0
# From the scratch directory: schemathesis keeps a cache in the directory it runs in.
(cd "$work" && "$venv/bin/schemathesis" run "http://$ip:$port/v1/openapi.json" \
  --header "Authorization: Bearer $token" \
  --checks all --exclude-checks positive_data_acceptance \
  --exclude-path /v1/hosts/join \
  --exclude-path '/v1/hosts/{name}/shutdown' \
  --max-examples "$examples" --phases examples,coverage,fuzzing \
  --request-timeout 10 --no-color --report junit --report-dir "$work/report") || status=$?
if ! kill -0 "$agent_pid" 2>/dev/null; then
  echo "the agent died during the fuzzing run:"; tail -20 "$work/agent.log"; exit 1
fi
if [ "$status" -ne 0 ]; then
  echo "API fuzzing found problems (agent log tail below)"; tail -20 "$work/agent.log"
fi
exit "$status"
