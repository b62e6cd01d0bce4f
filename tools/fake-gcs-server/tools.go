//go:build tools

// Package tools pins the upstream fake-gcs-server, the Google Cloud Storage emulator that the
// e2e harness (e2e/src/gcs.rs) runs as a real GCS lake, so `go build` can build it from this
// module. Nothing here is product code.
package tools

import (
	_ "github.com/fsouza/fake-gcs-server"
)
