# shellcheck shell=bash
# Real peers for the peer tests (tests/peers): a Kafka broker (jars from Maven Central), an
# OpenTelemetry Collector (built with the collector builder from the Go module proxy) and
# Debian's Prometheus. Each part is keyed on a hash of what defines it, so a warm run only
# renders two small texts and checks a few files. The paths go to $GP_CACHE/peers.env.
# Sourced after base.sh (log, die, apt_install, GP_ROOT, GP_CACHE).

PEERS_KAFKA_VERSION=4.3.1          # 4.4.0's dependency tree is not fully served by Maven Central
PEERS_LOG4J_VERSION=2.25.4         # the SLF4J binding matching the log4j-core Kafka ships
PEERS_OCB_VERSION=v0.165.0
# One collector release throughout: a single newer module makes tidy upgrade the core modules.
PEERS_OTEL_V0=v0.165.0
PEERS_OTEL_V1=v1.71.0
PEERS_OTEL_CONTRIB=v0.165.1
PEERS_OTEL_KAFKARECEIVER=v0.165.0  # v0.165.1 of this module is refused by the module proxy

# peers_hash: a short content hash of stdin.
peers_hash() { sha256sum | cut -c1-16; }

peers_find_go() {
  local go
  go=$(command -v go || true)
  [ -n "$go" ] || go=/usr/local/go/bin/go
  [ -x "$go" ] || die "Go not found (need Go >= 1.26 on PATH or at /usr/local/go/bin/go)"
  printf '%s\n' "$go"
}

peers_find_java() {
  local java
  java=$(command -v java || true)
  [ -n "$java" ] || die "java not found (Kafka 4 needs a JDK >= 17)"
  readlink -f "$java"
}

peers_kafka_pom() {
  cat <<EOF
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>local.gadgetpipe</groupId>
  <artifactId>kafka-broker-jars</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.apache.kafka</groupId>
      <artifactId>kafka_2.13</artifactId>
      <version>$PEERS_KAFKA_VERSION</version>
    </dependency>
    <!-- Kafka ships log4j-core but no SLF4J binding: without it the broker logs nothing. -->
    <dependency>
      <groupId>org.apache.logging.log4j</groupId>
      <artifactId>log4j-slf4j-impl</artifactId>
      <version>$PEERS_LOG4J_VERSION</version>
    </dependency>
  </dependencies>
</project>
EOF
}

# setup_peers_kafka: broker jars in $GP_CACHE/kafka/lib (the storage tool is inside kafka_2.13).
setup_peers_kafka() {
  local dir="$GP_CACHE/kafka" pom hash major
  pom=$(peers_kafka_pom)
  hash=$(printf '%s\n' "$pom" | peers_hash)
  [ -e "$dir/.lib-$hash" ] && [ -d "$dir/lib" ] && return 0

  command -v mvn >/dev/null || apt_install maven openjdk-17-jdk-headless
  major=$("$(peers_find_java)" -version 2>&1 | sed -n '1s/.*version "\([0-9]*\).*/\1/p')
  [ "${major:-0}" -ge 17 ] || die "Kafka $PEERS_KAFKA_VERSION needs Java >= 17, found '${major:-?}'"

  log "fetching Kafka $PEERS_KAFKA_VERSION broker jars with Maven"
  mkdir -p "$dir/build"
  printf '%s\n' "$pom" > "$dir/build/pom.xml"
  rm -rf "$dir/lib.tmp"
  (cd "$dir/build" && mvn -B -q -Dmaven.repo.local="$GP_CACHE/m2" \
    dependency:copy-dependencies -DoutputDirectory="$dir/lib.tmp") >&2 \
    || die "Maven could not fetch the Kafka jars (see above)"
  [ -e "$dir/lib.tmp/kafka_2.13-$PEERS_KAFKA_VERSION.jar" ] \
    || die "Maven finished but kafka_2.13-$PEERS_KAFKA_VERSION.jar is not in $dir/lib.tmp"
  rm -rf "${dir:?}/lib" "$dir"/.lib-*
  mv "$dir/lib.tmp" "$dir/lib"
  touch "$dir/.lib-$hash"
}

