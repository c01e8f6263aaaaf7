#!/usr/bin/env bash
# Installs the Fleet daemon on this host from the files beside this script
# (the tarball `make dist` builds), enrolls it with a join token, and starts
# it with systemd. Needs only this host's Python: nothing is downloaded.
# Re-running it upgrades: a host whose daemon config exists is not enrolled
# again. See docs/install.md.
set -euo pipefail

usage() {
    cat <<'EOF'
usage: install.sh --manager HOST:PORT --token TOKEN --ca-hash sha256:HEX [options]
       install.sh [options]            (upgrade: the daemon config already exists)

Installs fleet-daemon, fleetctl, fleet-manager and fleet-agent from the zipapp
beside this script, enrolls this host (fleet-daemon enroll) and starts the
fleet-daemon systemd unit.

enrollment (what `fleetctl tokens create` printed):
  --manager HOST:PORT          the manager's enrollment address
  --token TOKEN                the join token
  --ca-hash sha256:HEX         the fleet CA's hash (pins the CA)
  --name NAME                  node name (default: what fleet-daemon enroll picks)
  --manager-address HOST:PORT  where the daemon reaches the manager afterwards
                               (default: what the manager tells it)
where:
  --prefix DIR        install root: lib/ (the zipapp), bin/ (wrappers) [/opt/fleet]
  --python PATH       the Python the commands run with [/usr/bin/python3]
  --config-dir DIR    daemon.toml and tls/ [/etc/fleet]
  --bin-dir DIR       symlinks to the wrappers, on PATH [/usr/local/bin]
  --unit-dir DIR      where fleet-daemon.service goes [/etc/systemd/system]
what:
  --no-enroll         install only (e.g. into an image); enroll later
  --no-start          do not start the unit; print how to
  -h, --help          this text
EOF
}

die() {
    echo "install.sh: $*" >&2
    exit 1
}

usage_error() {
    echo "install.sh: $*" >&2
    echo "run 'install.sh --help' for the options" >&2
    exit 2
}

say() {
    echo "install.sh: $*"
}

# --- options ------------------------------------------------------------------

manager="" token="" ca_hash="" name="" manager_address=""
prefix=/opt/fleet python=/usr/bin/python3 config_dir=/etc/fleet
bin_dir=/usr/local/bin unit_dir=/etc/systemd/system
enroll=yes start=yes

while (($#)); do
    opt=$1
    value=""
    case $opt in
        --*=*)
            value=${opt#*=}
            opt=${opt%%=*}
            ;;
        --manager | --token | --ca-hash | --name | --manager-address | --prefix | --python | \
            --config-dir | --bin-dir | --unit-dir)
            (($# >= 2)) || usage_error "$opt needs a value"
            value=$2
            shift
            ;;
    esac
    case $opt in
        --manager) manager=$value ;;
        --token) token=$value ;;
        --ca-hash) ca_hash=$value ;;
        --name) name=$value ;;
        --manager-address) manager_address=$value ;;
        --prefix) prefix=$value ;;
        --python) python=$value ;;
        --config-dir) config_dir=$value ;;
        --bin-dir) bin_dir=$value ;;
        --unit-dir) unit_dir=$value ;;
        --no-enroll) enroll=no ;;
        --no-start) start=no ;;
        -h | --help)
            usage
            exit 0
            ;;
        *) usage_error "unknown option '$opt'" ;;
    esac
    shift
done

