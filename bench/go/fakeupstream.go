// fakeupstream: a fast stand-in for llama-server, for benchmarks (standard library only).
//
// It accepts llama-server's command line (-m FILE --host H --port P --alias NAME,
// --parallel N; every other flag is ignored), so smart-proxy can spawn it as its
// "llama-server". The model file may be JSON: {"slots": 512, "load_delay_ms": 0};
// anything else (a real GGUF) gives the defaults.
//
//	GET  /health               200 {"status":"ok"} (503 while "loading")
//	GET  /props                {"total_slots": N, ...}
//	POST /v1/chat/completions  canned chat JSON, or with "stream": true an SSE stream
//	POST /v1/completions       the same
//	GET  /bench/stats          requests seen, in flight, and every aborted request
//	POST /bench/reset          forget the stats
//
// So that it can also stand in for an Ollama server (a proxy.ini model with
// backend = ollama; its OpenAI clients go to the /v1 routes above):
//
//	GET  /api/version          {"version": "0.0.0-bench"}
//	POST /api/chat             canned Ollama chat JSON, or unless "stream": false, NDJSON
//	                           (options.num_predict lines, default 3, then the done line)
//
// Request fields used to shape the answer (a real llama-server ignores unknown fields):
//
//	max_tokens      chunks in a stream (default 100)
//	x_interval_ms   pause between chunks (0 = as fast as possible)
//	x_first_ms      pause before the first chunk ("prompt processing")
//	x_id            a name for the request, reported with its abort time
//
// An abort is the client closing the connection before the answer is complete; its
// time (wall clock, ns) is when this process noticed, so a load generator on the same
// machine can compute how long a proxy took to pass the abort on.
package main

import (
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"time"
)

var (
	alias     = "fake"
	slots     = 512
	readyAt   time.Time
	requests  int64
	inFlight  int64
	abortsMu  sync.Mutex
	aborts    = []abortRecord{}
	canned    []byte
	chunkTmpl string
)

type abortRecord struct {
	ID     string `json:"id"`
	TimeNs int64  `json:"t_ns"`
	Sent   int    `json:"chunks_sent"`
}

type ollamaRequest struct {
	Stream  *bool `json:"stream"`
	Options struct {
		NumPredict int `json:"num_predict"`
	} `json:"options"`
}

type request struct {
	Stream     bool    `json:"stream"`
	MaxTokens  int     `json:"max_tokens"`
	IntervalMs float64 `json:"x_interval_ms"`
	FirstMs    float64 `json:"x_first_ms"`
	ID         string  `json:"x_id"`
}

