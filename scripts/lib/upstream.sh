# shellcheck shell=bash
# Upstream Inspektor Gadget as a real peer (README "Upstream clients"): its client `gadgetctl`,
# its daemon `ig`, and ig gadget images of our ten gadgets for `ig daemon`, built from an
# upstream source given by path into $GP_CACHE/upstream/<source-hash>/ and listed in
# $GP_CACHE/upstream.env for the tests (tests/peers/upstream.py).
#
#   GADGETPIPE_UPSTREAM_SRC   an upstream source tree or a bare git dir; default: the mirror
#                             below when it exists; `none`: build nothing (use a cached build)
#
# With no source and no cached build this part says so and succeeds: the suite then runs
# everything else and its summary says the upstream-client tests did not run.
# Sourced after base.sh (log, die, apt_install, GP_ROOT, GP_CACHE).

UPSTREAM_DEFAULT_SRC=/work/.mirror/inspektor-gadget+inspektor-gadget/repo
UPSTREAM_GADGETS="trace_exec trace_open trace_tcp trace_bind trace_signal trace_oomkill trace_dns
  trace_capabilities snapshot_process top_file"
# Bumped whenever the recipe below changes what ends up in the cache.
UPSTREAM_RECIPE=1
# ig keeps its images at this fixed path when run as root (pkg/oci/oci.go); builds and the test
# daemon see the cache's store there through a bind mount in their own mount namespace.
UPSTREAM_IG_STORE=/var/lib/ig/oci-store

upstream_find_go() {
  local go
  go=$(command -v go || true)
  [ -n "$go" ] || go=/usr/local/go/bin/go
  [ -x "$go" ] || die "Go not found (need Go >= 1.26 on PATH or at /usr/local/go/bin/go)"
  printf '%s\n' "$go"
}

# upstream_src: the source path to build from, or nothing.
upstream_src() {
  if [ "${GADGETPIPE_UPSTREAM_SRC:-}" = none ]; then
    return 0
  elif [ -n "${GADGETPIPE_UPSTREAM_SRC:-}" ]; then
    [ -e "$GADGETPIPE_UPSTREAM_SRC" ] || die "GADGETPIPE_UPSTREAM_SRC=$GADGETPIPE_UPSTREAM_SRC does not exist"
    printf '%s\n' "$GADGETPIPE_UPSTREAM_SRC"
  elif [ -e "$UPSTREAM_DEFAULT_SRC" ]; then
    printf '%s\n' "$UPSTREAM_DEFAULT_SRC"
  fi
}

# The source may belong to another user (a sudo user's checkout read as root): git refuses such
# repositories ("dubious ownership") unless told they are safe; we only read them.
ugit() { git -c safe.directory='*' "$@"; }

# upstream_is_bare DIR: DIR is a git directory itself (a bare clone or a mirror's repo), not a
# checkout. (`rev-parse --is-bare-repository` is false for a mirror without core.bare.)
upstream_is_bare() {
  [ -e "$1/HEAD" ] && [ -d "$1/objects" ] && ugit --git-dir="$1" rev-parse -q --verify HEAD >/dev/null 2>&1
}

# upstream_key SRC: the commit the source is at (plus a hash of local changes), or a hash of
# the file list with sizes and times for a tree that is not a git checkout.
upstream_key() {
  local src="$1" head dirty
  if upstream_is_bare "$src"; then
    ugit --git-dir="$src" rev-parse HEAD
  elif head=$(ugit -C "$src" rev-parse HEAD 2>/dev/null); then
    dirty=$(ugit -C "$src" status --porcelain --untracked-files=no 2>/dev/null)
    if [ -n "$dirty" ]; then
      printf '%s-dirty-%s\n' "$head" "$(ugit -C "$src" diff HEAD | sha256sum | cut -c1-12)"
    else
      printf '%s\n' "$head"
    fi
  else
    [ -e "$src/go.mod" ] || die "$src is neither a git directory nor an upstream source tree (no go.mod)"
    printf 'tree-%s\n' "$( (cd "$src" && find . -type f -printf '%P %s %T@\n') | LC_ALL=C sort \
      | sha256sum | cut -c1-16)"
  fi
}

