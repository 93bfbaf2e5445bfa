// Command goclient is a benchmark peer for gadgetpipe: an upstream-style gRPC client of
// /api.GadgetManager/RunGadget built on grpc-go, with no generated code. Messages travel as raw
// bytes (a passthrough codec registered as "proto", so the wire is "application/grpc" exactly
// as upstream's) and are encoded and decoded by hand with protowire.
//
// It follows upstream's pkg/runtime/grpc receive loop (spec 3.4): one run or attach request,
// send side kept open, GadgetInfo first, seq checked per payload event, payloads decoded as
// GadgetData (data source type 1) or GadgetDataArray (type 2). It prints one JSON summary line.
package main

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/connectivity"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/encoding"
	"google.golang.org/grpc/mem"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protowire"
)

const (
	method        = "/api.GadgetManager/RunGadget"
	maxRecvSize   = 4 << 20 // grpc-go's default, which upstream keeps
	resultTimeout = 30 * time.Second
	logShift      = 16
	typePayload   = 0
	typeInfo      = 4
	dsSingle      = 1
	dsArray       = 2
)

var errResultTimeout = errors.New("timed out while getting result")

// rawCodec passes *[]byte through unchanged. Unmarshal copies into the caller's buffer, so a
// receive loop that reuses one buffer allocates nothing per message on its own side.
type rawCodec struct{}

func (rawCodec) Name() string { return "proto" }

func (rawCodec) Marshal(v any) (mem.BufferSlice, error) {
	return mem.BufferSlice{mem.SliceBuffer(*v.(*[]byte))}, nil
}

func (rawCodec) Unmarshal(data mem.BufferSlice, v any) error {
	p := v.(*[]byte)
	b := (*p)[:0]
	for _, d := range data {
		b = append(b, d.ReadOnlyData()...)
	}
	*p = b
	return nil
}

func init() { encoding.RegisterCodecV2(rawCodec{}) }

type params map[string]string

func (p params) String() string { return fmt.Sprint(map[string]string(p)) }

func (p params) Set(s string) error {
	k, v, ok := strings.Cut(s, "=")
	if !ok {
		return fmt.Errorf("want key=value, got %q", s)
	}
	p[k] = v
	return nil
}

// DataSource is the part of api.DataSource the client needs.
type DataSource struct {
	ID   uint32 `json:"id"`
	Name string `json:"name"`
	Type uint32 `json:"type"`
}

// Summary is the one JSON line printed at the end. Seconds is the whole stream (request sent to
// end of stream); RecordsPerS is measured from the first to the last payload event.
type Summary struct {
	Records     uint64       `json:"records"`
	Messages    uint64       `json:"messages"`
	Lost        uint64       `json:"lost"`
	Early       uint64       `json:"early"`
	Logs        uint64       `json:"logs"`
	Unknown     uint64       `json:"unknown"`
	Invalid     uint64       `json:"invalid"`  // undecodable payloads or unknown data source ids
	SeqBack     uint64       `json:"seq_back"` // payload events whose seq went backwards
	FirstSeq    uint32       `json:"first_seq"`
	LastSeq     uint32       `json:"last_seq"`
	Seconds     float64      `json:"seconds"`
	DataSeconds float64      `json:"data_seconds"`
	RecordsPerS float64      `json:"records_per_s"`
	Status      string       `json:"status"`
	DataSources []DataSource `json:"datasources"`
}