func main() {
	host, port, model := "127.0.0.1", "8080", ""
	args := os.Args[1:]
	for i := 0; i < len(args); i++ {
		next := func() string {
			if i+1 < len(args) {
				i++
				return args[i]
			}
			return ""
		}
		switch args[i] {
		case "-m", "--model":
			model = next()
		case "--host":
			host = next()
		case "--port":
			port = next()
		case "--alias", "-a":
			alias = next()
		case "--parallel", "-np":
			if n, err := strconv.Atoi(next()); err == nil && n > 0 {
				slots = n
			}
		}
	}
	loadDelay := 0.0
	if data, err := os.ReadFile(model); err == nil {
		var behaviour struct {
			Slots       int     `json:"slots"`
			LoadDelayMs float64 `json:"load_delay_ms"`
		}
		if json.Unmarshal(data, &behaviour) == nil {
			if behaviour.Slots > 0 {
				slots = behaviour.Slots
			}
			loadDelay = behaviour.LoadDelayMs
		}
	}
	readyAt = time.Now().Add(time.Duration(loadDelay * float64(time.Millisecond)))
	canned = []byte(fmt.Sprintf(`{"id":"chatcmpl-bench","object":"chat.completion","created":1700000000,"model":%q,`+
		`"system_fingerprint":"b0-bench","choices":[{"index":0,"finish_reason":"stop","message":{"role":"assistant",`+
		`"content":"Hello! How can I help you today? This is a canned answer of a typical short length."}}],`+
		`"usage":{"prompt_tokens":12,"completion_tokens":19,"total_tokens":31},`+
		`"timings":{"prompt_n":12,"prompt_ms":8.1,"predicted_n":19,"predicted_ms":310.2}}`, alias))
	chunkTmpl = `data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1700000000,"model":"` + alias +
		`","choices":[{"index":0,"finish_reason":null,"delta":{"content":"tok%d "}}]}` + "\n\n"

	mux := http.NewServeMux()
	mux.HandleFunc("/health", health)
	mux.HandleFunc("/props", props)
	mux.HandleFunc("/v1/chat/completions", complete)
	mux.HandleFunc("/v1/completions", complete)
	mux.HandleFunc("/bench/stats", stats)
	mux.HandleFunc("/bench/reset", reset)
	mux.HandleFunc("/api/version", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, 200, []byte(`{"version":"0.0.0-bench"}`))
	})
	mux.HandleFunc("/api/chat", ollamaChat)
	mux.HandleFunc("/v1/models", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, 200, []byte(fmt.Sprintf(`{"object":"list","data":[{"id":%q,"object":"model","owned_by":"bench"}]}`, alias)))
	})
	listener, err := net.Listen("tcp", net.JoinHostPort(host, port))
	if err != nil {
		fmt.Fprintln(os.Stderr, "listen:", err)
		os.Exit(1)
	}
	fmt.Printf("main: server is listening on http://%s:%s (fake, %d slots)\n", host, port, slots)
	// Like llama-server (cpp-httplib: "Keep-Alive: timeout=5, max=100"), close a
	// connection that has been idle for 5 s.
	server := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second, IdleTimeout: 5 * time.Second}
	if err := server.Serve(listener); err != nil {
		fmt.Fprintln(os.Stderr, "serve:", err)
		os.Exit(1)
	}
}

func writeJSON(w http.ResponseWriter, status int, body []byte) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Content-Length", strconv.Itoa(len(body)))
	w.WriteHeader(status)
	w.Write(body)
}

func health(w http.ResponseWriter, r *http.Request) {
	if time.Now().Before(readyAt) {
		writeJSON(w, 503, []byte(`{"error":{"code":503,"message":"Loading model","type":"unavailable_error"}}`))
		return
	}
	writeJSON(w, 200, []byte(`{"status":"ok"}`))
}

func props(w http.ResponseWriter, r *http.Request) {
	writeJSON(w, 200, []byte(fmt.Sprintf(`{"total_slots":%d,"model_alias":%q}`, slots, alias)))
}

func stats(w http.ResponseWriter, r *http.Request) {
	abortsMu.Lock()
	body, _ := json.Marshal(map[string]any{
		"requests": atomic.LoadInt64(&requests), "in_flight": atomic.LoadInt64(&inFlight), "aborts": aborts,
	})
	abortsMu.Unlock()
	writeJSON(w, 200, body)
}

func reset(w http.ResponseWriter, r *http.Request) {
	abortsMu.Lock()
	aborts = []abortRecord{}
	abortsMu.Unlock()
	atomic.StoreInt64(&requests, 0)
	writeJSON(w, 200, []byte(`{}`))
}

func aborted(id string, sent int) {
	now := time.Now().UnixNano()
	abortsMu.Lock()
	aborts = append(aborts, abortRecord{ID: id, TimeNs: now, Sent: sent})
	abortsMu.Unlock()
}

