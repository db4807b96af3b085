// goproxy: the minimal Go reverse proxy the benchmarks compare against (standard library only).
//
// net/http/httputil's ReverseProxy, the primitive llama-swap builds on, with streaming
// flushed at once (FlushInterval -1) and a connection pool big enough for every client.
//
//	goproxy -listen 127.0.0.1:9000 -target http://127.0.0.1:8081
package main

import (
	"flag"
	"fmt"
	"log"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"time"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:0", "address to listen on")
	target := flag.String("target", "", "upstream base URL")
	flag.Parse()
	upstream, err := url.Parse(*target)
	if err != nil || *target == "" {
		fmt.Fprintln(os.Stderr, "goproxy: -target http://host:port is required")
		os.Exit(2)
	}
	proxy := httputil.NewSingleHostReverseProxy(upstream)
	proxy.FlushInterval = -1
	proxy.Transport = &http.Transport{
		DialContext:         (&net.Dialer{Timeout: 10 * time.Second, KeepAlive: 30 * time.Second}).DialContext,
		MaxIdleConns:        4096,
		MaxIdleConnsPerHost: 4096,
		IdleConnTimeout:     90 * time.Second,
	}
	proxy.ErrorLog = log.New(os.Stderr, "goproxy: ", 0)
	listener, err := net.Listen("tcp", *listen)
	if err != nil {
		fmt.Fprintln(os.Stderr, "goproxy:", err)
		os.Exit(1)
	}
	fmt.Printf("goproxy listening on http://%s -> %s\n", listener.Addr(), upstream)
	log.Fatal(http.Serve(listener, proxy))
}
