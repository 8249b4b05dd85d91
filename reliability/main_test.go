//go:build linux

package reliability

import (
	"flag"
	"fmt"
	"os"
	"testing"

	"github.com/edgegate/edgegate/internal/e2e"
)

// Flags of the reliability suite. The default run is reduced to fit CI; -reliability.full runs every delivery
// scenario at full scale and -reliability.soak adds the 30-minute soak.
var (
	fullScale = flag.Bool("reliability.full", false, "run the delivery scenarios at full scale (minutes)")
	soakRun   = flag.Bool("reliability.soak", false, "run the 30-minute soak at 1k events/s with a flapping upstream")
	raceBin   = flag.Bool("reliability.race", false, "build the edgegate binary under test with -race (slower)")
)

// edgegateBin is the edgegate binary under test, built once per test binary.
var edgegateBin e2e.Build

// report collects one row per scenario; TestMain prints it.
var report e2e.Report

func TestMain(m *testing.M) {
	flag.Parse()
	edgegateBin.Race = *raceBin
	code := m.Run()
	if rows := report.Rows(); len(rows) > 0 {
		fmt.Printf("\nreliability report (binary built in %s, race=%v, full=%v):\n", edgegateBin.Took().Round(1e6),
			*raceBin, *fullScale)
		report.Print(os.Stdout)
	}
	edgegateBin.Remove()
	os.Exit(code)
}

// bin returns the path of the edgegate binary under test, building it on first use.
func bin(t testing.TB) string {
	t.Helper()
	return edgegateBin.Path(t)
}

// scale returns reduced in the default run and full with -reliability.full.
func scale(reduced, full int) int {
	if *fullScale {
		return full
	}
	return reduced
}
