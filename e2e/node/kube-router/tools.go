//go:build tools

// Package tools pins kube-router, the e2e node's NetworkPolicy enforcer (firewall only).
package tools

import _ "github.com/cloudnativelabs/kube-router/v2/cmd/kube-router"
