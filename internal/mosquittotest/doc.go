// Package mosquittotest starts private mosquitto brokers and TCP proxies for tests: a broker on a free
// 127.0.0.1 port with its own configuration and persistence directory that a test can kill (SIGKILL) and start
// again on the same port, and a proxy that can drop every connection or silently swallow the bytes coming back
// from the broker (a stall).
//
// It never touches a broker that it did not start (in particular the shared one on port 1883). Tests that use
// Start are skipped with a clear message when mosquitto is not installed (Debian: apt-get install mosquitto).
package mosquittotest
