# shellcheck shell=bash
# External commands the test suite runs itself (beyond the daemon's base and the real peers),
# each mapped to the Debian package that provides it. Found by grepping every subprocess call
# and shutil.which() in tests/, bench/ and scripts/; keep this list in step with them.
# Sourced after base.sh (apt_install, log, die).

# command  package        used by
TOOLS_TABLE="
dnsmasq        dnsmasq-base   tests/e2e/test_gadget_trace_dns.py, upstream workloads (trace_dns)
openssl        openssl        tests/e2e/test_access.py, test_gadgetctl.py (certificates)
cc             gcc            tests/e2e/test_ringbuf.py, bench (C load generators)
groupadd       passwd         tests/e2e/test_access.py (socket group)
unshare        util-linux     tests/e2e/test_btf.py, ig daemon in its own pid namespace
flock          util-linux     scripts/lib/*.sh (one set-up at a time)
mount          mount          tests/e2e/test_faults.py (tmpfs state dirs)
sleep          coreutils      gadget tests (sleeping children)
python3        python3        tests run children as other users with the system interpreter
git            git            scripts/lib/upstream.sh (reads the upstream source)
tar            tar            scripts/lib/upstream.sh
"

# tools_missing_packages: the packages of the table's commands that are not on PATH.
tools_missing_packages() {
  local cmd pkg _
  while read -r cmd pkg _; do
    [ -n "$cmd" ] || continue
    command -v "$cmd" >/dev/null 2>&1 || printf '%s\n' "$pkg"
  done <<<"$TOOLS_TABLE"
}

setup_tools() {
  local -a missing
  mapfile -t missing < <(tools_missing_packages | sort -u)
  # libc6-dev goes with gcc: cc without the C headers cannot build the load generators.
  apt_install libc6-dev "${missing[@]}"
  mapfile -t missing < <(tools_missing_packages | sort -u)
  [ ${#missing[@]} -eq 0 ] || die "still missing after install: packages ${missing[*]}"
}
