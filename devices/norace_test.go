//go:build !race

package devices

// raceEnabled: the race detector changes allocation counts.
const raceEnabled = false
