// Package archtest holds tests of the repository's structure: which packages may import which.
package archtest
