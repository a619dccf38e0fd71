package k8s

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"go.uber.org/zap"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"

	"github.com/sockbypass/sockbypass/cgroup"
	"github.com/sockbypass/sockbypass/internal/config"
	"github.com/sockbypass/sockbypass/internal/daemon"
	"github.com/sockbypass/sockbypass/internal/dataplane"
)

// Event reasons, on the pod concerned.
const (
	ReasonEnableFailed   = "SockbypassEnableFailed"
	ReasonCgroupNotFound = "SockbypassCgroupNotFound"
	ReasonBadSidecar     = "SockbypassBadSidecar"
	// ReasonFallback: a connection of the pod left the fast path after
	// it was accelerated, or a listener's new connections stay plain (a
	// Normal Event: the application keeps working on plain TCP).
	ReasonFallback = "SockbypassFallback"
)

// fallbackEventEvery is how often at most a pod gets a ReasonFallback
// Event of one kind; the events in between are counted in the next one.
const fallbackEventEvery = time.Minute

// ErrNotSynced is returned by Targets until the informers have listed
// the node's pods and the namespaces.
var ErrNotSynced = errors.New("the pod and namespace informers have not synced with the API server yet")

// Source is a daemon.Source over this node's pods: a pod informer limited
// to spec.nodeName (the API server sends only this node's pods) and a
// namespace informer (for the namespaces' labels). It writes an Event on
// every pod it selected but could not enable.
type Source struct {
	client kubernetes.Interface
	node   string
	log    *zap.Logger

	pods       cache.SharedIndexInformer
	namespaces cache.SharedIndexInformer
	factories  []informers.SharedInformerFactory
	changed    chan struct{}

	mu sync.Mutex
	// reported holds, per pod, the reason and message of the last Event
	// written: an Event is written once per new problem, not every
	// rescan.
	reported map[types.UID]string
	// events counts the Events written (for tests and logs).
	events int
	// fallbacks holds, per pod and fallback reason, when the last
	// ReasonFallback Event was written and how many were not since.
	fallbacks map[string]*fallbackWindow
}

type fallbackWindow struct {
	at      time.Time
	skipped int
}

// NewSource returns a source for the pods of node; call Start before the
// daemon runs.
func NewSource(client kubernetes.Interface, node string, log *zap.Logger) *Source {
	podFactory := informers.NewSharedInformerFactoryWithOptions(client, 0,
		informers.WithTweakListOptions(func(o *metav1.ListOptions) {
			o.FieldSelector = fields.OneTermEqualSelector("spec.nodeName", node).String()
		}))
	nsFactory := informers.NewSharedInformerFactory(client, 0)
	s := &Source{
		client:     client,
		node:       node,
		log:        log,
		pods:       podFactory.Core().V1().Pods().Informer(),
		namespaces: nsFactory.Core().V1().Namespaces().Informer(),
		factories:  []informers.SharedInformerFactory{podFactory, nsFactory},
		changed:    make(chan struct{}, 1),
		reported:   map[types.UID]string{},
	}
	kick := cache.ResourceEventHandlerFuncs{
		AddFunc:    func(any) { s.kick() },
		UpdateFunc: func(any, any) { s.kick() },
		DeleteFunc: func(any) { s.kick() },
	}
	s.pods.AddEventHandler(kick)
	s.namespaces.AddEventHandler(kick)
	return s
}

func (s *Source) kick() {
	select {
	case s.changed <- struct{}{}:
	default:
	}
}

// Start runs the informers until ctx is done and waits up to timeout for
// their first list. A source that has not synced makes Targets fail (the
// daemon then changes nothing and is not Ready), so a timeout is returned
// but not fatal.
func (s *Source) Start(ctx context.Context, timeout time.Duration) error {
	for _, f := range s.factories {
		f.Start(ctx.Done())
	}
	wctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	if !cache.WaitForCacheSync(wctx.Done(), s.pods.HasSynced, s.namespaces.HasSynced) {
		return fmt.Errorf("node %s: %w within %v", s.node, ErrNotSynced, timeout)
	}
	return nil
}

