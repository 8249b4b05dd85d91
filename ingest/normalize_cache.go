package ingest

import (
	"net/url"
	"sync"
	"sync/atomic"
)

// maxCachedSources bounds the source cache: sources are per publishing device, which the registry bounds, but
// a cache must not grow without limit whatever the registry holds.
const maxCachedSources = 4096

type cachedSource struct {
	u url.URL
	s string // u as a string
}

// sourceCache keeps the event source of each publishing device, so that building one costs no allocation.
// When full it stops adding: sources of further devices are built each time.
type sourceCache struct {
	m   sync.Map // device id → cachedSource
	n   atomic.Int64
	max int64
}

func (c *sourceCache) get(device string) (*cachedSource, bool) {
	v, ok := c.m.Load(device)
	if !ok {
		return nil, false
	}
	return v.(*cachedSource), true
}

func (c *sourceCache) put(device string, s *cachedSource) {
	if c.n.Load() >= c.max {
		return
	}
	if _, loaded := c.m.LoadOrStore(device, s); !loaded {
		c.n.Add(1)
	}
}
