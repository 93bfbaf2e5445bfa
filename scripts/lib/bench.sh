# shellcheck shell=bash
# Benchmark peers: the upstream-style Go client (bench/goclient) and the C load generators
# (bench/loadgen). Each is rebuilt only when its sources change; the paths go to bench.env.
# Sourced after base.sh (log, die, apt_install, GP_ROOT, GP_CACHE).

GP_BENCH="$GP_CACHE/bench"

# hash_files FILE...: a short content hash of the files, in the order given.
hash_files() { cat "$@" | sha256sum | cut -c1-16; }

find_go() {
  local go
  go=$(command -v go || true)
  [ -n "$go" ] || go=/usr/local/go/bin/go
  [ -x "$go" ] || die "Go not found (need Go >= 1.26 on PATH or at /usr/local/go/bin/go)"
  printf '%s\n' "$go"
}

# build_goclient: prints the path of goclient-<hash>, building it if it is not there.
build_goclient() {
  local src="$GP_ROOT/bench/goclient" out go
  out="$GP_BENCH/goclient-$(hash_files "$src/go.mod" "$src/go.sum" "$src/main.go")"
  if [ ! -x "$out" ]; then
    go=$(find_go)
    log "building $out"
    mkdir -p "$GP_BENCH" "$GP_CACHE/go"
    (cd "$src" && GOPATH="$GP_CACHE/go" GOCACHE="$GP_CACHE/go/build" \
      GOMODCACHE="$GP_CACHE/go/mod" GOFLAGS=-mod=readonly GOTOOLCHAIN=local CGO_ENABLED=0 \
      "$go" build -trimpath -buildvcs=false -o "$out.tmp" .) >&2 || die "building bench/goclient failed"
    mv -f "$out.tmp" "$out"
    find "$GP_BENCH" -maxdepth 1 -name 'goclient-*' ! -path "$out" -delete
  fi
  printf '%s\n' "$out"
}

# build_loadgen: builds open_loop and exec_loop into $GP_BENCH/bin when bench/loadgen changed.
build_loadgen() {
  local src="$GP_ROOT/bench/loadgen" bin="$GP_BENCH/bin" stamp p
  stamp="$bin/.loadgen-$(hash_files "$src"/*.c "$src"/*.h)"
  [ -e "$stamp" ] && [ -x "$bin/open_loop" ] && [ -x "$bin/exec_loop" ] && return 0
  command -v cc >/dev/null || apt_install gcc libc6-dev
  mkdir -p "$bin"
  for p in open_loop exec_loop; do
    log "building $bin/$p"
    cc -O2 -Wall -Wextra -o "$bin/$p.tmp" "$src/$p.c" || die "building bench/loadgen/$p.c failed"
    mv -f "$bin/$p.tmp" "$bin/$p"
  done
  rm -f "$bin"/.loadgen-*
  touch "$stamp"
}

setup_bench() {
  local goclient env="$GP_BENCH/bench.env"
  goclient=$(build_goclient)
  build_loadgen
  printf 'GOCLIENT=%s\nOPEN_LOOP=%s\nEXEC_LOOP=%s\n' \
    "$goclient" "$GP_BENCH/bin/open_loop" "$GP_BENCH/bin/exec_loop" > "$env.tmp"
  mv -f "$env.tmp" "$env"
  log "bench peers ready ($env)"
}
