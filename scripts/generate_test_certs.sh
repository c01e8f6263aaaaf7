#!/usr/bin/env bash
# Make a private CA and mTLS certificates for a demo or test fleet (openssl).
#
# Same layout and identity scheme as fleet.pki: every leaf carries the SAN URI
# spiffe://<td>/<role>/<name> and the DNS name <name>.<role>.<td>. Idempotent:
# an existing CA is reused (never replaced without --force-ca) and an existing
# leaf that still verifies, matches its key and names the right identity is kept.
set -euo pipefail

usage() {
    cat >&2 <<'EOF'
usage: generate_test_certs.sh [--out DIR] [--trust-domain D] [--node NAME ...]
                              [--operator NAME] [--manager NAME] [--days N] [--force-ca]

  --out DIR           output directory (default: certs)
  --trust-domain D    trust domain, a lower-case DNS name (default: fleet.local)
  --node NAME         issue a node certificate; repeat for more nodes (default: none)
  --operator NAME     operator certificate name (default: admin)
  --manager NAME      manager certificate name (default: manager)
  --days N            validity of new leaf certificates in days (default: 365)
  --force-ca          replace an existing CA (re-issues every leaf)
EOF
}

die() {
    echo "generate_test_certs.sh: $*" >&2
    exit 1
}

out=certs
td=fleet.local
operator=admin
manager=manager
days=365
force_ca=0
nodes=()

need_value() {
    if [[ $# -lt 2 || -z "$2" || "$2" == --* ]]; then
        echo "generate_test_certs.sh: $1 needs a value" >&2
        usage
        exit 2
    fi
}

while [[ $# -gt 0 ]]; do
    case "$1" in
        --out) need_value "$@"; out=$2; shift 2 ;;
        --trust-domain) need_value "$@"; td=$2; shift 2 ;;
        --node) need_value "$@"; nodes+=("$2"); shift 2 ;;
        --operator) need_value "$@"; operator=$2; shift 2 ;;
        --manager) need_value "$@"; manager=$2; shift 2 ;;
        --days) need_value "$@"; days=$2; shift 2 ;;
        --force-ca) force_ca=1; shift ;;
        -h | --help) usage; exit 0 ;;
        *) echo "generate_test_certs.sh: unknown argument: $1" >&2; usage; exit 2 ;;
    esac
done

# The same rules as fleet.pki.Identity, so both tools accept the same names.
label='[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?'
if ! [[ "$td" =~ ^$label(\.$label)*$ ]]; then
    echo "generate_test_certs.sh: --trust-domain '$td' must be a lower-case DNS name" >&2
    exit 2
