package main

import (
	"context"

	"github.com/sockbypass/sockbypass/internal/config"
	"github.com/sockbypass/sockbypass/internal/daemon"
)

// attachKubernetes adds the Kubernetes pod source to the daemon when the
// configuration has a kubernetes section.
func attachKubernetes(ctx context.Context, e *env, d *daemon.Daemon, cfg *config.Config) error {
	return nil
}
