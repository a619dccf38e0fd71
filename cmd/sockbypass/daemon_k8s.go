package main

import (
	"context"
	"fmt"
	"os"
	"time"

	"go.uber.org/zap"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/sockbypass/sockbypass/internal/config"
	"github.com/sockbypass/sockbypass/internal/daemon"
	"github.com/sockbypass/sockbypass/internal/k8s"
)

// attachKubernetes adds the Kubernetes pod source to the daemon when the
// configuration has a kubernetes section at start (adding or removing the
// section, nodeName and kubeconfig take a restart; the selection rules are
// read from the configuration in force at every reconcile). The node is kubernetes.nodeName
// or $NODE_NAME (the downward API's spec.nodeName); the API server is the
// in-cluster one unless kubernetes.kubeconfig names a file. An informer
// that has not synced within 30 s is not fatal: the daemon then changes
// nothing and is not Ready until it has.
func attachKubernetes(ctx context.Context, e *env, d *daemon.Daemon, cfg *config.Config) error {
	k := cfg.Kubernetes
	if k == nil {
		return nil
	}
	node := k.NodeName.Value
	if node == "" {
		node = os.Getenv("NODE_NAME")
	}
	if node == "" {
		return fmt.Errorf("kubernetes: no node name: set NODE_NAME (env valueFrom fieldRef spec.nodeName) or kubernetes.nodeName")
	}
	var restCfg *rest.Config
	var err error
	if path := k.Kubeconfig.Value; path != "" {
		restCfg, err = clientcmd.BuildConfigFromFlags("", path)
	} else {
		restCfg, err = rest.InClusterConfig()
	}
	if err != nil {
		return fmt.Errorf("kubernetes: API server: %w", err)
	}
	restCfg.UserAgent = "sockbypass/" + node
	client, err := kubernetes.NewForConfig(restCfg)
	if err != nil {
		return fmt.Errorf("kubernetes: %w", err)
	}
	src := k8s.NewSource(client, node, e.log)
	if err := src.Start(ctx, 30*time.Second); err != nil {
		e.log.Warn("kubernetes: not Ready until the informers sync", zap.Error(err))
	}
	d.SetSource(src)
	e.log.Info("kubernetes: selecting this node's pods from the API server", zap.String("node", node))
	return nil
}
