#!/usr/bin/env bash
# Install what the tests need, then run the linter and every test.
# Needs root: the tests mount vswapfs, attach loop devices and swapon.
# Under CI (CI set) a skipped test counts as a failure.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
for tool in fio:fio stress-ng:stress-ng mkfs.ext4:e2fsprogs losetup:util-linux mkswap:util-linux cc:gcc \
            redis-server:redis-server redis-benchmark:redis-tools; do
  command -v "${tool%%:*}" >/dev/null || need+=("${tool##*:}")
done
# setup.py compiles the request path with mypyc (the tests then test what users run): a C
# compiler (gcc, above) and the interpreter's headers
include=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
[[ -e $include/Python.h ]] || need+=("python3-dev")
# and liblz4.so.1, which the codec's lz4 in C links against (every systemd machine has it)
ldconfig -p | grep 'liblz4\.so\.1 ' >/dev/null || need+=("liblz4-1")
if ((${#need[@]})); then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
python3 -m pip install -q --disable-pip-version-check -e '.[test]'
python3 -m ruff check vswapfs vswapfs_lab tests setup.py
python3 -m mypy  # strict on the engine and the transport (pyproject.toml)
python3 -m pytest "$@"
