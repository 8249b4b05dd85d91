package devices

import (
	"fmt"
	"testing"

	"github.com/cloudevents/sdk-go/v2/event"
)

func benchRegistry(b *testing.B, n int) *Registry {
	b.Helper()
	h := cheapBcrypt(b, "pw")
	devs := make([]Device, n)
	for i := range devs {
		devs[i] = Device{ID: fmt.Sprintf("device-%04d", i), PasswordHash: h,
			Publish:   []string{fmt.Sprintf("tele/device-%04d/#", i), fmt.Sprintf("stat/device-%04d/#", i)},
			Subscribe: []string{fmt.Sprintf("cmnd/device-%04d/#", i)}}
	}
	r, err := NewRegistry(devs)
	if err != nil {
		b.Fatal(err)
	}
	return r
}

// BenchmarkCanPublish measures the per-message ACL check with 1000 registered devices.
func BenchmarkCanPublish(b *testing.B) {
	r := benchRegistry(b, 1000)
	for _, c := range []struct{ name, topic string }{
		{"own", "devices/device-0500/events/room.entered"},
		{"grant", "stat/device-0500/POWER"},
		{"denied", "devices/device-0501/events/room.entered"},
	} {
		b.Run(c.name, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				r.CanPublish("device-0500", c.topic)
			}
		})
	}
}

func BenchmarkCanSubscribe(b *testing.B) {
	r := benchRegistry(b, 1000)
	b.ReportAllocs()
	for b.Loop() {
		r.CanSubscribe("device-0500", "cmnd/device-0500/#")
	}
}

// BenchmarkAuthenticateCached measures a reconnect of a device whose password was verified before.
func BenchmarkAuthenticateCached(b *testing.B) {
	r := benchRegistry(b, 1000)
	if !r.Authenticate("device-0500", []byte("pw")) {
		b.Fatal("login failed")
	}
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			r.Authenticate("device-0500", []byte("pw"))
		}
	})
}

func BenchmarkTopicMatch(b *testing.B) {
	b.ReportAllocs()
	for b.Loop() {
		TopicMatch("zigbee2mqtt/+/set/#", "zigbee2mqtt/kitchen-light-1/set/brightness")
	}
}

// BenchmarkStateApply measures applying a telemetry event to a device seen before: "unchanged" repeats the same
// values, "changing" alternates between two events whose four fields all differ; each with Apply and with
// ApplyChecked (data validated by the caller).
func BenchmarkStateApply(b *testing.B) {
	same := newEvent(b, "thermo-1", "telemetry", t0, "application/json", `{"temperature":21.5,"humidity":40,"battery":97}`)
	changing := [2]*event.Event{
		newEvent(b, "thermo-1", "telemetry", t0, "application/json", `{"temperature":21.5,"humidity":40,"battery":97,"rssi":-61}`),
		newEvent(b, "thermo-1", "telemetry", t0, "application/json", `{"temperature":21.75,"humidity":41,"battery":96,"rssi":-58}`),
	}
	for _, c := range []struct {
		name string
		evs  []*event.Event
	}{{"unchanged", []*event.Event{same}}, {"changing", changing[:]}} {
		for _, af := range applyFuncs {
			b.Run(c.name+"/"+af.name, func(b *testing.B) {
				s := NewStateView()
				b.ReportAllocs()
				i := 0
				for b.Loop() {
					af.apply(s, c.evs[i%len(c.evs)])
					i++
				}
			})
		}
	}
}
