#!/usr/bin/env bash
# Installs what tb-agent needs to build, test and run its demo, from Debian 12 packages only.
# Installs only what is missing, so it is quick on a machine that has everything.
set -euo pipefail

PACKAGES=(
  # build
  build-essential cmake pkg-config g++ clang-format
  # lld: links tb-agent with its running code first and together (cmake/Footprint.cmake);
  # without it the build works and the agent needs ~1 MiB more memory
  lld
  # fuzzing (scripts/fuzz.sh): clang with libFuzzer and the sanitizer runtimes
  clang libclang-rt-14-dev
  # libraries
  libcoap3-dev libcoap3-bin nlohmann-json3-dev libyaml-cpp-dev libsystemd-dev libspdlog-dev
  libfmt-dev libsqlite3-dev libcli11-dev libgtest-dev libgmock-dev
  # DTLS: the system CA bundle (server.dtls's default), and for the tests the openssl command
  # (test certificates) and libssl-dev (tb-test-dtls-proxy and tb-test-server; the agent itself
  # links no OpenSSL)
  ca-certificates openssl libssl-dev
  # tests: a real dbus-daemon, systemd-analyze, python test driver, process tools
  dbus dbus-bin dbus-daemon systemd python3 python3-pytest procps util-linux passwd
  # docs: groff checks that the man pages render (tests/integration/test_docs.py)
  groff-base
  # packages: .deb/.rpm checks (tests/package), rpmbuild for CPack's RPM generator
  lintian rpm rpmlint
  # system tests (tests/system): a Debian 12 root booted with systemd-nspawn; dpkg-dev for
  # dpkg-buildflags (scripts/build-packages.sh)
  debootstrap systemd-container dpkg-dev
  # network fault suite (tests/netfault): ip netns and veth pairs
  iproute2
)

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "installing: ${missing[*]}"
  SUDO=""
  [[ $(id -u) -eq 0 ]] || SUDO=sudo
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -q
  $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
