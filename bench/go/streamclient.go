// streamclient: a raw-socket load generator for streamed answers (standard library only).
//
// It opens -n connections at once, writes one HTTP/1.1 POST on each by hand, parses
// the answer with net/http's response reader (which de-chunks as bytes arrive) and
// timestamps every event as it completes: an SSE event ends with a blank line, an
// NDJSON event with a newline. It prints one JSON object: time to first event,
// gaps between events, events per second over the whole run, lost events, errors,
// and for -abort runs the wall-clock time (ns) each client hung up, by request id.
//
//	streamclient -url http://127.0.0.1:8080/v1/chat/completions -n 64 \
//	    -body '{"model":"m","stream":true,"max_tokens":100,"x_interval_ms":20,"x_id":"{ID}"}' -expect 102
package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"
)

type result struct {
	id       string
	err      string
	status   int
	events   int
	ttfc     time.Duration
	gaps     []time.Duration
	last     time.Time
	abortNs  int64
	complete bool
	tail     []string
}

func main() {
	target := flag.String("url", "", "URL to POST to")
	n := flag.Int("n", 1, "concurrent streams")
	body := flag.String("body", "{}", "JSON body; {ID} is replaced by the stream's id")
	prefix := flag.String("id-prefix", "s", "prefix of stream ids")
	sep := flag.String("sep", "sse", "sse (events end with a blank line) or ndjson (events end with a newline)")
	expect := flag.Int("expect", 0, "events a complete stream carries (0: do not count lost events)")
	abort := flag.String("abort", "", "hang up: headers | chunks:K | ms:T")
	timeout := flag.Float64("timeout", 60, "seconds a stream may take")
	stagger := flag.Float64("stagger-ms", 0, "pause between opening connections")
	keep := flag.Int("tail", 0, "report the last K events of the first stream (their text)")
	flag.Parse()
	u, err := url.Parse(*target)
	if err != nil || u.Host == "" {
		fmt.Fprintln(os.Stderr, "streamclient: -url is required")
		os.Exit(2)
	}
	separator := []byte("\n\n")
	if *sep == "ndjson" {
		separator = []byte("\n")
	}
	results := make([]result, *n)
	var wg sync.WaitGroup
	start := time.Now()
	for i := 0; i < *n; i++ {
		wg.Add(1)
		id := fmt.Sprintf("%s%d", *prefix, i)
		payload := strings.ReplaceAll(*body, "{ID}", id)
		go func(i int) {
			defer wg.Done()
			results[i] = stream(u, id, payload, separator, *abort, time.Duration(*timeout*float64(time.Second)), *keep)
		}(i)
		if *stagger > 0 {
			time.Sleep(time.Duration(*stagger * float64(time.Millisecond)))
		}
	}
	wg.Wait()
	report(results, start, *expect)
}

