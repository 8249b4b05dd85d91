package gateway

import "context"

// WrapParts changes how Run runs each part (buffer, forward, rules, ingest): wrap gets the part's name and its
// Run and returns what Run calls instead, to make a part fail, panic or not stop. Call it before Run.
func WrapParts(g *Gateway, wrap func(name string, run func(context.Context) error) func(context.Context) error) {
	g.wrapPart = wrap
}