func main() {
	var (
		addr       = flag.String("addr", "unix:///var/run/ig/ig.socket", "unix:///path.sock or host:port")
		image      = flag.String("image", "", "gadget image name (run)")
		attach     = flag.String("attach", "", "instance id to attach to instead of running")
		timeout    = flag.Duration("timeout", 0, "gadget timeout sent to the server (0 = until stopped)")
		logLevel   = flag.Uint("log-level", 0, "logLevel sent in the run request (4 = info, 5 = debug)")
		dumpPath   = flag.String("dump", "", "write every record as a JSON line to this file")
		stopAfter  = flag.Uint64("stop-after", 0, "send a stop request after this many records")
		connectTO  = flag.Duration("connect-timeout", 5*time.Second, "blocking connect timeout")
		quiet      = flag.Bool("quiet", false, "no warnings on stderr")
		verbose    = flag.Bool("v", false, "print log events on stderr")
		tlsCA      = flag.String("tls-ca", "", "CA file that verifies the server (enables TLS)")
		tlsCert    = flag.String("tls-cert", "", "client certificate file (mTLS)")
		tlsKey     = flag.String("tls-key", "", "client key file (mTLS)")
		tlsName    = flag.String("tls-server-name", "", "server name to verify")
		paramValue = params{}
	)
	flag.Var(paramValue, "param", "key=value, repeatable")
	flag.Parse()
	if (*image == "") == (*attach == "") {
		fmt.Fprintln(os.Stderr, "goclient: give exactly one of -image or -attach")
		os.Exit(2)
	}
	warn := func(format string, a ...any) {
		if !*quiet {
			fmt.Fprintf(os.Stderr, "goclient: "+format+"\n", a...)
		}
	}

	creds := insecure.NewCredentials()
	if *tlsCA != "" || *tlsCert != "" {
		c, err := tlsCreds(*tlsCA, *tlsCert, *tlsKey, *tlsName)
		if err != nil {
			fatal(err)
		}
		creds = c
	}
	target := *addr
	if !strings.HasPrefix(target, "unix:") {
		target = "passthrough:///" + strings.TrimPrefix(target, "tcp://")
	}
	conn, err := grpc.NewClient(target, grpc.WithTransportCredentials(creds),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(maxRecvSize)))
	if err != nil {
		fatal(err)
	}
	defer conn.Close()
	if err := waitReady(conn, *connectTO); err != nil {
		fatal(err)
	}

	var req []byte
	if *attach != "" {
		req = attachRequest(*attach)
	} else {
		req = runRequest(*image, paramValue, uint64(*logLevel), int64(*timeout))
	}

	// Not the user's context: a SIGINT must reach the server as a stop request (spec 3.4).
	ctx, cancelCause := context.WithCancelCause(context.Background())
	cancel := func() { cancelCause(nil) }
	defer cancel()
	start := time.Now()
	stream, err := conn.NewStream(ctx, &grpc.StreamDesc{ServerStreams: true, ClientStreams: true}, method)
	if err != nil {
		fatal(err)
	}
	if err := stream.SendMsg(&req); err != nil {
		fatal(err)
	}

	// stop ends the run once: a stop request for runs (then wait up to resultTimeout), a cancel
	// for attach sessions, as upstream does. Safe from any goroutine.
	var stopOnce sync.Once
	var cancelled atomic.Bool
	stop := func() {
		stopOnce.Do(func() {
			if *attach != "" {
				cancelled.Store(true)
				cancel()
				return
			}
			msg := []byte{0x12, 0x00} // GadgetControlRequest{stopRequest: {}}
			if err := stream.SendMsg(&msg); err != nil && !errors.Is(err, io.EOF) {
				warn("sending stop: %v", err)
			}
			time.AfterFunc(resultTimeout, func() { cancelCause(errResultTimeout) })
		})
	}
	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, os.Interrupt, syscall.SIGTERM)
	go func() {
		<-sigs
		stop()
		<-sigs
		cancel()
	}()
	if *timeout > 0 {
		time.AfterFunc(*timeout, stop)
	}

	var dump *bufio.Writer
	if *dumpPath != "" {
		f, err := os.Create(*dumpPath)
		if err != nil {
			fatal(err)
		}
		defer f.Close()
		dump = bufio.NewWriterSize(f, 1<<20)
	}

	var (
		s          Summary
		dsType     []uint32 // indexed by data source id; 0 = unknown
		infoSeen   bool
		expected   uint32 = 1
		firstData  time.Time
		lastData   time.Time
		buf        []byte
		line       []byte
		recvErr    error
		payloadBuf [][]byte
	)
	for {
		if recvErr = stream.RecvMsg(&buf); recvErr != nil {
			break
		}
		s.Messages++
		typ, seq, dsID, payload, err := decodeEvent(buf)
		if err != nil {
			s.Invalid++
			continue
		}
		switch {
		case typ == typeInfo:
			if infoSeen {
				continue // first GadgetInfo wins
			}
			if s.DataSources, err = decodeInfo(payload); err != nil {
				fatal(fmt.Errorf("decoding GadgetInfo: %w", err))
			}
			for _, ds := range s.DataSources {
				for uint32(len(dsType)) <= ds.ID {
					dsType = append(dsType, 0)
				}
				dsType[ds.ID] = ds.Type
			}
			infoSeen = true
		case typ == typePayload && !infoSeen:
			s.Early++
			warn("payload event before GadgetInfo, dropped")
		case typ == typePayload:
			lastData = time.Now()
			if firstData.IsZero() {
				s.FirstSeq, firstData = seq, lastData
			}
			s.LastSeq = seq
			if seq > expected {
				s.Lost += uint64(seq - expected)
				warn("expected seq %d, got %d, %d messages dropped", expected, seq, seq-expected)
			} else if seq < expected {
				s.SeqBack++
				warn("expected seq %d, got %d (backwards)", expected, seq)
			}
			expected = seq + 1
			var t uint32
			if dsID < uint32(len(dsType)) {
				t = dsType[dsID]
			}
			n, err := countRecords(t, payload, dump != nil, &payloadBuf, func(p [][]byte) {
				line = dumpLine(line[:0], dsID, seq, p)
				dump.Write(line)
			})
			if err != nil {
				s.Invalid++
				continue
			}
			s.Records += n
			if *stopAfter > 0 && s.Records >= *stopAfter {
				stop()
			}
		case typ >= 1<<logShift:
			s.Logs++
			if *verbose {
				fmt.Fprintf(os.Stderr, "log[%d]: %s\n", typ>>logShift, payload)
			}
		default:
			s.Unknown++
			warn("unknown payload type %d: %q", typ, payload)
		}
	}
	end := time.Now()

	if dump != nil {
		if err := dump.Flush(); err != nil {
			fatal(err)
		}
	}
	s.Seconds = end.Sub(start).Seconds()
	s.DataSeconds = lastData.Sub(firstData).Seconds()
	if s.DataSeconds > 0 {
		s.RecordsPerS = float64(s.Records) / s.DataSeconds
	} else if s.Seconds > 0 {
		s.RecordsPerS = float64(s.Records) / s.Seconds
	}
	if s.DataSources == nil {
		s.DataSources = []DataSource{}
	}
	ok := errors.Is(recvErr, io.EOF)
	switch {
	case ok:
		s.Status = "OK"
	case context.Cause(ctx) == errResultTimeout:
		s.Status = "DeadlineExceeded: " + errResultTimeout.Error()
	default:
		st := status.Convert(recvErr)
		s.Status = fmt.Sprintf("%s: %s", st.Code(), st.Message())
	}
	out, _ := json.Marshal(&s)
	fmt.Println(string(out))
	if !ok && !cancelled.Load() {
		os.Exit(1)
	}
}

