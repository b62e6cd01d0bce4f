//go:build tools

// Package tools pins the upstream toxiproxy server and CLI that the benchmark adds latency to
// the lake link with, so `go build` can build them from this module. Nothing here is product
// code.
package tools

import (
	_ "github.com/Shopify/toxiproxy/v2/cmd/cli"
	_ "github.com/Shopify/toxiproxy/v2/cmd/server"
)
