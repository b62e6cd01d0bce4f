//go:build tools

// Package tools pins the upstream Kubernetes control plane (kube-apiserver,
// kube-controller-manager, kube-scheduler), kubelet and kube-proxy for the
// test node, and kubectl, so the test harness can build them from this
// module. Nothing here is product code.
//
// k8s.io/kubernetes requires its staging modules at v0.0.0 and its own
// replace lines do not apply to a module that depends on it, so this module
// replaces every staging module with its published version (v0.34.x for
// Kubernetes v1.34.x). Never `go get -u` here.
package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kube-proxy"
	_ "k8s.io/kubernetes/cmd/kubectl"
	_ "k8s.io/kubernetes/cmd/kubelet"
)
