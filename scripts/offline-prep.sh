#!/usr/bin/env bash
# Prepare this machine so the unmodified `docker-compose build` / `docker-compose run SERVICE`
# (and `docker compose ...`) work with no container registry and no internet:
#   1. a base image built from Debian packages (debootstrap), tagged $BASE_IMAGE;
#   2. wheelhouse/: the wheels of requirements-docker.txt (the default image), -serve.txt (the serve
#      image) and -export.txt (the export image's additions), fetched with this machine's pip setup,
#      and in wheelhouse/debs/ the Debian packages of binutils (the build stages' `strip`);
#   3. docker-compose.override.yml: points the build at 1 and 2 and mounts the MNIST mirror
#      folder read-only into the services (MNIST_MIRROR).
# Idempotent: each step is skipped when its result exists and is still valid.
# Usage: scripts/offline-prep.sh [--mirror DIR]   (default DIR: ../shared/mnist beside the repo)
set -euo pipefail

usage() { sed -n '2,11s/^# \{0,1\}//p' "$0"; }

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
mirror=""
while [ $# -gt 0 ]; do
  case "$1" in
    --mirror) [ $# -ge 2 ] || { echo "error: --mirror needs a folder" >&2; exit 2; }; mirror=$2; shift 2 ;;
    --mirror=*) mirror=${1#--mirror=}; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "error: unknown argument '$1' (usage: scripts/offline-prep.sh [--mirror DIR])" >&2; exit 2 ;;
  esac
done

# bump when the recipe below changes, so an old base image is rebuilt rather than reused
BASE_IMAGE=mnist-compose-base:bookworm
BASE_RECIPE=1
SUITE=bookworm
WHEELHOUSE=$repo/wheelhouse
REQUIREMENTS=("$repo/requirements-docker.txt" "$repo/requirements-serve.txt" "$repo/requirements-export.txt")
OVERRIDE=$repo/docker-compose.override.yml
# wheels for the image's interpreter (Debian bookworm and python:3.11-slim: CPython 3.11, x86_64),
# whatever Python this machine runs; each manylinux tag named, since pip does not take an older one
# for a newer (pydantic-core and Pillow ship manylinux_2_17 wheels)
PIP_PLATFORM=(--only-binary=:all: --python-version 3.11 --implementation cp --abi cp311
              --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
MIRROR_IN_CONTAINER=/opt/mnist-mirror

say() { printf 'offline-prep: %s\n' "$*"; }
die() { printf 'offline-prep: error: %s\n' "$*" >&2; exit 1; }

# --- checks first, so a bad argument costs nothing -------------------------------------------
if [ -z "$mirror" ]; then
  [ -d "$repo/../shared/mnist" ] \
    || die "no MNIST mirror folder: $repo/../shared/mnist does not exist; pass --mirror DIR (a folder holding the four MNIST files)"
  mirror=$repo/../shared/mnist
fi
[ -d "$mirror" ] || die "--mirror $mirror is not a folder"
mirror=$(cd "$mirror" && pwd -P)
for name in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte; do
  compgen -G "$mirror/$name*" >/dev/null || die "mirror folder $mirror lacks $name(.gz)"
done
case "$mirror" in
  *'"'*|*\\*|*$'\n'*) die "mirror path $mirror holds a quote, backslash or newline; pass a plainer --mirror path" ;;
esac
docker info >/dev/null 2>&1 || die "no Docker engine answers (docker info failed); start dockerd first"

# --- 1. base image ----------------------------------------------------------------------------
base_recipe=$(docker image inspect --format '{{index .Config.Labels "mnist-compose.base-recipe"}}' "$BASE_IMAGE" 2>/dev/null || true)
if [ "$base_recipe" = "$BASE_RECIPE" ]; then
  say "base image $BASE_IMAGE: present (recipe $BASE_RECIPE), kept"
else
  command -v debootstrap >/dev/null || die "debootstrap is missing: apt-get install -y debootstrap"
  [ "$(id -u)" = 0 ] || die "building the base image needs root (debootstrap)"
  say "base image $BASE_IMAGE: building from Debian $SUITE packages with debootstrap (about a minute)"
  rootfs=$(mktemp -d /var/tmp/mnist-base.XXXXXX)
  trap 'rm -rf "$rootfs"' EXIT
  debootstrap --variant=minbase --include=python3,python3-venv "$SUITE" "$rootfs" >"$rootfs.log" 2>&1 \
    || { tail -n 20 "$rootfs.log" >&2; die "debootstrap failed (full log: $rootfs.log)"; }
  rm -f "$rootfs.log"
  # what a container never reads: package caches and lists, docs, man pages, translations
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/lib/apt/lists/* \
         "$rootfs"/usr/share/man "$rootfs"/usr/share/locale "$rootfs"/usr/share/info "$rootfs"/usr/share/doc \
         "$rootfs"/var/log/* "$rootfs"/tmp/*
  tar --numeric-owner -C "$rootfs" -c . | docker import \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3"]' \
    --change "LABEL mnist-compose.base-recipe=$BASE_RECIPE" \
    - "$BASE_IMAGE" >/dev/null
  rm -rf "$rootfs"
  trap - EXIT
  say "base image $BASE_IMAGE: built, $(docker image inspect --format '{{.Size}}' "$BASE_IMAGE" | awk '{printf "%.0f MB", $1/1e6}')"
fi

# --- 2. wheelhouse ----------------------------------------------------------------------------
# the stamp records what the wheelhouse was made from; a change to any of it remakes it
stamp="$(cat "${REQUIREMENTS[@]}" | sha256sum | cut -d' ' -f1) ${PIP_PLATFORM[*]}"
wheel_count() { find "$1" -maxdepth 1 -name '*.whl' | wc -l; }
# one wheel a distinct name (the serve and export lists name packages of the others again)
wanted=$(grep -hoE '^[A-Za-z0-9][A-Za-z0-9._-]*' "${REQUIREMENTS[@]}" | tr 'A-Z_.' 'a-z--' | sort -u | wc -l)
if [ -f "$WHEELHOUSE/.stamp" ] && [ "$(cat "$WHEELHOUSE/.stamp")" = "$stamp" ] \
   && [ "$(wheel_count "$WHEELHOUSE")" -eq "$wanted" ]; then
  say "wheelhouse: $wanted wheels present, kept"
else
  say "wheelhouse: fetching $wanted wheels with this machine's pip configuration"
  tmp=$(mktemp -d "$repo/.wheelhouse.XXXXXX")
  trap 'rm -rf "$tmp"' EXIT
  pip_python=""
  for py in python3 python; do
    if command -v "$py" >/dev/null && "$py" -m pip --version >/dev/null 2>&1; then pip_python=$py; break; fi
  done
  [ -n "$pip_python" ] || die "no pip on this machine (python3 -m pip): apt-get install python3-pip"
  "$pip_python" -m pip download --quiet --no-deps "${PIP_PLATFORM[@]}" -d "$tmp" \
      "${REQUIREMENTS[@]/#/--requirement=}" \
    || die "pip download failed: this machine's pip cannot reach the wheels of ${REQUIREMENTS[*]}"
  [ "$(wheel_count "$tmp")" -eq "$wanted" ] || die "pip download gave $(wheel_count "$tmp") wheels, expected $wanted"
  mkdir -p "$WHEELHOUSE"
  find "$WHEELHOUSE" -maxdepth 1 \( -name '*.whl' -o -name .stamp \) -delete
  mv "$tmp"/*.whl "$WHEELHOUSE"/
  printf '%s\n' "$stamp" >"$WHEELHOUSE/.stamp"
  rm -rf "$tmp"
  trap - EXIT
  say "wheelhouse: $(wheel_count "$WHEELHOUSE") wheels, $(du -sm "$WHEELHOUSE" | cut -f1) MB in $WHEELHOUSE"
fi

# --- 3. docker-compose.override.yml -----------------------------------------------------------
# binutils for the build stage's `strip` (a container here may reach no Debian mirror either); the
# base image already holds their shared dependencies (libc6, libstdc++6, zlib1g, libzstd1)
DEBS=(binutils binutils-common binutils-x86-64-linux-gnu libbinutils libctf-nobfd0 libctf0 libgprofng0 libjansson4)
deb_count() { find "$WHEELHOUSE/debs" -maxdepth 1 -name '*.deb' 2>/dev/null | wc -l; }
if [ "$(deb_count)" -eq "${#DEBS[@]}" ]; then
  say "wheelhouse/debs: ${#DEBS[@]} Debian packages of binutils present, kept"
else
  rm -rf "$WHEELHOUSE/debs" && mkdir -p "$WHEELHOUSE/debs"
  (cd "$WHEELHOUSE/debs" && apt-get download -qq -o APT::Sandbox::User=root "${DEBS[@]}" >/dev/null) \
    || die "apt-get download ${DEBS[*]} failed: run apt-get update, or check this machine's Debian mirror"
  say "wheelhouse/debs: $(deb_count) Debian packages of binutils"
fi

yaml_mirror=${mirror//\$/\$\$}   # compose reads "$" as interpolation
new=$(cat <<EOF
# Generated by scripts/offline-prep.sh: do not edit, do not commit (git ignores it).
# Builds from the local base image and wheelhouse instead of Docker Hub and PyPI, and gives the
# services the local MNIST mirror. Delete this file to build and run online again.
x-offline-run: &offline-run
  environment:
    MNIST_MIRROR: $MIRROR_IN_CONTAINER
  volumes:
    - type: bind
      source: "$yaml_mirror"
      target: $MIRROR_IN_CONTAINER
      read_only: true
x-offline: &offline
  <<: *offline-run
  build:
    args:
      BASE_IMAGE: $BASE_IMAGE
      PIP_INSTALL_OPTS: --no-deps --no-index --find-links /wheels

services:
  train: *offline
  evaluate: *offline
  infer: *offline
  serve: *offline
  export: *offline
  ddp-leader: *offline-run
  ddp-worker: *offline-run
EOF
)
if [ -f "$OVERRIDE" ] && [ "$(cat "$OVERRIDE")" = "$new" ]; then
  say "override: $OVERRIDE unchanged (mirror $mirror)"
else
  printf '%s\n' "$new" >"$OVERRIDE"
  say "override: wrote $OVERRIDE (base $BASE_IMAGE, wheelhouse, mirror $mirror read-only at $MIRROR_IN_CONTAINER)"
fi
say "ready: docker-compose build && docker-compose run --rm train"
