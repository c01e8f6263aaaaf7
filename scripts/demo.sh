#!/usr/bin/env bash
# `make demo`: a whole fleet on this machine, then a short fleetctl tour.
#
# A manager on its embedded SQLite and two daemons (node-1 env=prod,
# node-2 env=staging, separate state dirs and ports). The daemons enroll as
# a real host would: a join token per node (`fleetctl tokens create`), then
# `fleet-daemon enroll`, which makes the node's key on the spot and gets its
# short-lived certificate from the manager's issuing CA (an intermediate of
# the demo's root, `fleetctl pki intermediate`). Each daemon's own TOML
# runs a plain process (python's http.server) and an SDK agent, `fleet-agent
# run worker` (checksums files dropped into its inbox). The tour then deploys
# a third agent centrally: configs/definitions/probe.toml (`fleet-agent run
# probe`, checking the manager) is applied to both nodes, and a second
# revision of it rolls out node by node, gated by its heartbeat health.
# Last it runs a job on both nodes (configs/jobs/report.toml: three steps,
# one node at a time) and lists it.
#
# Runs until Ctrl-C, then stops everything. DEMO_ONESHOT=1 exits 0 after the
# tour (the test suite does that). DEMO_DIR (default var/demo) holds
# certificates, configs, state and logs; it is reused, never committed.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
bin=$root/.venv/bin
demo=${DEMO_DIR:-$root/var/demo}
certs=$demo/certs
# Unix socket paths must stay under 108 bytes, so the daemons' run dirs live
# in a short temporary directory rather than under a possibly deep checkout.
run_base=$(mktemp -d /tmp/fleet-demo.XXXXXX)
pids=()

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
die() { echo "demo: $*" >&2; exit 1; }