func stream(u *url.URL, id, payload string, separator []byte, abort string, timeout time.Duration, keep int) (r result) {
	r.id = id
	began := time.Now()
	conn, err := net.DialTimeout("tcp", u.Host, 10*time.Second)
	if err != nil {
		r.err = "connect: " + err.Error()
		return
	}
	defer conn.Close()
	conn.SetDeadline(began.Add(timeout))
	request := fmt.Sprintf("POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\nAccept: */*\r\n"+
		"Content-Length: %d\r\n\r\n%s", u.RequestURI(), u.Host, len(payload), payload)
	hangUp := func() {
		r.abortNs = time.Now().UnixNano()
		conn.Close()
	}
	abortChunks := -1
	if strings.HasPrefix(abort, "chunks:") {
		abortChunks, _ = strconv.Atoi(strings.TrimPrefix(abort, "chunks:"))
	}
	if strings.HasPrefix(abort, "ms:") {
		ms, _ := strconv.ParseFloat(strings.TrimPrefix(abort, "ms:"), 64)
		timer := time.AfterFunc(time.Duration(ms*float64(time.Millisecond)), hangUp)
		defer timer.Stop()
	}
	if _, err := io.WriteString(conn, request); err != nil {
		r.err = "write: " + err.Error()
		return
	}
	reader := bufio.NewReaderSize(conn, 64*1024)
	response, err := http.ReadResponse(reader, nil)
	if err != nil {
		if r.abortNs == 0 {
			r.err = "headers: " + err.Error()
		}
		return
	}
	r.status = response.StatusCode
	if abort == "headers" {
		hangUp()
		return
	}
	if response.StatusCode != 200 {
		msg, _ := io.ReadAll(io.LimitReader(response.Body, 300))
		r.err = fmt.Sprintf("status %d: %s", response.StatusCode, msg)
		return
	}
	buf := make([]byte, 64*1024)
	var pending []byte
	var previous time.Time
	for {
		count, err := response.Body.Read(buf)
		if count > 0 {
			now := time.Now()
			pending = append(pending, buf[:count]...)
			for {
				at := bytes.Index(pending, separator)
				if at < 0 {
					break
				}
				if keep > 0 {
					r.tail = append(r.tail, string(pending[:at]))
					if len(r.tail) > keep {
						r.tail = r.tail[1:]
					}
				}
				pending = pending[at+len(separator):]
				r.events++
				if r.events == 1 {
					r.ttfc = now.Sub(began)
				} else {
					r.gaps = append(r.gaps, now.Sub(previous))
				}
				previous = now
				r.last = now
			}
			if abortChunks >= 0 && r.events >= abortChunks {
				hangUp()
				return
			}
		}
		if err == io.EOF {
			r.complete = true
			return
		}
		if err != nil {
			if r.abortNs == 0 {
				r.err = "body: " + err.Error()
			}
			return
		}
	}
}

func percentiles(values []time.Duration) (map[string]float64, []float64) {
	out := map[string]float64{"n": float64(len(values))}
	if len(values) == 0 {
		return out, nil
	}
	sort.Slice(values, func(a, b int) bool { return values[a] < values[b] })
	at := func(p float64) float64 {
		i := int(p / 100 * float64(len(values)-1))
		return float64(values[i]) / 1e6
	}
	for _, p := range []float64{50, 90, 99, 99.9, 100} {
		out["p"+strconv.FormatFloat(p, 'f', -1, 64)] = at(p)
	}
	var sum time.Duration
	for _, v := range values {
		sum += v
	}
	out["mean"] = float64(sum) / float64(len(values)) / 1e6
	cdf := make([]float64, 101)
	for i := range cdf {
		cdf[i] = at(float64(i))
	}
	return out, cdf
}

func report(results []result, start time.Time, expect int) {
	var ttfcs, gaps []time.Duration
	events, ok, lost := 0, 0, 0
	errors := map[string]int{}
	aborts := map[string]int64{}
	var last time.Time
	for _, r := range results {
		events += r.events
		if r.err != "" {
			key := r.err
			if len(key) > 120 {
				key = key[:120]
			}
			errors[key]++
		}
		if r.abortNs != 0 {
			aborts[r.id] = r.abortNs
		}
		if r.events > 0 {
			ttfcs = append(ttfcs, r.ttfc)
			gaps = append(gaps, r.gaps...)
		}
		if r.complete && r.err == "" {
			ok++
			if expect > 0 && r.events < expect {
				lost += expect - r.events
			}
		}
		if r.last.After(last) {
			last = r.last
		}
	}
	duration := last.Sub(start).Seconds()
	rate := 0.0
	if duration > 0 {
		rate = float64(events) / duration
	}
	ttfcStats, ttfcCdf := percentiles(ttfcs)
	gapStats, gapCdf := percentiles(gaps)
	out := map[string]any{
		"streams": len(results), "complete": ok, "events": events, "lost": lost, "errors": errors,
		"duration_s": duration, "events_per_s": rate, "ttfc_ms": ttfcStats, "gap_ms": gapStats,
		"ttfc_cdf_ms": ttfcCdf, "gap_cdf_ms": gapCdf, "aborts": aborts,
	}
	if len(results) > 0 && results[0].tail != nil {
		out["tail"] = results[0].tail
	}
	encoded, _ := json.Marshal(out)
	fmt.Println(string(encoded))
}