# peers_otelcol_manifest OUTPUT_PATH: the collector builder manifest.
peers_otelcol_manifest() {
  cat <<EOF
dist:
  module: example.com/gadgetpipe/otelcol-gp
  name: otelcol-gp
  description: OpenTelemetry Collector for gadgetpipe's peer tests
  output_path: $1
  version: ${PEERS_OTEL_V0#v}-gp
receivers:
  - gomod: go.opentelemetry.io/collector/receiver/otlpreceiver $PEERS_OTEL_V0
  - gomod: github.com/open-telemetry/opentelemetry-collector-contrib/receiver/kafkareceiver $PEERS_OTEL_KAFKARECEIVER
exporters:
  - gomod: go.opentelemetry.io/collector/exporter/debugexporter $PEERS_OTEL_V0
  - gomod: github.com/open-telemetry/opentelemetry-collector-contrib/exporter/fileexporter $PEERS_OTEL_CONTRIB
processors:
  - gomod: go.opentelemetry.io/collector/processor/batchprocessor $PEERS_OTEL_V0
providers:
  - gomod: go.opentelemetry.io/collector/confmap/provider/envprovider $PEERS_OTEL_V1
  - gomod: go.opentelemetry.io/collector/confmap/provider/fileprovider $PEERS_OTEL_V1
  - gomod: go.opentelemetry.io/collector/confmap/provider/yamlprovider $PEERS_OTEL_V1
# Only fileexporter's tests import otlpencodingextension, and the module proxy refuses it (403),
# which breaks the builder's go mod tidy; an empty local module satisfies tidy.
replaces:
  - $PEERS_OTLPENCODING_MODULE => ../stub/otlpencodingextension
EOF
}

PEERS_OTLPENCODING_MODULE=github.com/open-telemetry/opentelemetry-collector-contrib/extension/encoding/otlpencodingextension
peers_otelcol_stub_gomod() { printf 'module %s\n\ngo 1.22\n' "$PEERS_OTLPENCODING_MODULE"; }

# peers_otelcol_bin: where the binary for the current manifest lives (built or not).
peers_otelcol_bin() {
  local hash
  hash=$( { echo "builder $PEERS_OCB_VERSION"; peers_otelcol_manifest '@OUTPUT@'
             peers_otelcol_stub_gomod; } | peers_hash)
  printf '%s\n' "$GP_CACHE/otelcol/$hash/otelcol-gp"
}

# setup_peers_otelcol: $GP_CACHE/otelcol/<manifest-hash>/otelcol-gp (cold ~2 min, 2 cores).
setup_peers_otelcol() {
  local bin dir src go gover builder have="" components c
  bin=$(peers_otelcol_bin)
  [ -x "$bin" ] && return 0
  dir=$(dirname "$bin")
  src="$dir/src"
  go=$(peers_find_go)
  gover=$("$go" env GOVERSION)
  # The v0.165 modules declare go 1.26.0; an older Go would try to download a toolchain.
  [ "$(printf '%s\n' go1.26.0 "$gover" | sort -V | head -n1)" = go1.26.0 ] \
    || die "the collector build needs Go >= 1.26, $go is $gover"
  # Caches shared with bench.sh and kept across runs; GOTOOLCHAIN=local because a toolchain
  # download would need a network this machine does not have.
  local -a goenv=(
    "PATH=$(dirname "$go"):$PATH" "GOPATH=$GP_CACHE/go" "GOCACHE=$GP_CACHE/go/build"
    "GOMODCACHE=$GP_CACHE/go/mod" "GOTOOLCHAIN=local" "GOFLAGS="
  )
  builder="$GP_CACHE/go/bin/builder"
  # ocb prints its version on stderr.
  [ -x "$builder" ] && have=$("$builder" version 2>&1 || true)
  if [[ "${have:-}" != *" ${PEERS_OCB_VERSION}" ]]; then
    log "installing the collector builder $PEERS_OCB_VERSION"
    env "${goenv[@]}" "$go" install "go.opentelemetry.io/collector/cmd/builder@$PEERS_OCB_VERSION" >&2 \
      || die "go install of the collector builder failed"
  fi

  log "building the OpenTelemetry Collector into $dir (cold caches: about 2 minutes)"
  rm -rf "$src"
  mkdir -p "$src/stub/otlpencodingextension"
  printf 'package otlpencodingextension\n' > "$src/stub/otlpencodingextension/doc.go"
  peers_otelcol_stub_gomod > "$src/stub/otlpencodingextension/go.mod"
  peers_otelcol_manifest "$src/dist" > "$src/manifest.yaml"
  if ! (cd "$src" && env "${goenv[@]}" "$builder" --config manifest.yaml) > "$dir/build.log" 2>&1; then
    tail -n 40 "$dir/build.log" >&2
    die "the collector build failed (full log: $dir/build.log)"
  fi
  components=$("$src/dist/otelcol-gp" components 2>&1) || die "the built collector does not run: $components"
  for c in otlp kafka debug file batch; do
    grep -qE "^ *(- )?name: $c\$" <<<"$components" || die "the built collector lacks component '$c'"
  done
  mv -f "$src/dist/otelcol-gp" "$bin.tmp"
  mv -f "$bin.tmp" "$bin"
  rm -rf "$src"
  # Older manifests' binaries are 40-50 MB each and nothing refers to them any more.
  find "$GP_CACHE/otelcol" -mindepth 1 -maxdepth 1 -type d ! -path "$dir" -exec rm -rf {} +
}

# setup_peers_prometheus: the packaged binaries, without the packaged service.
setup_peers_prometheus() {
  apt_install prometheus
  # Tests run their own Prometheus on their own port; the Debian service would sit on 9090
  # scraping nothing, and a second test run must not find that port taken.
  # Unit files are checked even without a running systemd: this VM may be booted with it later.
  if command -v systemctl >/dev/null && systemctl is-enabled --quiet prometheus 2>/dev/null; then
    log "disabling the Debian prometheus service"
    systemctl disable --quiet prometheus >/dev/null 2>&1 || die "systemctl disable prometheus failed"
  fi
  if [ -d /run/systemd/system ]; then
    if systemctl is-active --quiet prometheus; then
      log "stopping the Debian prometheus service"
      systemctl stop prometheus || die "could not stop the Debian prometheus service"
    fi
  elif [ -x /etc/init.d/prometheus ]; then
    if compgen -G '/etc/rc[2-5].d/S*prometheus' >/dev/null; then
      log "disabling the Debian prometheus init script"
      update-rc.d prometheus disable >/dev/null 2>&1 || die "update-rc.d prometheus disable failed"
    fi
    if /etc/init.d/prometheus status >/dev/null 2>&1; then
      log "stopping the Debian prometheus service"
      /etc/init.d/prometheus stop >/dev/null || die "could not stop the Debian prometheus service"
    fi
  fi
  if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null; then
    die "the prometheus package is installed but prometheus/promtool are not on PATH"
  fi
}

setup_peers() {
  local lock env="$GP_CACHE/peers.env" content
  mkdir -p "$GP_CACHE"
  # Two set-ups at once (parallel CI jobs on one machine) would build into the same dirs.
  exec {lock}>"$GP_CACHE/.peers.lock"
  flock "$lock"
  setup_peers_kafka
  setup_peers_otelcol
  setup_peers_prometheus
  # systemd-analyze verifies the shipped unit file in the tests.
  apt_install systemd
  # The container tests run Debian's containerd with busybox containers (tests/peers/containerd.py).
  apt_install containerd runc busybox-static
  content=$(printf 'KAFKA_LIB=%s\nJAVA_BIN=%s\nOTELCOL_BIN=%s\nPROMETHEUS_BIN=%s\nPROMTOOL_BIN=%s\n' \
    "$GP_CACHE/kafka/lib" "$(peers_find_java)" "$(peers_otelcol_bin)" \
    "$(command -v prometheus)" "$(command -v promtool)")
  # Rewritten only on change, so a warm run leaves the file (and its mtime) alone.
  if [ ! -e "$env" ] || [ "$(cat "$env")" != "$content" ]; then
    printf '%s\n' "$content" > "$env.tmp"
    mv -f "$env.tmp" "$env"
  fi
  exec {lock}>&-
  log "real peers ready ($env)"
}