# upstream_export SRC DEST: a writable copy of the source in DEST, with the recipe's edits.
upstream_export() {
  local src="$1" dest="$2"
  rm -rf "$dest"
  mkdir -p "$dest"
  if upstream_is_bare "$src"; then
    ugit --git-dir="$src" archive HEAD | tar -x -C "$dest"
  else
    # Local changes are part of the source (the key says so).
    (cd "$src" && tar --exclude=./.git -cf - .) | tar -x -C "$dest"
  fi
  # These blank imports pull an ebpf-profiler fork that the module proxy refuses; none touches
  # the wire (client-side stack symbolisation only).
  sed -i '/pkg\/operators\/ustack"/d' "$dest/cmd/common/oci.go"
  sed -i -e '/pkg\/operators\/otel-profiles"/d' -e '/pkg\/operators\/ustack"/d' \
         -e '/pkg\/symbolizer\/otel"/d' "$dest/cmd/ig/main.go"
}

# upstream_goenv: env assignments shared with the other Go builds of the set-up.
upstream_goenv() {
  local go="$1"
  printf '%s\n' "PATH=$(dirname "$go"):$PATH" "GOPATH=$GP_CACHE/go" "GOCACHE=$GP_CACHE/go/build" \
    "GOMODCACHE=$GP_CACHE/go/mod" "GOTOOLCHAIN=local" "GOFLAGS=-mod=mod" "CGO_ENABLED=0"
}

# upstream_in_ns DIR CMD...: CMD in a private mount namespace that sees the cache's image store
# at ig's fixed store path and the source's BPF headers at /usr/include/gadget (where
# `ig image build --local` looks), so nothing outside the cache is written.
upstream_in_ns() {
  local dir="$1"; shift
  mkdir -p "$UPSTREAM_IG_STORE" /usr/include/gadget "$dir/oci-store"
  # shellcheck disable=SC2016  # expanded by the inner sh, from its arguments
  unshare -m --propagation private -- sh -euc '
    mount --bind "$1/oci-store" "$2"
    mount --bind "$1/src/include/gadget" /usr/include/gadget
    shift 2
    exec "$@"' sh "$dir" "$UPSTREAM_IG_STORE" "$@"
}

# upstream_build_images DIR: ig gadget images of our ten gadgets in DIR/oci-store.
upstream_build_images() {
  local dir="$1" go g gdir t0
  go=$(upstream_find_go)
  apt_install clang llvm libbpf-dev
  local -a goenv
  mapfile -t goenv < <(upstream_goenv "$go")
  for g in $UPSTREAM_GADGETS; do
    gdir="$dir/src/gadgets/$g"
    if [ "$g" = trace_exec ]; then
      # security_bprm_check is a kprobe this kernel lacks: build from a sibling folder (same
      # depth, so the wasm module's relative replace still resolves) that disables it.
      gdir="$dir/src/gadgets/${g}_gp"
      rm -rf "$gdir"
      cp -a "$dir/src/gadgets/$g" "$gdir"
      printf '\nprograms:\n  security_bprm_check:\n    attach_to: gadget_program_disabled\n' \
        >> "$gdir/gadget.yaml"
    fi
    t0=$SECONDS
    if ! upstream_in_ns "$dir" env "${goenv[@]}" "$dir/ig" image build --local \
        -t "$g:latest" "$gdir" > "$dir/image-$g.log" 2>&1; then
      tail -n 30 "$dir/image-$g.log" >&2
      die "ig image build of $g failed (full log: $dir/image-$g.log)"
    fi
    log "built ig image $g:latest ($((SECONDS - t0)) s)"
  done
}