func complete(w http.ResponseWriter, r *http.Request) {
	atomic.AddInt64(&requests, 1)
	atomic.AddInt64(&inFlight, 1)
	defer atomic.AddInt64(&inFlight, -1)
	body, err := io.ReadAll(r.Body)
	var req request
	if err != nil || json.Unmarshal(body, &req) != nil {
		writeJSON(w, 400, []byte(`{"error":{"code":400,"message":"bad json","type":"invalid_request_error"}}`))
		return
	}
	if !req.Stream {
		writeJSON(w, 200, canned)
		return
	}
	n := req.MaxTokens
	if n <= 0 {
		n = 100
	}
	flusher := w.(http.Flusher)
	w.Header().Set("Content-Type", "text/event-stream")
	w.Header().Set("Cache-Control", "no-cache")
	w.WriteHeader(200)
	flusher.Flush()
	done := r.Context().Done()
	wait := func(ms float64) bool {
		if ms <= 0 {
			select {
			case <-done:
				return false
			default:
				return true
			}
		}
		timer := time.NewTimer(time.Duration(ms * float64(time.Millisecond)))
		defer timer.Stop()
		select {
		case <-done:
			return false
		case <-timer.C:
			return true
		}
	}
	if !wait(req.FirstMs) {
		aborted(req.ID, 0)
		return
	}
	// Pace against a schedule, not "interval after each write", so a slow reader
	// cannot stretch the upstream's own rhythm.
	start := time.Now()
	for i := 0; i < n; i++ {
		if i > 0 && req.IntervalMs > 0 {
			due := start.Add(time.Duration(float64(i) * req.IntervalMs * float64(time.Millisecond)))
			if !wait(float64(time.Until(due)) / float64(time.Millisecond)) {
				aborted(req.ID, i)
				return
			}
		} else if i%256 == 0 && !wait(0) {
			aborted(req.ID, i)
			return
		}
		if _, err := fmt.Fprintf(w, chunkTmpl, i); err != nil {
			aborted(req.ID, i)
			return
		}
		flusher.Flush()
	}
	fmt.Fprintf(w, `data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1700000000,"model":%q,`+
		`"choices":[{"index":0,"finish_reason":"length","delta":{}}],"usage":{"prompt_tokens":3,"completion_tokens":%d,"total_tokens":%d}}`+
		"\n\ndata: [DONE]\n\n", alias, n, n+3)
	flusher.Flush()
}

// ollamaChat answers Ollama's /api/chat: one JSON object with "stream": false, else NDJSON.
func ollamaChat(w http.ResponseWriter, r *http.Request) {
	atomic.AddInt64(&requests, 1)
	body, err := io.ReadAll(r.Body)
	var req ollamaRequest
	if err != nil || json.Unmarshal(body, &req) != nil {
		writeJSON(w, 400, []byte(`{"error":"bad json"}`))
		return
	}
	done := `"done":true,"done_reason":"stop","total_duration":310200000,"load_duration":100000,` +
		`"prompt_eval_count":12,"prompt_eval_duration":8100000,"eval_count":19,"eval_duration":310200000}`
	if req.Stream != nil && !*req.Stream {
		writeJSON(w, 200, []byte(fmt.Sprintf(`{"model":%q,"created_at":"2023-11-14T22:13:20Z",`+
			`"message":{"role":"assistant","content":"Hello! How can I help you today? This is a canned answer of a `+
			`typical short length."},`, alias)+done))
		return
	}
	n := req.Options.NumPredict
	if n <= 0 {
		n = 3
	}
	flusher := w.(http.Flusher)
	w.Header().Set("Content-Type", "application/x-ndjson")
	w.WriteHeader(200)
	for i := 0; i < n; i++ {
		if _, err := fmt.Fprintf(w, `{"model":%q,"created_at":"2023-11-14T22:13:20Z","message":{"role":"assistant",`+
			`"content":"tok%d "},"done":false}`+"\n", alias, i); err != nil {
			return
		}
		flusher.Flush()
	}
	fmt.Fprintf(w, `{"model":%q,"created_at":"2023-11-14T22:13:20Z","message":{"role":"assistant","content":""},`+done+"\n", alias)
	flusher.Flush()
}
