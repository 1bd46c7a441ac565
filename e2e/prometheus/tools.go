//go:build tools

// Package tools pins Prometheus and promtool, which Tollgate's tests build from the Go module
// proxy (build.sh): promtool checks and unit-tests the chart's alert rules, and a Prometheus
// scrapes an e2e run to evaluate every dashboard query.
package tools

import (
	_ "github.com/prometheus/prometheus/cmd/prometheus"
	_ "github.com/prometheus/prometheus/cmd/promtool"
)
