// Package e2e drives the real edgegate binary end to end for reliability tests: it builds cmd/edgegate once,
// starts it as a child process with a generated configuration (free loopback ports, its own data directory, a
// generated device registry, an optional MQTT sink to an upstream broker), waits for it to be ready, kills it
// with SIGKILL or stops it with SIGTERM, starts it again on the same data directory, scrapes /metrics and
// /api/status, and checks the durable log offline.
//
// Device clients (paho, QoS 1) record which publishes were acknowledged; a Collector subscribes to the upstream
// broker with a persistent session and counts unique and duplicate CloudEvents and each device's order (per kind
// of event, see NewKindClient). A Report gathers one Row per scenario and prints them as a table.
//
// It is test support: its functions take a testing.TB, fail the test on setup errors and register their
// cleanup with it. It binds only to 127.0.0.1.
package e2e