# upstream_build SRC DIR: gadgetctl, ig and the images into DIR (all or nothing).
upstream_build() {
  local src="$1" dir="$2" go t0 b
  go=$(upstream_find_go)
  local -a goenv
  mapfile -t goenv < <(upstream_goenv "$go")
  mkdir -p "$dir"
  rm -f "$dir"/.built-*
  log "exporting the upstream source $src into $dir/src"
  upstream_export "$src" "$dir/src"
  for b in gadgetctl ig; do
    t0=$SECONDS
    log "building upstream $b (cold module cache: about a minute)"
    if ! (cd "$dir/src" && env "${goenv[@]}" "$go" build -trimpath -o "$dir/$b.tmp" "./cmd/$b") \
        > "$dir/build-$b.log" 2>&1; then
      tail -n 30 "$dir/build-$b.log" >&2
      die "building upstream $b failed (full log: $dir/build-$b.log)"
    fi
    mv -f "$dir/$b.tmp" "$dir/$b"
    log "built $dir/$b ($((SECONDS - t0)) s)"
  done
  rm -rf "$dir/oci-store"
  upstream_build_images "$dir"
  # The mount point was made for the builds only; an empty one would only puzzle.
  rmdir /usr/include/gadget 2>/dev/null || true
  touch "$dir/.built-r$UPSTREAM_RECIPE"
}

# upstream_newest_build: the most recent complete build in the cache, or nothing.
upstream_newest_build() {
  local stamp
  stamp=$(find "$GP_CACHE"/upstream -mindepth 2 -maxdepth 2 -name ".built-r$UPSTREAM_RECIPE" \
    -printf '%T@ %p\n' 2>/dev/null | sort -n | tail -n1 | cut -d' ' -f2-)
  [ -n "$stamp" ] && dirname "$stamp"
  return 0
}

# upstream_write_env CONTENT: $GP_CACHE/upstream.env, rewritten only on change.
upstream_write_env() {
  local env="$GP_CACHE/upstream.env"
  if [ ! -e "$env" ] || [ "$(cat "$env")" != "$1" ]; then
    printf '%s\n' "$1" > "$env.tmp"
    mv -f "$env.tmp" "$env"
  fi
}

setup_upstream() {
  local lock src key dir
  command -v git >/dev/null || apt_install git
  mkdir -p "$GP_CACHE/upstream"
  exec {lock}>"$GP_CACHE/.upstream.lock"
  flock "$lock"
  src=$(upstream_src)
  if [ -n "$src" ]; then
    key=$(upstream_key "$src")
    dir="$GP_CACHE/upstream/$key"
    if [ ! -e "$dir/.built-r$UPSTREAM_RECIPE" ]; then
      upstream_build "$src" "$dir"
    fi
  else
    dir=$(upstream_newest_build)
    if [ -z "$dir" ]; then
      upstream_write_env "$(printf 'UPSTREAM_MISSING=%s\n' \
        "no upstream source (GADGETPIPE_UPSTREAM_SRC unset and no $UPSTREAM_DEFAULT_SRC) and no cached build in $GP_CACHE/upstream")"
      exec {lock}>&-
      log "upstream clients: no upstream source and no cached build; the upstream-client tests" \
          "will not run (set GADGETPIPE_UPSTREAM_SRC=/path/to/inspektor-gadget and run again)"
      return 0
    fi
    log "upstream clients: no upstream source; using the cached build $dir"
    src="(cached)"
    key=$(basename "$dir")
  fi
  upstream_write_env "$(printf 'UPSTREAM_SRC=%s\nUPSTREAM_COMMIT=%s\nGADGETCTL_BIN=%s\nIG_BIN=%s\nIG_OCI_STORE=%s\nIG_STORE_MOUNT=%s\nUPSTREAM_GADGETS=%s\n' \
    "$src" "$key" "$dir/gadgetctl" "$dir/ig" "$dir/oci-store" "$UPSTREAM_IG_STORE" \
    "$(tr -s ' \n' '  ' <<<"$UPSTREAM_GADGETS" | sed 's/^ //; s/ $//')")"
  exec {lock}>&-
  log "upstream clients ready ($GP_CACHE/upstream.env)"
}
