// Package reliability holds end-to-end tests of the real edgegate binary (built once per run by internal/e2e):
// delivery under upstream outages, gateway crashes (kill -9, also with a priority lane beside the sink and with the
// sink sending batches; the device state view is rebuilt from the log after one),
// reconnect storms, stalls, a full disk and a full log, and abuse by misbehaving clients. Each scenario prints its figures and adds a row to the table printed at
// the end of the run.
//
//	go test -race -v ./reliability                        reduced sizes (CI)
//	go test -v -timeout 30m ./reliability -reliability.full   every delivery scenario at full scale
//	go test -v -timeout 40m -run TestSoak ./reliability -reliability.soak   30 minutes at 1k events/s, upstream flapping
//	                                                      (-reliability.soak.duration=5m for a shorter one)
//	-reliability.race                                     build the binary under test with -race too
//
// Set RELIABILITY_KEEP_LOGS=DIR to run the upstream broker with full logging and keep its log in DIR when a
// test fails. The disk-full test mounts a tmpfs, so the suite runs as root (as CI does).
package reliability
