//go:build tools

// Package tools keeps the upstream commands in this module's graph so that
// `go build k8s.io/kubernetes/cmd/...` resolves them at the pinned versions: the control plane
// (kube-apiserver, kube-controller-manager) and the node (kubelet, kube-scheduler, kube-proxy).
package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-proxy"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubelet"
)
