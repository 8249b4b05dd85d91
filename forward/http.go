package forward

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/cloudevents/sdk-go/v2/binding"
	"github.com/cloudevents/sdk-go/v2/event"
	cehttp "github.com/cloudevents/sdk-go/v2/protocol/http"
)

// Content types of the CloudEvents HTTP binding.
const (
	contentTypeStructured = "application/cloudevents+json"
	contentTypeBatch      = "application/cloudevents-batch+json"
)

// httpTransport POSTs events to an HTTP endpoint, one request at a time (so events arrive in log order; batch
// mode carries up to batch_size events per request). A 2xx response acknowledges the request's events. A 4xx
// that refuses the request's content (see refusesEvents) is final: the events are dead-lettered (reason
// upstream_rejected) and the cursor moves past them, so one bad event cannot block the sink. Every other answer
// (5xx, 1xx, 3xx, the other 4xx: wrong URL or credentials, 408, 429) and network errors end the "connection":
// the sink waits (Retry-After when the response has one, capped by max_retry_after, else its backoff) and sends
// again from its cursor. A request without an answer within ack_timeout is a stall.
type httpTransport struct {
	cfg    HTTPConfig
	batch  int
	window int
	client *http.Client
	where  string
}

func newHTTPTransport(cfg SinkConfig, log *slog.Logger) (*httpTransport, error) {
	hc := *cfg.HTTP
	t := &httpTransport{cfg: hc, batch: 1, window: cfg.Window, where: redactURL(hc.URL)}
	if hc.Mode == ModeBatch {
		t.batch = cfg.BatchSize
	}
	tc, err := tlsConfig(hc.TLS, log)
	if err != nil {
		return nil, fmt.Errorf("http.%w", err)
	}
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.TLSClientConfig = tc
	t.client = &http.Client{
		Transport: tr,
		// A redirect would turn a POST into a GET (301, 302, 303); the answer is taken as it is.
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
	}
	return t, nil
}

func (t *httpTransport) unitSize() int  { return t.batch }
func (t *httpTransport) target() string { return t.where }
func (t *httpTransport) wait()          {}
func (t *httpTransport) dialReaches() bool {
	return false // dial makes no request
}

func (t *httpTransport) dial(ctx context.Context, gen uint64) (conn, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	c := &httpConn{
		t:      t,
		gen:    gen,
		queue:  make(chan []Record, t.window),
		out:    make(chan outcome, t.window),
		lostCh: make(chan struct{}),
	}
	c.ctx, c.cancel = context.WithCancel(context.Background())
	c.wg.Add(1)
	go c.work()
	return c, nil
}

// httpConn is one run of requests: it ends at the first failure.
type httpConn struct {
	t      *httpTransport
	gen    uint64
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup
	queue  chan []Record
	out    chan outcome

	lostCh    chan struct{}
	closeOnce sync.Once
}

func (c *httpConn) send(recs []Record) error {
	select {
	case c.queue <- recs:
		return nil
	default:
		return errors.New("forward: http: more events in flight than the window")
	}
}

func (c *httpConn) outcomes() <-chan outcome { return c.out }

// lost is never closed: a failed request reports its error as an outcome.
func (c *httpConn) lost() <-chan struct{} { return c.lostCh }
func (c *httpConn) cause() error          { return errors.New("forward: http: closed") }

func (c *httpConn) close() {
	c.closeOnce.Do(func() {
		c.cancel()
		c.t.client.CloseIdleConnections()
		c.wg.Wait()
	})
}

// work sends the queued units one after the other and stops at the first retryable failure.
func (c *httpConn) work() {
	defer c.wg.Done()
	for {
		select {
		case <-c.ctx.Done():
			return
		case recs := <-c.queue:
			o := c.post(recs)
			o.gen, o.last = c.gen, recs[len(recs)-1].Seq
			c.out <- o // room for a window of outcomes
			if o.err != nil && !o.reject {
				return
			}
		}
	}
}

