//go:build !race

package ingest

// raceEnabled: the race detector changes allocation counts.
const raceEnabled = false
