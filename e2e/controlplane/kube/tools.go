//go:build tools

// Package tools keeps the upstream control-plane commands in this module's graph so that
// `go build k8s.io/kubernetes/cmd/...` resolves them at the pinned versions.
package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
)
