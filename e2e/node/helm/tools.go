//go:build tools

// Package tools pins helm, which the e2e suite uses to install Tollgate's chart on the node.
package tools

import _ "helm.sh/helm/v4/cmd/helm"
