//go:build tools

// Package tools pins the upstream versitygw S3 gateway (posix backend) that the benchmark
// serves its lake with, so `go build` can build it from this module. Nothing here is product
// code.
package tools

import _ "github.com/versity/versitygw/cmd/versitygw"