fi
for n in "$manager" "$operator" "${nodes[@]+"${nodes[@]}"}"; do
    if ! [[ "$n" =~ ^[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?$ ]]; then
        echo "generate_test_certs.sh: name '$n' must be 1-63 letters, digits, '.', '_' or '-'" >&2
        exit 2
    fi
done
if ! [[ "$days" =~ ^[1-9][0-9]*$ ]]; then
    echo "generate_test_certs.sh: --days '$days' must be a positive integer" >&2
    exit 2
fi

command -v openssl >/dev/null || die "openssl is not installed"
mkdir -p "$out"
umask 077  # every file starts private; certificates are opened up to 0644 below
work=$(mktemp -d "$out/.work.XXXXXX")
trap 'rm -rf "$work"' EXIT

ca="$out/ca.pem"
ca_key="$out/ca-key.pem"

# --- CA -----------------------------------------------------------------------
ca_trust_domain() {
    openssl x509 -in "$ca" -noout -ext subjectAltName 2>/dev/null |
        grep -o 'URI:spiffe://[^,/ ]*' | head -n1 | sed 's|URI:spiffe://||' || true
}

make_ca() {
    cat >"$work/ca.cnf" <<EOF
[req]
distinguished_name = dn
prompt = no
x509_extensions = v3_ca
[dn]
O = Fleet
OU = $td
CN = Fleet CA
[v3_ca]
basicConstraints = critical, CA:true, pathlen:1
keyUsage = critical, digitalSignature, keyCertSign, cRLSign
subjectKeyIdentifier = hash
subjectAltName = URI:spiffe://$td
nameConstraints = critical, permitted;URI:$td
EOF
    local ca_days=$((days > 3650 ? days : 3650))
    openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$work/ca-key.pem" 2>/dev/null
    openssl req -x509 -new -config "$work/ca.cnf" -key "$work/ca-key.pem" -sha256 \
        -days "$ca_days" -out "$work/ca.pem"
    chmod 0600 "$work/ca-key.pem"
    chmod 0644 "$work/ca.pem"
    mv -f "$work/ca-key.pem" "$ca_key"
    mv -f "$work/ca.pem" "$ca"
    echo "created CA $ca (trust domain $td)"
}

if [[ -e "$ca" || -e "$ca_key" ]] && [[ $force_ca -eq 0 ]]; then
    [[ -e "$ca" && -e "$ca_key" ]] ||
        die "$out holds only half a CA (ca.pem / ca-key.pem); refusing to overwrite it (--force-ca makes a new CA)"
    existing=$(ca_trust_domain)
    [[ "$existing" == "$td" ]] ||
        die "the CA in $ca is for trust domain '${existing:-?}', not '$td'; refusing to overwrite it (--force-ca makes a new CA)"
    openssl x509 -in "$ca" -noout -checkend 0 >/dev/null ||
        die "the CA in $ca has expired; refusing to overwrite it (--force-ca makes a new CA)"
    echo "kept CA $ca"
else
    make_ca
fi

# --- leaves -------------------------------------------------------------------
# A leaf is kept when it verifies against the CA, is valid for another hour,
# matches its key and carries the expected SPIFFE URI.
leaf_is_valid() {
    local cert=$1 key=$2 uri=$3
    [[ -f "$cert" && -f "$key" ]] || return 1
    openssl verify -CAfile "$ca" "$cert" >/dev/null 2>&1 || return 1
    openssl x509 -in "$cert" -noout -checkend 3600 >/dev/null 2>&1 || return 1
    [[ "$(openssl x509 -in "$cert" -noout -pubkey 2>/dev/null)" == \
        "$(openssl pkey -in "$key" -pubout 2>/dev/null)" ]] || return 1
    openssl x509 -in "$cert" -noout -ext subjectAltName 2>/dev/null | grep -qF "URI:$uri" || return 1
}

issue() {
    local role=$1 name=$2
    shift 2
    local stem="$role-$name"
    local cert="$out/$stem.pem" key="$out/$stem-key.pem"
    local uri="spiffe://$td/$role/$name"
    if leaf_is_valid "$cert" "$key" "$uri"; then
        echo "kept $cert"
        return
    fi
    local san="URI:$uri,DNS:$name.$role.$td"
    local extra
    for extra in "$@"; do san="$san,$extra"; done
    cat >"$work/$stem.cnf" <<EOF
basicConstraints = critical, CA:false
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth, clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
subjectAltName = $san
EOF
    openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$work/$stem-key.pem" 2>/dev/null
    openssl req -new -key "$work/$stem-key.pem" -subj "/O=Fleet/OU=$role/CN=$name.$role.$td" \
        -out "$work/$stem.csr"
    openssl x509 -req -in "$work/$stem.csr" -CA "$ca" -CAkey "$ca_key" -set_serial "0x$(openssl rand -hex 16)" \
        -days "$days" -sha256 -extfile "$work/$stem.cnf" -out "$work/$stem.pem" 2>/dev/null
    chmod 0600 "$work/$stem-key.pem"
    chmod 0644 "$work/$stem.pem"
    # Key first, then cert: each rename is atomic, and a reader that sees the
    # new key with the old cert rejects the pair and keeps what it had.
    mv -f "$work/$stem-key.pem" "$key"
    mv -f "$work/$stem.pem" "$cert"
    echo "issued $cert ($uri)"
}

issue manager "$manager" "DNS:manager.$td" DNS:localhost IP:127.0.0.1
for n in "${nodes[@]+"${nodes[@]}"}"; do
    issue node "$n" DNS:localhost IP:127.0.0.1
done
issue operator "$operator"