stop_all() {
    local status=$?
    trap - EXIT INT TERM
    if ((${#pids[@]})); then
        say "stopping the fleet"
        kill -TERM "${pids[@]}" 2>/dev/null || true
        wait "${pids[@]}" 2>/dev/null || true
    fi
    rm -rf "$run_base"
    exit "$status"
}
trap stop_all EXIT
trap 'exit 130' INT TERM

# Free loopback ports, chosen now so two demos (or a demo and the tests)
# never collide.
read -r manager_port enroll_port node1_port node2_port web1_port web2_port < <(
    "$bin/python" - <<'EOF'
import socket
socks = [socket.socket() for _ in range(6)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))
EOF
)

mkdir -p "$demo"
# The root CA, the manager's and the operator's certificates; nodes get theirs by enrolling.
"$root/scripts/generate_test_certs.sh" --out "$certs" >/dev/null
if ! "$bin/fleetctl" pki intermediate "$certs/issuer" --ca-dir "$certs" --force >/dev/null 2>&1; then
    # A root from an older demo run may only sign leaves (pathlen 0): make a new one.
    "$root/scripts/generate_test_certs.sh" --out "$certs" --force-ca >/dev/null
    "$bin/fleetctl" pki intermediate "$certs/issuer" --ca-dir "$certs" --force >/dev/null
fi

cat >"$demo/manager.toml" <<EOF
state_dir = "$demo/manager"
[server]
listen = "127.0.0.1:$manager_port"
metrics_listen = ""
[tls]
ca_file = "$certs/ca.pem"
cert_file = "$certs/manager-manager.pem"
key_file = "$certs/manager-manager-key.pem"
[enroll]
listen = "127.0.0.1:$enroll_port"
manager_address = "127.0.0.1:$manager_port"
issuer_cert_file = "$certs/issuer/issuer.pem"
issuer_key_file = "$certs/issuer/issuer-key.pem"
node_cert_days = 1.0
[liveness]
# A small fleet: short heartbeats, and nobody marked offline at start.
min_ttl_seconds = 5.0
grace_seconds = 5.0
failover_grace_seconds = 15.0
EOF

# write_daemon NAME PORT WEB_PORT ENV ZONE
write_daemon() {
    local name=$1 port=$2 web=$3 env=$4 zone=$5 dir=$demo/$1
    mkdir -p "$dir/inbox" "$dir/done" "$dir/www"
    echo "hello from $name" >"$dir/www/index.html"
    cat >"$demo/$name.toml" <<EOF
listen = "127.0.0.1:$port"
state_dir = "$dir/state"
run_dir = "$run_base/$name"
log_dir = "$dir/logs"
metrics_listen = ""
stop_agents_on_exit = true
[labels]
env = "$env"
zone = "$zone"
[tls]
# Written by fleet-daemon enroll; the daemon renews them itself.
ca_file = "$dir/tls/ca.pem"
cert_file = "$dir/tls/node.pem"
key_file = "$dir/tls/node-key.pem"
[manager]
addresses = ["127.0.0.1:$manager_port"]
metrics_interval_seconds = 2.0

[[agents]]
id = "web"
type = "http-server"
argv = ["$bin/python", "-m", "http.server", "--bind", "127.0.0.1", "--directory", "$dir/www", "$web"]
restart = "always"

[[agents]]
id = "worker"
type = "worker"
version = "1.0"
argv = ["$bin/fleet-agent", "run", "worker"]
cwd = "$dir"
restart = "always"
health = { kind = "heartbeat", timeout = 15.0 }
config = '{"inbox": "$dir/inbox", "outbox": "$dir/done", "batch_size": 5, "pace_seconds": 1.0}'
EOF
}
write_daemon node-1 "$node1_port" "$web1_port" prod a
write_daemon node-2 "$node2_port" "$web2_port" staging b

# Tables stay readable when the tour's output is piped or captured.
export COLUMNS=${COLUMNS:-160}
export FLEET_MANAGER=127.0.0.1:$manager_port
export FLEET_CA=$certs/ca.pem FLEET_CERT=$certs/operator-admin.pem FLEET_KEY=$certs/operator-admin-key.pem
fleetctl() { "$bin/fleetctl" "$@"; }
# The central probe's argv is plain `fleet-agent`: the daemons find it in PATH.
export PATH=$bin:$PATH

# The definition the tour applies: the committed example with this manager's
# port, and its second revision (a new version and a slower probe interval).
sed "s#tcp://127.0.0.1:7443#tcp://127.0.0.1:$manager_port#" \
    "$root/configs/definitions/probe.toml" >"$demo/probe.toml"
sed -e 's/^version = "1.0"/version = "1.1"/' -e 's/interval_seconds = 2,/interval_seconds = 5,/' \
    "$demo/probe.toml" >"$demo/probe-v2.toml"

say "starting fleet-manager on 127.0.0.1:$manager_port (SQLite in $demo/manager), enrollment on :$enroll_port"
"$bin/fleet-manager" serve --config "$demo/manager.toml" >"$demo/manager.log" 2>&1 &
pids+=($!)

# wait_for SECONDS WHAT CMD...: retry CMD until it succeeds.
wait_for() {
    local deadline=$((SECONDS + $1)) what=$2
    shift 2
    until "$@" >/dev/null 2>&1; do
        for pid in "${pids[@]}"; do
            kill -0 "$pid" 2>/dev/null || die "a fleet process exited; see $demo/*.log"
        done
        ((SECONDS < deadline)) || die "timed out waiting for $what; see $demo/*.log"
        sleep 0.5
    done
}
count_running() {
    fleetctl -o json agents list | "$bin/python" -c '
import json, sys
rows = json.load(sys.stdin)
rows = rows.get("agents", rows) if isinstance(rows, dict) else rows
running = [r for r in rows if str(r.get("status", "")).upper().endswith("RUNNING")]
sys.exit(0 if len(running) >= int(sys.argv[1]) else 1)' "$1"
}
wait_for 30 "the manager to answer" fleetctl tokens list

# One token per node, made for its name (--node-name also lets a demo run
# again re-enroll a node the manager already knows); tier=demo is granted
# to the node as an operator label.
for name in node-1 node-2; do
    say "fleetctl tokens create --node-name $name --labels tier=demo --ttl 10m"
    fleetctl -o json tokens create --node-name "$name" --labels tier=demo --ttl 10m \
        --description "make demo" >"$demo/$name.token.json"
    read -r token ca_hash < <("$bin/python" -c '
import json, sys
t = json.load(open(sys.argv[1]))
print(t["token"], t["ca_hash"])' "$demo/$name.token.json")
    echo "token ${token%%.*}.<secret>, CA hash $ca_hash"
    say "fleet-daemon enroll --manager 127.0.0.1:$enroll_port --token ... --ca-hash $ca_hash --name $name"
    "$bin/fleet-daemon" enroll --manager "127.0.0.1:$enroll_port" --token "$token" \
        --ca-hash "$ca_hash" --name "$name" --tls-dir "$demo/$name/tls" \
        --config "$demo/$name/enrolled.toml" --state-dir "$demo/$name/state" --force
done
unset token

for name in node-1 node-2; do
    say "starting fleet-daemon $name"
    "$bin/fleet-daemon" --config "$demo/$name.toml" >"$demo/$name.log" 2>&1 &
    pids+=($!)
done
wait_for 60 "both nodes to register" bash -c \
    "'$bin/fleetctl' -o json nodes list | grep -q node-1 && '$bin/fleetctl' -o json nodes list | grep -q node-2"
wait_for 60 "four agents RUNNING" count_running 4

# Something for the workers to chew on, and a few metric intervals.
for i in 1 2 3; do head -c 65536 /dev/urandom >"$demo/node-1/inbox/file-$i.bin"; done
sleep 6

say "fleetctl nodes list"
fleetctl nodes list
say "fleetctl tokens list --all"
fleetctl tokens list --all
say "fleetctl agents list"
fleetctl agents list
say "fleetctl agents restart worker -l tier=demo --max-concurrency 1 --yes"
fleetctl agents restart worker -l tier=demo --max-concurrency 1 --yes
say "fleetctl metrics query --node node-1 --type cpu --since 2m --step 5s"
fleetctl metrics query --node node-1 --type cpu --since 2m --step 5s
say "fleetctl events --tail 10"
fleetctl events --tail 10

say "deploy an agent centrally: $demo/probe.toml (from configs/definitions/probe.toml)"
grep -v '^#' "$demo/probe.toml" | sed '/./,$!d'
say "fleetctl apply -f probe.toml --plan"
fleetctl apply -f "$demo/probe.toml" --plan
say "fleetctl apply -f probe.toml --message 'probe the manager from every demo node'"
fleetctl apply -f "$demo/probe.toml" --message "probe the manager from every demo node"
say "fleetctl rollout status probe -w"
fleetctl rollout status probe -w
say "revision 2 (version 1.1, probe every 5 s): fleetctl apply -f probe-v2.toml --plan"
diff -u "$demo/probe.toml" "$demo/probe-v2.toml" | tail -n +3 | grep '^[-+]' || true
fleetctl apply -f "$demo/probe-v2.toml" --plan
say "fleetctl apply -f probe-v2.toml --message 'probe 1.1, every 5 s'"
fleetctl apply -f "$demo/probe-v2.toml" --message "probe 1.1, every 5 s"
say "fleetctl rollout status probe -w"
fleetctl rollout status probe -w
say "fleetctl definitions history probe"
fleetctl definitions history probe
say "fleetctl nodes list  (DESIRED: each node runs what the definitions say)"
fleetctl nodes list
say "fleetctl agents list"
fleetctl agents list

say "run a job on both nodes: configs/jobs/report.toml"
grep -v '^#' "$root/configs/jobs/report.toml" | sed '/./,$!d'
say "fleetctl run -f configs/jobs/report.toml --yes"
fleetctl run -f "$root/configs/jobs/report.toml" --yes
say "fleetctl jobs list"
fleetctl jobs list

# The web console: fleetctl ui serves it on loopback and prints a link that
# opens it once (docs/console.md).
say "fleetctl ui --no-browser  (the web console)"
"$bin/fleetctl" ui --no-browser >"$demo/ui.out" 2>"$demo/ui.log" &
pids+=($!)
console_url=""
for _ in $(seq 100); do
    console_url=$(grep -o 'http://[^ ]*' "$demo/ui.out" || true)
    [[ -n $console_url ]] && break
    kill -0 "${pids[-1]}" 2>/dev/null || die "fleetctl ui did not start: $(cat "$demo/ui.log")"
    sleep 0.1
done
[[ -n $console_url ]] || die "fleetctl ui printed no link within 10 s (see $demo/ui.log)"
echo "open the console: $console_url"
echo "(the link works once; 'fleetctl ui' in a shell set up with the line below prints a new one)"

# The line to paste into another shell: fleetctl from the venv, and where the fleet is.
export_line=$(printf 'export PATH=%q:"$PATH" FLEET_MANAGER=%q FLEET_CA=%q FLEET_CERT=%q FLEET_KEY=%q' \
    "$bin" "$FLEET_MANAGER" "$FLEET_CA" "$FLEET_CERT" "$FLEET_KEY")
if [[ ${DEMO_ONESHOT:-0} == 1 ]]; then
    say "tour done (DEMO_ONESHOT=1); while a demo runs, this sets up a shell for fleetctl:"
    echo "$export_line"
    exit 0
fi
say "the fleet keeps running; paste this into another shell to use fleetctl, Ctrl-C here to stop"
echo "$export_line"
wait "${pids[@]}"
