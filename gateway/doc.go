// Package gateway assembles the parts of edgegate — broker, normalizer, durable log, rules, forwarding sinks,
// device registry and state view — wires them through small adapters, owns their lifecycles and serves the
// admin HTTP API (metrics, health, status).
package gateway