# Paths go into the unit file and the wrappers verbatim: keep them plain.
for pair in "--prefix:$prefix" "--config-dir:$config_dir" "--bin-dir:$bin_dir" \
    "--unit-dir:$unit_dir" "--python:$python"; do
    flag=${pair%%:*} path=${pair#*:}
    [[ $path =~ ^/[A-Za-z0-9/._+-]*$ ]] ||
        usage_error "$flag '$path': expected an absolute path of letters, digits and / . _ + -"
done
prefix=${prefix%/} config_dir=${config_dir%/} bin_dir=${bin_dir%/} unit_dir=${unit_dir%/}

# --- the artifact and this host's Python --------------------------------------

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
shopt -s nullglob
pyzs=("$here"/fleet-*.pyz)
shopt -u nullglob
((${#pyzs[@]} == 1)) ||
    die "expected exactly one fleet-*.pyz beside this script in $here, found ${#pyzs[@]}"
pyz_src=${pyzs[0]}
pyz_name=$(basename "$pyz_src")
# fleet-<version>-cp<XY>-manylinux_<glibc major>_<minor>_<arch>.pyz, as `make dist` names it.
[[ $pyz_name =~ ^fleet-([^-]+)-cp([0-9])([0-9]+)-manylinux_([0-9]+)_([0-9]+)_(.+)\.pyz$ ]] ||
    die "$pyz_name: not a name 'make dist' gives (fleet-<version>-cp<XY>-manylinux_<A>_<B>_<arch>.pyz)"
version=${BASH_REMATCH[1]}
want_python="${BASH_REMATCH[2]}.${BASH_REMATCH[3]}"
want_glibc="${BASH_REMATCH[4]}.${BASH_REMATCH[5]}"
want_arch=${BASH_REMATCH[6]}

[[ -x $python ]] || die "--python $python: no such executable (pass the path of a Python $want_python)"
# One line naming every mismatch, from the interpreter itself.
"$python" -I - "$pyz_name" "$want_python" "$want_glibc" "$want_arch" <<'EOF' || exit 1
import platform
import sys

artifact, want_python, want_glibc, want_arch = sys.argv[1:]
have_python = "%d.%d" % sys.version_info[:2]
libc, libc_version = platform.libc_ver()
problems = []
if sys.implementation.name != "cpython" or have_python != want_python:
    problems.append(f"{sys.implementation.name} {platform.python_version()}, not CPython {want_python}")
if platform.machine() != want_arch:
    problems.append(f"{platform.machine()}, not {want_arch}")
def as_tuple(text):
    return tuple(int(part) for part in text.split(".")[:2] if part.isdigit())
if libc != "glibc" or as_tuple(libc_version) < as_tuple(want_glibc):
    problems.append(f"{libc or 'unknown libc'} {libc_version}, not glibc >= {want_glibc}")
if problems:
    print(
        f"install.sh: {artifact} needs CPython {want_python} on {want_arch} with glibc >= {want_glibc};"
        f" {sys.executable} is {'; '.join(problems)}. Pass --python with a matching"
        " interpreter, or build the artifact with that Python (docs/install.md)",
        file=sys.stderr,
    )
    sys.exit(1)
EOF

# --- what to do ---------------------------------------------------------------

config=$config_dir/daemon.toml
enrolled_before=no
if [[ $enroll == yes && -e $config ]]; then
    enroll=no enrolled_before=yes
fi
if [[ $enroll == yes ]]; then
    [[ -n $manager && -n $token && -n $ca_hash ]] ||
        usage_error "--manager, --token and --ca-hash are needed to enroll ($config does not exist yet); --no-enroll installs only"
    # The same rules as fleet.enroll, checked here so a typo installs nothing.
    [[ $manager =~ ^[^[:space:]]+:[0-9]+$ ]] || usage_error "--manager '$manager': expected HOST:PORT"
    [[ -z $manager_address || $manager_address =~ ^[^[:space:]]+:[0-9]+$ ]] ||
        usage_error "--manager-address '$manager_address': expected HOST:PORT"
    [[ $token =~ ^[a-z0-9]{8}\.[A-Za-z0-9_-]{43}$ ]] ||
        usage_error "--token: a join token is '<id>.<secret>' as 'fleetctl tokens create' printed it"
    [[ ${ca_hash,,} =~ ^sha256:[0-9a-f]{64}$ ]] ||
        usage_error "--ca-hash '$ca_hash': expected 'sha256:' and 64 hex digits"
    [[ -z $name || $name =~ ^[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?$ ]] ||
        usage_error "--name '$name': 1-63 letters, digits, '.', '_' or '-', starting and ending with a letter or digit"
fi
[[ $(id -u) == 0 ]] || die "run it as root (it installs under $prefix and $unit_dir and enrolls a system daemon)"

# --- install ------------------------------------------------------------------

lib=$prefix/lib
shiv_root=$lib/shiv
commands=(fleet-daemon fleetctl fleet-manager fleet-agent)
umask 022
mkdir -p "$lib" "$shiv_root" "$prefix/bin" "$bin_dir" "$unit_dir"
# lib/fleet.pyz names the version the commands run, lib/previous.pyz the one
# it replaced (kept for a daemon still running it, and as a way back).
current="" previous=""
if [[ -L $lib/fleet.pyz ]]; then
    current=$(basename "$(readlink "$lib/fleet.pyz")")
fi
if [[ -L $lib/previous.pyz ]]; then
    previous=$(basename "$(readlink "$lib/previous.pyz")")
fi
if [[ -n $current && $current != "$pyz_name" ]]; then
    previous=$current
fi

cp "$pyz_src" "$lib/.$pyz_name.tmp"
mv -f "$lib/.$pyz_name.tmp" "$lib/$pyz_name"
# Unpacks the libraries into $shiv_root (as root, so later runs by anyone only
# read) and proves the native ones load here, before anything points at them.
if ! SHIV_ROOT=$shiv_root "$python" -I "$lib/$pyz_name" --check; then
    if [[ $pyz_name != "$current" && $pyz_name != "$previous" ]]; then
        rm -rf "${lib:?}/$pyz_name" "$shiv_root/$pyz_name"_*
    fi
    die "$pyz_name does not run on this host (above); nothing else was changed"
fi

# The wrappers run lib/fleet.pyz; switching the symlink switches every command at once.
ln -sfn "$pyz_name" "$lib/.fleet.pyz.tmp"
mv -Tf "$lib/.fleet.pyz.tmp" "$lib/fleet.pyz"
if [[ -n $previous ]]; then
    ln -sfn "$previous" "$lib/.previous.pyz.tmp"
    mv -Tf "$lib/.previous.pyz.tmp" "$lib/previous.pyz"
fi

for command in "${commands[@]}"; do
    wrapper=$prefix/bin/$command
    cat >"$wrapper.tmp" <<EOF
#!/bin/sh
# $command from Fleet $version, written by install.sh. SHIV_ROOT is where the
# zipapp's libraries are unpacked: root-owned, under the prefix, never the
# caller's home. exec keeps the pid (systemd's Type=notify needs it).
SHIV_ROOT=$shiv_root
export SHIV_ROOT
exec '$python' -I '$lib/fleet.pyz' $command "\$@"
EOF
    chmod 0755 "$wrapper.tmp"
    mv -f "$wrapper.tmp" "$wrapper"
    if [[ $bin_dir != "$prefix/bin" ]]; then
        ln -sfn "$wrapper" "$bin_dir/$command"
    fi
done

# The unit from configs/systemd, pointed at the wrapper and this config.
unit_src=$here/systemd/fleet-daemon.service
unit=$unit_dir/fleet-daemon.service
exec_start="ExecStart=$prefix/bin/fleet-daemon --config $config"
sed -e "1i # Installed by Fleet $version's install.sh from configs/systemd/fleet-daemon.service." \
    -e "s|^ExecStart=.*|$exec_start|" \
    -e "s|^Documentation=.*|Documentation=file://$prefix/README.md|" \
    -e "s|^\[Service\]$|[Service]\nEnvironment=SHIV_ROOT=$shiv_root|" \
    "$unit_src" >"$unit.tmp"
if ! grep -qxF "$exec_start" "$unit.tmp" || ! grep -qxF "Environment=SHIV_ROOT=$shiv_root" "$unit.tmp"; then
    rm -f "$unit.tmp"
    die "$unit_src: no ExecStart= or [Service] line to adapt; the unit template changed"
fi
mv -f "$unit.tmp" "$unit"
cp "$here/README.md" "$prefix/README.md"

# Keep this version and the previous one; remove older ones and what was
# unpacked of them.
shopt -s nullglob
for old in "$lib"/fleet-*.pyz; do
    base=$(basename "$old")
    [[ $base == "$pyz_name" || $base == "$previous" ]] && continue
    rm -rf "$old" "$shiv_root/$base"_* "$shiv_root/.$base"_*
done
shopt -u nullglob
say "installed Fleet $version in $prefix (commands in $bin_dir, unit $unit)"

# --- enroll -------------------------------------------------------------------

if [[ $enrolled_before == yes ]]; then
    say "$config exists: upgrade only, not enrolling again (to enroll anew: fleet-daemon enroll --force ...)"
elif [[ $enroll == yes ]]; then
    args=(enroll --manager "$manager" --token "$token" --ca-hash "$ca_hash"
        --config "$config" --tls-dir "$config_dir/tls" --no-next-steps)
    if [[ -n $name ]]; then args+=(--name "$name"); fi
    if [[ -n $manager_address ]]; then args+=(--manager-address "$manager_address"); fi
    "$prefix/bin/fleet-daemon" "${args[@]}" || die "enrollment failed (above); Fleet stays installed: fix the cause and run install.sh again"
fi

# --- start --------------------------------------------------------------------

if [[ ! -e $config ]]; then
    say "not enrolled yet: run 'fleet-daemon enroll --manager ... --token ... --ca-hash ... --config $config --tls-dir $config_dir/tls', then start the unit"
elif [[ $start == yes && -d /run/systemd/system ]]; then
    systemctl daemon-reload
    if systemctl is-active --quiet fleet-daemon; then
        # Agents keep running across the restart (KillMode=process); the new daemon re-adopts them.
        systemctl restart fleet-daemon
        say "restarted fleet-daemon on Fleet $version"
    else
        systemctl enable --now fleet-daemon
        say "fleet-daemon is enabled and started: 'systemctl status fleet-daemon', 'journalctl -u fleet-daemon'"
    fi
elif [[ -d /run/systemd/system ]]; then
    say "to start it: systemctl daemon-reload && systemctl enable --now fleet-daemon"
else
    say "systemd is not running here; start the daemon with: $prefix/bin/fleet-daemon --config $config"
fi
