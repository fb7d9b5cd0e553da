// The seed's §3.1 Go gateway, rebuilt as a benchmark peer: net/http,
// httputil.ReverseProxy, a logging middleware (log.Printf per request, as in
// the seed) and a token-bucket rate limiter set high enough never to trip.
// Standard library only.
//
// Usage: go-gateway LISTEN UPSTREAM_URL
package main

import (
	"log"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"sync"
	"time"
)

// tokenBucket refills `rate` tokens per second up to `burst`.
type tokenBucket struct {
	mu     sync.Mutex
	tokens float64
	burst  float64
	rate   float64
	last   time.Time
}

func (b *tokenBucket) allow() bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	now := time.Now()
	b.tokens += now.Sub(b.last).Seconds() * b.rate
	if b.tokens > b.burst {
		b.tokens = b.burst
	}
	b.last = now
	if b.tokens < 1 {
		return false
	}
	b.tokens--
	return true
}

func rateLimit(bucket *tokenBucket, next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !bucket.allow() {
			http.Error(w, "rate limited", http.StatusTooManyRequests)
			return
		}
		next.ServeHTTP(w, r)
	})
}

func loggingMiddleware(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		log.Printf("%s %s %s", r.RemoteAddr, r.Method, r.URL)
		next.ServeHTTP(w, r)
	})
}

func main() {
	if len(os.Args) < 3 {
		log.Fatal("usage: go-gateway LISTEN UPSTREAM_URL")
	}
	target, err := url.Parse(os.Args[2])
	if err != nil {
		log.Fatal(err)
	}
	proxy := httputil.NewSingleHostReverseProxy(target)
	proxy.Transport = &http.Transport{MaxIdleConnsPerHost: 256, IdleConnTimeout: 60 * time.Second}
	bucket := &tokenBucket{tokens: 1e9, burst: 1e9, rate: 1e9, last: time.Now()}
	mux := http.NewServeMux()
	mux.Handle("/api/", loggingMiddleware(rateLimit(bucket, proxy)))
	log.Fatal(http.ListenAndServe(os.Args[1], mux))
}