func (c *httpConn) post(recs []Record) outcome {
	req, err := c.t.request(c.ctx, recs)
	if err != nil {
		// The stored event cannot be put in this mode: no retry will change that.
		return outcome{err: fmt.Errorf("forward: http: encode: %w", err), reject: true}
	}
	resp, err := c.t.client.Do(req)
	if err != nil {
		return outcome{err: fmt.Errorf("forward: http post to %s: %w", c.t.where, err)}
	}
	defer resp.Body.Close()
	snippet, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
	code := resp.StatusCode
	if code >= 200 && code < 300 {
		return outcome{}
	}
	err = fmt.Errorf("forward: http post to %s: %s", c.t.where, resp.Status)
	if body := strings.TrimSpace(string(snippet)); code >= 400 && code < 500 && body != "" {
		err = fmt.Errorf("forward: http post to %s: %s: %s", c.t.where, resp.Status, body)
	}
	if refusesEvents(code) {
		return outcome{err: err, reject: true}
	}
	return outcome{
		err:        err,
		retryAfter: parseRetryAfter(resp.Header.Get("Retry-After"), time.Now(), c.t.cfg.MaxRetryAfter),
	}
}

// refusesEvents reports whether an HTTP status refuses the events of the request for good, whatever the
// endpoint's state: 400 Bad Request, 409 Conflict, 413 Content Too Large, 415 Unsupported Media Type, 422
// Unprocessable Content and 431 Request Header Fields Too Large (in binary mode the headers carry the event's
// attributes). Such events are dead-lettered. Every other 4xx says that the endpoint or the credentials are
// wrong (401, 403, 404, 405, 407, 410, 421, 426, and the codes a proxy or server makes up) or that it is too
// early or too much (408, 425, 429), so a different event would fare no better: those are retried like a 5xx,
// and the cursor waits, instead of dead-lettering the whole backlog.
func refusesEvents(code int) bool {
	switch code {
	case http.StatusBadRequest, http.StatusConflict, http.StatusRequestEntityTooLarge,
		http.StatusUnsupportedMediaType, http.StatusUnprocessableEntity, http.StatusRequestHeaderFieldsTooLarge:
		return true
	}
	return false
}

// request builds the POST for a unit in the configured mode.
func (t *httpTransport) request(ctx context.Context, recs []Record) (*http.Request, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, t.cfg.URL, nil)
	if err != nil {
		return nil, err
	}
	switch t.cfg.Mode {
	case ModeBatch:
		setBody(req, batchPayload(recs))
		req.Header.Set("Content-Type", contentTypeBatch)
	case ModeBinary:
		ev := event.New()
		if err := json.Unmarshal(recs[0].Data, &ev); err != nil {
			return nil, fmt.Errorf("seq %d is not a CloudEvent: %w", recs[0].Seq, err)
		}
		if err := cehttp.WriteRequest(ctx, binding.ToMessage(&ev), req); err != nil {
			return nil, fmt.Errorf("seq %d: %w", recs[0].Seq, err)
		}
	default:
		setBody(req, recs[0].Data)
		req.Header.Set("Content-Type", contentTypeStructured)
	}
	req.Header.Set("User-Agent", "edgegate")
	for k, v := range t.cfg.Headers {
		req.Header.Set(k, string(v))
	}
	if t.cfg.BearerToken != "" {
		req.Header.Set("Authorization", "Bearer "+string(t.cfg.BearerToken))
	}
	if t.cfg.Username != "" || t.cfg.Password != "" {
		req.SetBasicAuth(t.cfg.Username, string(t.cfg.Password))
	}
	return req, nil
}

func setBody(req *http.Request, b []byte) {
	req.Body = io.NopCloser(bytes.NewReader(b))
	req.ContentLength = int64(len(b))
	req.GetBody = func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(b)), nil }
}

// parseRetryAfter reads a Retry-After value (delay seconds or an HTTP date) as a wait from now, capped; 0 when
// it is absent, unreadable or already past.
func parseRetryAfter(v string, now time.Time, limit time.Duration) time.Duration {
	v = strings.TrimSpace(v)
	if v == "" {
		return 0
	}
	var d time.Duration
	if secs, err := strconv.ParseInt(v, 10, 64); err == nil {
		if secs <= 0 {
			return 0
		}
		if secs > int64(limit/time.Second) {
			return limit
		}
		d = time.Duration(secs) * time.Second
	} else if at, err := http.ParseTime(v); err == nil {
		d = at.Sub(now)
	}
	if d <= 0 {
		return 0
	}
	return min(d, limit)
}
