#!/usr/bin/env bash
# `make dist`: Fleet's wheel, and one self-contained zipapp (shiv) of Fleet and
# every runtime dependency, native ones included, from the hashed
# requirements-runtime.lock, for this interpreter's Python version and this
# machine's architecture on glibc >= DIST_GLIBC; then install.sh, and a
# tarball of everything a host needs. Usage: build-dist.sh PYTHON (the venv's).
set -euo pipefail
cd "$(dirname "$0")/.."

py=${1:?usage: build-dist.sh PYTHON}
# manylinux_2_28: the oldest glibc every pinned native wheel is built for
# (greenlet has no older one); RHEL 8, Debian 10 and Ubuntu 20.04 have it.
glibc=${DIST_GLIBC:-2.28}
start=$SECONDS

version=$("$py" -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
pytag=$("$py" -c 'import sys; print("cp%d%d" % sys.version_info[:2])')
pyversion=$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
arch=$(uname -m)
glibc_major=${glibc%%.*} glibc_minor=${glibc#*.}
platform=manylinux_${glibc_major}_${glibc_minor}_${arch}
tag=$pytag-$platform
name=fleet-$version-$tag

# pip takes a wheel only for a platform it is told; a manylinux_2_28 host
# runs any older manylinux wheel too, so name them all (and the legacy aliases).
platforms=()
for ((minor = glibc_minor; minor >= 5; minor--)); do
    platforms+=(--platform "manylinux_${glibc_major}_${minor}_${arch}")
done
((glibc_minor >= 17)) && platforms+=(--platform "manylinux2014_$arch")
((glibc_minor >= 12)) && platforms+=(--platform "manylinux2010_$arch")
platforms+=(--platform "manylinux1_$arch")

# Same inputs, same bytes: file times from the last commit, fixed modes.
if [[ -z ${SOURCE_DATE_EPOCH:-} ]]; then
    SOURCE_DATE_EPOCH=$(git log -1 --format=%ct 2>/dev/null || echo 315532800)
fi
export SOURCE_DATE_EPOCH
umask 022

stage=build/dist
rm -rf dist build
mkdir -p dist "$stage/site-packages"

echo "dist: wheel"
"$py" -m pip wheel --quiet --no-deps --no-build-isolation --wheel-dir dist .
wheel=dist/fleet-$version-py3-none-any.whl
[[ -f $wheel ]] || {
    echo "dist: pip wheel did not produce $wheel" >&2
    exit 1
}

echo "dist: runtime dependencies for $tag (requirements-runtime.lock, hash-checked, wheels only)"
"$py" -m pip install --quiet --disable-pip-version-check --target "$stage/site-packages" \
    --require-hashes --only-binary :all: --no-deps --no-compile \
    --implementation cp --python-version "$pyversion" "${platforms[@]}" \
    -r requirements-runtime.lock
# Console scripts with this machine's interpreter in their shebang: the
# launcher (fleet.launcher) replaces them.
rm -rf "$stage/site-packages/bin"
"$py" -m pip install --quiet --disable-pip-version-check --target "$stage/site-packages" \
    --no-deps --no-compile "$wheel"
rm -rf "$stage/site-packages/bin"

echo "dist: zipapp"
"$py" -m shiv --site-packages "$stage/site-packages" --reproducible --compressed --compile-pyc \
    --entry-point fleet.launcher:main --python "/usr/bin/env python3" \
    --output-file "dist/$name.pyz"

echo "dist: install.sh and tarball"
# dist/ itself is laid out like the tarball, so dist/install.sh works in place.
top=$stage/$name
for dir in dist "$top"; do
    mkdir -p "$dir/systemd"
    install -m 0755 packaging/install.sh "$dir/install.sh"
    cp configs/systemd/fleet-daemon.service configs/systemd/fleet-manager.service "$dir/systemd/"
    cp docs/install.md "$dir/README.md"
done
cp "dist/$name.pyz" "$top/"
tar --sort=name --mtime="@$SOURCE_DATE_EPOCH" --owner=0 --group=0 --numeric-owner \
    -C "$stage" -cf - "$name" | gzip -n -9 >"dist/$name.tar.gz"

(cd dist && sha256sum -- *.whl *.pyz *.tar.gz install.sh >SHA256SUMS)
echo "dist: done in $((SECONDS - start)) s"
ls -l dist