// Changed implements daemon.Source.
func (s *Source) Changed() <-chan struct{} { return s.changed }

func rulesFrom(k *config.KubernetesConfig) Rules {
	r := DefaultRules()
	if sels := k.Selectors(); sels != nil {
		r.NamespaceSelectors = sels
	}
	r.AllPods = k.AllPods.Value
	if k.ExcludeNamespaces != nil {
		r.ExcludeNamespaces = nil
		for _, n := range *k.ExcludeNamespaces {
			r.ExcludeNamespaces = append(r.ExcludeNamespaces, n.Value)
		}
	}
	// Never the control plane's own pods, whatever the file says.
	if !slices.Contains(r.ExcludeNamespaces, "kube-system") {
		r.ExcludeNamespaces = append(r.ExcludeNamespaces, "kube-system")
	}
	return r
}

// kubepods returns the kubelet pod cgroup roots: the configured ones, or
// those found below the cgroup v2 mount.
func kubepods(mounts cgroup.Mounts, k *config.KubernetesConfig) ([]string, error) {
	if len(k.Kubepods) > 0 {
		var out []string
		for _, p := range k.Kubepods {
			out = append(out, filepath.Clean(p.Value))
		}
		return out, nil
	}
	return FindKubepods(mounts.V2, 2)
}

// Targets implements daemon.Source: the selected pods of this node whose
// cgroup exists, each in sidecar mode only if it has a sidecar. A
// selected pod that is running but has no cgroup under any kubepods root
// is pending (and gets an Event): the kubelet's layout is not one this
// daemon knows, or the node is cgroup v1.
func (s *Source) Targets(mounts cgroup.Mounts, cfg *config.Config) ([]daemon.Target, []string, error) {
	k := cfg.Kubernetes
	if k == nil {
		return nil, nil, nil
	}
	if !s.pods.HasSynced() || !s.namespaces.HasSynced() {
		return nil, nil, ErrNotSynced
	}
	rules := rulesFrom(k)
	roots, err := kubepods(mounts, k)
	if err != nil {
		return nil, nil, fmt.Errorf("find the kubelet's pod cgroups under %s: %w", mounts.V2, err)
	}
	var targets []daemon.Target
	var pending []string
	for _, obj := range s.pods.GetStore().List() {
		pod := obj.(*corev1.Pod)
		var ns *corev1.Namespace
		if o, ok, _ := s.namespaces.GetStore().GetByKey(pod.Namespace); ok {
			ns = o.(*corev1.Namespace)
		}
		if !rules.Decide(pod, ns).Selected {
			continue
		}
		owner := pod.Namespace + "/" + pod.Name
		mesh, err := MeshFor(Sidecar(pod), cfg.MeshName(), cfg.MeshOptions())
		if err != nil {
			s.report(pod, corev1.EventTypeWarning, ReasonBadSidecar, fmt.Sprintf("%s: %v", SidecarAnnotation, err))
			pending = append(pending, owner)
			continue
		}
		candidates := PodCgroupCandidates(roots, pod.UID, pod.Status.QOSClass)
		found := false
		for _, rel := range candidates {
			cg, err := mounts.Resolve(filepath.Join(mounts.V2, rel))
			if err != nil {
				continue
			}
			targets = append(targets, daemon.Target{Cgroup: cg, Mesh: mesh, Owner: owner})
			found = true
			break
		}
		if !found && pod.Status.Phase == corev1.PodRunning {
			msg := fmt.Sprintf("no pod cgroup on node %s: looked for %s under %s; set kubernetes.kubepods to the kubelet's pod cgroup root (cgroup v2 is required)",
				s.node, strings.Join(candidates, ", "), mounts.V2)
			if len(candidates) == 0 {
				msg = fmt.Sprintf("no kubelet pod cgroup root (kubepods.slice, kubepods) under %s on node %s; set kubernetes.kubepods (cgroup v2 is required)", mounts.V2, s.node)
			}
			s.report(pod, corev1.EventTypeWarning, ReasonCgroupNotFound, msg)
			pending = append(pending, owner)
		}
	}
	return targets, pending, nil
}

