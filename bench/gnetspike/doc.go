// Package gnetspike holds the gnet v2 side of the relay engine spike: the
// relay of relaybench on gnet's event loops, measured by BenchmarkRelay the
// same way as internal/evloop's (bench/README.md, "Relay engine spike").
// It is not part of the product.
package gnetspike
