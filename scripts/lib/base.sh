# shellcheck shell=bash
# Base set-up: Debian packages, kernel headers bcc can compile against, tracefs, and the venv.
# Every step checks before it acts, so running it again costs a few seconds.

gp_root() { cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd; }
GP_ROOT="$(gp_root)"
GP_VENV="$GP_ROOT/.venv"
# shellcheck disable=SC2034  # used by the parts sourced after this file
GP_CACHE="${GADGETPIPE_CACHE:-/var/cache/gadgetpipe}"

log() { printf '[setup] %s\n' "$*" >&2; }
die() { printf '[setup] error: %s\n' "$*" >&2; exit 1; }

need_root() {
  [ "$(id -u)" = 0 ] || die "must run as root (eBPF, apt and tracefs need it); try: sudo $0"
}

# as_root SCRIPT ARGS...: returns when running as root; otherwise re-runs SCRIPT with sudo
# (keeping the GADGETPIPE_* settings, which sudo's env_reset would drop), or says how to.
# So the README's `scripts/test` works from a root shell without sudo and for a sudo user.
as_root() {
  [ "$(id -u)" = 0 ] && return 0
  command -v sudo >/dev/null \
    || die "must run as root (eBPF, apt and tracefs need it), and sudo is not installed: run it from a root shell"
  local -a keep=()
  local name
  while IFS= read -r name; do keep+=("$name=${!name}"); done \
    < <(compgen -e | grep '^GADGETPIPE_' || true)
  log "root is needed (eBPF, apt, tracefs): re-running with sudo"
  exec sudo env "${keep[@]}" "$@"
}

# Tools under sbin (dnsmasq, groupadd, mount) must be found even when the caller's PATH
# lacks it (`su` without `-`, some sudoers); Go's default install place too.
gp_path() {
  local d
  for d in /usr/local/sbin /usr/sbin /sbin /usr/local/go/bin; do
    case ":$PATH:" in *":$d:"*) ;; *) [ -d "$d" ] && PATH="$PATH:$d" ;; esac
  done
  export PATH
}
gp_path

APT_UPDATED=0
apt_install() {
  local missing=()
  for p in "$@"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$APT_UPDATED" = 0 ]; then log "apt-get update"; apt-get update -qq; APT_UPDATED=1; fi
  log "apt-get install ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# Debian's headers trail the running kernel; bcc only needs *a* header tree for its helper
# includes, because our programs read tracepoint arguments, never kernel struct layouts.
setup_headers() {
  local kdir
  kdir="/lib/modules/$(uname -r)"
  if [ -e "$kdir/build/include" ]; then return 0; fi
  apt_install linux-headers-cloud-amd64
  local arch common
  arch=$(find /usr/src -maxdepth 1 -name 'linux-headers-*-cloud-amd64' | sort -V | tail -n1)
  common=$(find /usr/src -maxdepth 1 -name 'linux-headers-*-common' | sort -V | tail -n1)
  if [ -z "$arch" ] || [ -z "$common" ]; then die "no Debian kernel headers under /usr/src after install"; fi
  mkdir -p "$kdir"
  ln -sfn "$arch" "$kdir/build"
  ln -sfn "$common" "$kdir/source"
  log "linked $kdir/build -> $arch"
}

setup_mounts() {
  [ -d /sys/kernel/tracing/events ] || mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null || true
  [ -d /sys/kernel/debug/tracing ] || mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null || true
  [ -d /sys/kernel/tracing/events/syscalls ] || [ -d /sys/kernel/debug/tracing/events/syscalls ] \
    || die "tracefs is not available: mount -t tracefs tracefs /sys/kernel/tracing"
  mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf 2>/dev/null || true
}

setup_venv() {
  local py=python3
  command -v "$py" >/dev/null || die "python3 not found"
  if [ ! -x "$GP_VENV/bin/python" ]; then log "creating $GP_VENV"; "$py" -m venv "$GP_VENV"; fi
  # Debian's bcc lives in dist-packages; expose only that package to the venv.
  local site bccdir
  site=$("$GP_VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  bccdir="$GP_VENV/debian-bcc"
  mkdir -p "$bccdir"
  ln -sfn /usr/lib/python3/dist-packages/bcc "$bccdir/bcc"
  echo "$bccdir" > "$site/debian-bcc.pth"
  local stamp
  stamp="$GP_VENV/.installed-$(sha256sum "$GP_ROOT/pyproject.toml" | cut -c1-16)"
  if [ ! -e "$stamp" ]; then
    log "installing gadgetpipe and its dependencies into the venv"
    "$GP_VENV/bin/pip" install -q --upgrade pip >/dev/null
    "$GP_VENV/bin/pip" install -q -e "${GP_ROOT}[dev]"
    rm -f "$GP_VENV"/.installed-*; touch "$stamp"
  fi
  "$GP_VENV/bin/python" -c 'import bcc' 2>/dev/null || die "bcc does not import in the venv"
}

setup_base() {
  need_root
  apt_install python3-bpfcc bpftool python3-venv
  setup_headers
  setup_mounts
  setup_venv
}
