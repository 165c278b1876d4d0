//go:build tools

// Package tools pins the node's commands (kubelet, kube-scheduler, kube-controller-manager) so `go build`
// can build them from this module, at the same k8s.io/kubernetes release as ../apiserver.
package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-controller-manager/app"
	_ "k8s.io/kubernetes/cmd/kube-scheduler/app"
	_ "k8s.io/kubernetes/cmd/kubelet/app"
)
