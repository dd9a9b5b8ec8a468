// Command pause is the sandbox ("infra") container of every pod on the dev cluster's real node: it
// holds the pod's namespaces open, reaps orphaned children when the pod shares its PID namespace, and
// exits 0 on SIGINT or SIGTERM, as Kubernetes' own pause does. Built here because no registry is
// reachable; packaged into a local image by tandem/devcluster/nodeimages.py.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	signals := make(chan os.Signal, 16)
	signal.Notify(signals, syscall.SIGINT, syscall.SIGTERM, syscall.SIGCHLD)
	for sig := range signals {
		if sig != syscall.SIGCHLD {
			os.Exit(0)
		}
		for {
			var status syscall.WaitStatus
			pid, err := syscall.Wait4(-1, &status, syscall.WNOHANG, nil)
			if pid <= 0 || err != nil {
				break
			}
		}
	}
}