func fatal(err error) {
	fmt.Fprintln(os.Stderr, "goclient:", err)
	os.Exit(1)
}

func tlsCreds(ca, cert, key, name string) (credentials.TransportCredentials, error) {
	cfg := &tls.Config{ServerName: name, MinVersion: tls.VersionTLS12}
	if ca != "" {
		pem, err := os.ReadFile(ca)
		if err != nil {
			return nil, err
		}
		cfg.RootCAs = x509.NewCertPool()
		if !cfg.RootCAs.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("no certificate in %s", ca)
		}
	}
	if cert != "" {
		kp, err := tls.LoadX509KeyPair(cert, key)
		if err != nil {
			return nil, err
		}
		cfg.Certificates = []tls.Certificate{kp}
	}
	return credentials.NewTLS(cfg), nil
}

// waitReady connects like upstream's blocking dial: wait for READY, up to timeout.
func waitReady(conn *grpc.ClientConn, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	conn.Connect()
	for st := conn.GetState(); st != connectivity.Ready; st = conn.GetState() {
		if !conn.WaitForStateChange(ctx, st) {
			return fmt.Errorf("connecting: %w (last state %s)", ctx.Err(), st)
		}
	}
	return nil
}

// runRequest encodes GadgetControlRequest{runRequest{imageName, paramValues, version=1,
// logLevel, timeout}}; proto3 defaults are omitted, map entries sorted by key.
func runRequest(image string, p params, logLevel uint64, timeout int64) []byte {
	var r []byte
	r = protowire.AppendTag(r, 1, protowire.BytesType)
	r = protowire.AppendString(r, image)
	keys := make([]string, 0, len(p))
	for k := range p {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		var e []byte
		e = protowire.AppendTag(e, 1, protowire.BytesType)
		e = protowire.AppendString(e, k)
		e = protowire.AppendTag(e, 2, protowire.BytesType)
		e = protowire.AppendString(e, p[k])
		r = protowire.AppendTag(r, 2, protowire.BytesType)
		r = protowire.AppendBytes(r, e)
	}
	r = protowire.AppendTag(r, 4, protowire.VarintType)
	r = protowire.AppendVarint(r, 1)
	if logLevel != 0 {
		r = protowire.AppendTag(r, 12, protowire.VarintType)
		r = protowire.AppendVarint(r, logLevel)
	}
	if timeout != 0 {
		r = protowire.AppendTag(r, 13, protowire.VarintType)
		r = protowire.AppendVarint(r, uint64(timeout))
	}
	out := protowire.AppendTag(nil, 1, protowire.BytesType)
	return protowire.AppendBytes(out, r)
}

