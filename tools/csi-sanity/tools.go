//go:build tools

// Package tools pins the upstream csi-sanity command so `go build` can build
// it from this module. Nothing here is product code.
package tools

import _ "github.com/kubernetes-csi/csi-test/v5/cmd/csi-sanity"
