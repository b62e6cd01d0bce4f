//go:build tools

// Package tools pins the upstream etcd server so the test harness can build
// it from this module. Nothing here is product code.
//
// go.etcd.io/etcd/server/v3 has relative replace lines in its own go.mod, so
// `go install …@version` refuses it; required from this module, the replaces
// do not apply and its sibling modules resolve to their published versions.
// Debian's etcd (3.4.23) is older than Kubernetes 1.34 supports.
package tools

import _ "go.etcd.io/etcd/server/v3"