// attachRequest encodes GadgetControlRequest{attachRequest{id, version=1}}.
func attachRequest(id string) []byte {
	var a []byte
	a = protowire.AppendTag(a, 1, protowire.BytesType)
	a = protowire.AppendString(a, id)
	a = protowire.AppendTag(a, 2, protowire.VarintType)
	a = protowire.AppendVarint(a, 1)
	out := protowire.AppendTag(nil, 3, protowire.BytesType)
	return protowire.AppendBytes(out, a)
}

// fields walks the top-level fields of a message, calling fn for each varint or bytes field.
// Other wire types are skipped.
func fields(b []byte, fn func(num protowire.Number, v uint64, p []byte) error) error {
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return protowire.ParseError(n)
		}
		b = b[n:]
		var v uint64
		var p []byte
		switch typ {
		case protowire.VarintType:
			v, n = protowire.ConsumeVarint(b)
		case protowire.BytesType:
			p, n = protowire.ConsumeBytes(b)
		default:
			n = protowire.ConsumeFieldValue(num, typ, b)
		}
		if n < 0 {
			return protowire.ParseError(n)
		}
		b = b[n:]
		if typ == protowire.VarintType || typ == protowire.BytesType {
			if err := fn(num, v, p); err != nil {
				return err
			}
		}
	}
	return nil
}

// decodeEvent decodes GadgetEvent{type=1, seq=2, payload=3, dataSourceID=4}. It is the hot
// path, so it is written out rather than built on fields.
func decodeEvent(b []byte) (typ, seq, dsID uint32, payload []byte, err error) {
	for len(b) > 0 {
		num, wt, n := protowire.ConsumeTag(b)
		if n < 0 {
			return 0, 0, 0, nil, protowire.ParseError(n)
		}
		b = b[n:]
		switch {
		case wt == protowire.VarintType:
			var v uint64
			v, n = protowire.ConsumeVarint(b)
			switch num {
			case 1:
				typ = uint32(v)
			case 2:
				seq = uint32(v)
			case 4:
				dsID = uint32(v)
			}
		case wt == protowire.BytesType && num == 3:
			payload, n = protowire.ConsumeBytes(b)
		default:
			n = protowire.ConsumeFieldValue(num, wt, b)
		}
		if n < 0 {
			return 0, 0, 0, nil, protowire.ParseError(n)
		}
		b = b[n:]
	}
	return typ, seq, dsID, payload, nil
}

// decodeInfo returns GadgetInfo.dataSources (field 4) as DataSource{id=1, name=2, type=3}.
func decodeInfo(b []byte) ([]DataSource, error) {
	var out []DataSource
	err := fields(b, func(num protowire.Number, _ uint64, p []byte) error {
		if num != 4 {
			return nil
		}
		var ds DataSource
		err := fields(p, func(num protowire.Number, v uint64, p []byte) error {
			switch num {
			case 1:
				ds.ID = uint32(v)
			case 2:
				ds.Name = string(p)
			case 3:
				ds.Type = uint32(v)
			}
			return nil
		})
		out = append(out, ds)
		return err
	})
	return out, err
}

// countRecords counts the DataElements of a payload event: GadgetData.data (field 3) for a
// single data source, GadgetDataArray.dataArray (repeated field 3) for an array one. With
// collect, each element's payloads are passed to emit (p is reused between calls).
func countRecords(dsType uint32, b []byte, collect bool, p *[][]byte, emit func([][]byte)) (uint64, error) {
	if dsType != dsSingle && dsType != dsArray {
		return 0, errors.New("unknown data source")
	}
	var n uint64
	err := fields(b, func(num protowire.Number, _ uint64, elem []byte) error {
		if num != 3 {
			return nil
		}
		n++
		if dsType == dsSingle && n > 1 {
			return errors.New("GadgetData with more than one element")
		}
		if !collect {
			return nil
		}
		*p = (*p)[:0]
		if err := fields(elem, func(num protowire.Number, _ uint64, v []byte) error {
			if num == 1 {
				*p = append(*p, v)
			}
			return nil
		}); err != nil {
			return err
		}
		emit(*p)
		return nil
	})
	return n, err
}

func dumpLine(b []byte, ds, seq uint32, payloads [][]byte) []byte {
	b = append(b, `{"ds":`...)
	b = strconv.AppendUint(b, uint64(ds), 10)
	b = append(b, `,"seq":`...)
	b = strconv.AppendUint(b, uint64(seq), 10)
	b = append(b, `,"payloads":[`...)
	for i, p := range payloads {
		if i > 0 {
			b = append(b, ',')
		}
		b = append(b, '"')
		b = hex.AppendEncode(b, p)
		b = append(b, '"')
	}
	return append(b, "]}\n"...)
}
