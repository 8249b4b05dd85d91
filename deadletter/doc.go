// Package deadletter keeps dead letters — payloads that could not become events and commands that could not be
// delivered — durably in their own bbolt file, with their original bytes, so an operator can see what was lost
// and why.
//
// The store is bounded (Config.MaxRecords, Config.MaxBytes); when it is full the oldest records are removed, and
// every removal is counted (edgegate_deadletter_evicted_total) and logged.
package deadletter