// podOf returns the pod a target's owner ("namespace/name") names, if the
// informer knows it.
func (s *Source) podOf(t daemon.Target) (*corev1.Pod, bool) {
	ns, name, ok := strings.Cut(t.Owner, "/")
	if !ok {
		return nil, false
	}
	o, exists, _ := s.pods.GetStore().GetByKey(ns + "/" + name)
	if !exists {
		return nil, false
	}
	return o.(*corev1.Pod), true
}

// EnableFailed implements daemon.Source: a Warning Event on the pod.
func (s *Source) EnableFailed(t daemon.Target, err error) {
	if pod, ok := s.podOf(t); ok {
		s.report(pod, corev1.EventTypeWarning, ReasonEnableFailed, err.Error())
	}
}

// Fallback implements daemon.FallbackReporter: a Normal Event on the pod
// that owns the connection, at most one per fallback reason every
// fallbackEventEvery (the next one says how many were not written).
func (s *Source) Fallback(t daemon.Target, e dataplane.FallbackEvent) {
	pod, ok := s.podOf(t)
	if !ok {
		return
	}
	key := string(pod.UID) + "/" + e.Reason
	now := time.Now()
	s.mu.Lock()
	if s.fallbacks == nil {
		s.fallbacks = map[string]*fallbackWindow{}
	}
	w := s.fallbacks[key]
	if w != nil && now.Sub(w.at) < fallbackEventEvery {
		w.skipped++
		s.mu.Unlock()
		return
	}
	skipped := 0
	if w != nil {
		skipped = w.skipped
	}
	s.fallbacks[key] = &fallbackWindow{at: now}
	s.mu.Unlock()
	msg := e.String()
	if skipped > 0 {
		msg += fmt.Sprintf(" (and %d more like it since the last such Event)", skipped)
	}
	s.report(pod, corev1.EventTypeNormal, ReasonFallback, msg)
}

// report writes an Event on pod unless the same one was the last written
// for it.
func (s *Source) report(pod *corev1.Pod, kind, reason, msg string) {
	key := reason + ": " + msg
	s.mu.Lock()
	if s.reported[pod.UID] == key {
		s.mu.Unlock()
		return
	}
	s.reported[pod.UID] = key
	s.mu.Unlock()
	now := metav1.Now()
	action := "Enable"
	if reason == ReasonFallback {
		action = "Accelerate"
	}
	ev := &corev1.Event{
		ObjectMeta: metav1.ObjectMeta{GenerateName: pod.Name + ".sockbypass.", Namespace: pod.Namespace},
		InvolvedObject: corev1.ObjectReference{
			APIVersion: "v1", Kind: "Pod", Namespace: pod.Namespace, Name: pod.Name, UID: pod.UID, ResourceVersion: pod.ResourceVersion,
		},
		Reason: reason, Message: msg, Type: kind,
		Source:         corev1.EventSource{Component: "sockbypass", Host: s.node},
		FirstTimestamp: now, LastTimestamp: now, Count: 1,
		ReportingController: "sockbypass.io/daemon", ReportingInstance: "sockbypass-" + s.node,
		Action: action,
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := s.client.CoreV1().Events(pod.Namespace).Create(ctx, ev, metav1.CreateOptions{}); err != nil {
		s.log.Warn("write event", zap.String("pod", pod.Namespace+"/"+pod.Name), zap.String("reason", reason), zap.Error(err))
		s.mu.Lock()
		delete(s.reported, pod.UID) // try again at the next rescan
		s.mu.Unlock()
		return
	}
	s.mu.Lock()
	s.events++
	s.mu.Unlock()
	s.log.Info("event", zap.String("pod", pod.Namespace+"/"+pod.Name), zap.String("reason", reason), zap.String("message", msg))
}
