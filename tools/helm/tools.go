//go:build tools

// Package tools pins the upstream helm v3 CLI so the test harness can build
// it from this module. Nothing here is product code.
//
// It is a module of its own, apart from tools/kube, because helm's
// Kubernetes libraries (client-go and friends) are newer than the pinned
// control plane's staging modules and the two must not be resolved together.
package tools

import _ "helm.sh/helm/v3/cmd/helm"
