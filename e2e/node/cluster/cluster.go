// Package cluster assembles a one-node Kubernetes cluster on this host from
// real parts: etcd (Debian's etcd-server), kube-apiserver,
// kube-controller-manager, kube-scheduler and a kubelet built from the
// k8s.io/kubernetes module, containerd 2.x and its runc shim built from
// the containerd module with runc built from its module, and the CNI bridge, host-local
// and loopback plugins built from github.com/containernetworking/plugins.
//
// The node keeps to itself so that it can share the host: containerd,
// the kubelet and everything they start run in a mount namespace of the
// node's own (its own bpffs at /sys/fs/bpf, its own /run/netns and
// /run/containerd, every container mount), under a cgroup root of its
// own (/<Name> in every hierarchy, the kubelet's --cgroup-root), with
// their state in a directory of the node's. Stop ends every process it
// started by PID, then whatever is left in its cgroups, and removes its
// cgroups and the CNI bridge (which also carries the API server's
// address), and says what it could not remove. It adds no iptables rule:
// a NAT rule would turn on connection tracking for the whole host
// network namespace.
//
// With Options.CgroupDriver "systemd" the node is what real nodes run
// instead, for a machine of its own (the qemu guest of make
// node-e2e-systemd, e2e/node/guest): systemd as PID 1 over a unified
// cgroup v2, the kubelet's cgroupDriver systemd (pods in
// kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid>.slice) and
// containerd's runc with SystemdCgroup = true (containers in
// cri-containerd-<id>.scope), both in the machine's own mount namespace
// and cgroup root, with failCgroupV1 left at its default (true).
package cluster

import (
	"bufio"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"go.uber.org/zap"
	"golang.org/x/sys/unix"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
)

// privateDirs get a tmpfs of the node's own in its mount namespace.
var privateDirs = []string{"/run/netns", "/run/containerd", "/run/runc", "/run/sockbypass",
	"/var/lib/kubelet", "/var/lib/cni", "/var/log/pods", "/var/log/containers"}

// KubeVersion is the k8s.io/kubernetes version of e2e/kubeapiserver/go.mod.
const KubeVersion = "v1.37.2"

// ContainerdVersion is the containerd version of e2e/node/containerd/go.mod.
const ContainerdVersion = "v2.2.9"

// RuncVersion is the runc version of e2e/node/runc/go.mod.
const RuncVersion = "v1.5.3"

// ServiceIP is the "kubernetes" Service's cluster IP in ServiceCIDR.
// There is no kube-proxy; rather than a DNAT rule (which would turn on
// connection tracking for every connection of the host's network
// namespace, the benchmarks' too), the API server listens on
// ServiceIP:443 itself, an address of the node's CNI bridge (created
// before the CNI plugin finds and uses it; this VM's kernel has no dummy
// links).
const (
	ServiceCIDR = "10.96.0.0/24"
	ServiceIP   = "10.96.0.1"
	PodCIDR     = "10.244.29.0/24"
	PodGateway  = "10.244.29.1/24"
	Bridge      = "sbnode0"
)

// Binaries are the programs of the node.
type Binaries struct {
	Etcd, APIServer, ControllerManager, Scheduler, Kubelet string
	Containerd, Shim, Ctr, Runc                            string
	// CNIDir holds the bridge, host-local and loopback plugins.
	CNIDir string
}

// CachedBinaries returns the binaries e2e/node/build.sh caches in cache,
// and the list of those that are missing.
func CachedBinaries(cache string) (Binaries, []string) {
	ctrd := filepath.Join(cache, "containerd-"+ContainerdVersion)
	b := Binaries{
		APIServer:         filepath.Join(cache, "kube-apiserver-"+KubeVersion),
		ControllerManager: filepath.Join(cache, "kube-controller-manager-"+KubeVersion),
		Scheduler:         filepath.Join(cache, "kube-scheduler-"+KubeVersion),
		Kubelet:           filepath.Join(cache, "kubelet-"+KubeVersion),
		Containerd:        filepath.Join(ctrd, "containerd"),
		Shim:              filepath.Join(ctrd, "containerd-shim-runc-v2"),
		Ctr:               filepath.Join(ctrd, "ctr"),
		Runc:              filepath.Join(cache, "runc-"+RuncVersion, "runc"),
	}
	var missing []string
	for _, p := range []string{b.APIServer, b.ControllerManager, b.Scheduler, b.Kubelet, b.Containerd, b.Shim, b.Ctr, b.Runc} {
		if _, err := os.Stat(p); err != nil {
			missing = append(missing, p)
		}
	}
	return b, missing
}

// Options configure a node.
type Options struct {
	// Name of the node and of its cgroup root.
	Name string
	// Dir holds the node's state and logs.
	Dir      string
	Binaries Binaries
	Log      *zap.Logger
	// CgroupDriver is the kubelet's and runc's cgroup driver: "" or
	// "cgroupfs" (this host: a mount namespace and cgroup root of the
	// node's own), or "systemd" (a machine of the node's own whose PID 1
	// is systemd, over a unified cgroup v2).
	CgroupDriver string
	// TimeScale multiplies the node's start-up timeouts (0: 1), for a
	// slow machine (a qemu guest without KVM).
	TimeScale int
}

// Systemd reports whether the node uses the systemd cgroup driver.
func (o Options) Systemd() bool { return o.CgroupDriver == "systemd" }

func (o Options) scaled(d time.Duration) time.Duration {
	if o.TimeScale > 1 {
		return d * time.Duration(o.TimeScale)
	}
	return d
}

// Node is a running one-node cluster.
type Node struct {
	opts Options
	log  *zap.Logger

	// Admin is a client with every permission; Config its configuration.
	Admin  kubernetes.Interface
	Config *rest.Config
	// Kubeconfig is the path of a kubeconfig file for the admin.
	Kubeconfig string
	// ContainerdSock is containerd's socket (inside the node's mount
	// namespace, where Dir is the same path).
	ContainerdSock string

	holder                                         *proc
	etcd, apiserver, kcm, scheduler, ctrd, kubelet *proc
	procs                                          []*proc

	// CgroupRoot is the node's cgroup root, relative to each hierarchy
	// ("" with the systemd driver: the kubelet's default root, /).
	CgroupRoot string
	// KubepodsDir is the kubelet's pod cgroup root under the cgroup2
	// mount: <CgroupRoot>/kubepods (cgroupfs) or kubepods.slice (systemd).
	KubepodsDir string
	// Timings of Start's steps.
	Timings []Timing

	iptablesBefore map[string][]string
	tablesBefore   []string
	ipForward      string
	createdDirs    []string
	// etcdDir is etcd's data directory, in memory (etcdDataDir).
	etcdDir string
	// claim is the node name's lock file, held from Start to Stop.
	claim *os.File
}

// claimName holds an exclusive flock on the lock file of the node name
// until releaseClaim: a second node of the same name on this machine (a
// second make node-e2e) would otherwise take the first one's processes
// for a killed run's and clean them away (cleanStale). It waits while
// another run holds the name, saying once which process that is. The
// holder removes the file when it lets go, so a lock is taken only on a
// file that is still at its path (the one a later run would open).
func claimName(ctx context.Context, name string, log *zap.Logger) (*os.File, error) {
	path := filepath.Join(os.TempDir(), "sockbypass-node-e2e-"+name+".lock")
	said := false
	for {
		f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o644)
		if err != nil {
			return nil, err
		}
		if beforeFlock != nil {
			beforeFlock()
		}
		err = syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
		if err == nil {
			held, herr := f.Stat()
			now, nerr := os.Stat(path)
			if herr == nil && nerr == nil && os.SameFile(held, now) {
				f.Truncate(0)
				f.WriteAt([]byte(fmt.Sprintf("pid %d\n", os.Getpid())), 0)
				return f, nil
			}
			f.Close() // removed by the run that held it: open the path again
			continue
		}
		f.Close()
		if !errors.Is(err, syscall.EWOULDBLOCK) {
			return nil, fmt.Errorf("lock %s: %w", path, err)
		}
		if !said {
			holder, _ := os.ReadFile(path)
			log.Info("node: waiting for another node e2e run of this name", zap.String("lock", path), zap.String("holder", strings.TrimSpace(string(holder))))
			said = true
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("another node e2e run holds %s: %w", path, ctx.Err())
		case <-time.After(time.Second):
		}
	}
}

// beforeFlock, when set (by a test), runs between opening the lock file
// and locking it: where the holder may let go.
var beforeFlock func()

// releaseClaim removes the lock file and lets go of the name.
func releaseClaim(f *os.File) {
	os.Remove(f.Name())
	f.Close()
}

// etcdDataDir is where a node of this name keeps etcd's data: on the
// tmpfs at /dev/shm when there is one, as Kubernetes' own integration
// tests run etcd. On a disk an fsync that stalls for seconds (a busy or
// shared disk: CI's) stalls every write of the API server, and a pod
// create fails with "etcdserver: request timed out"; nothing here needs
// the data to outlive the node.
func etcdDataDir(name, dir string) string {
	var st unix.Statfs_t
	if unix.Statfs("/dev/shm", &st) == nil && st.Type == unix.TMPFS_MAGIC {
		return filepath.Join("/dev/shm", "sockbypass-node-e2e-etcd-"+name)
	}
	return filepath.Join(dir, "etcd")
}

// Timing is how long a step took.
type Timing struct {
	Step string
	D    time.Duration
}

func (n *Node) timed(step string, since time.Time) {
	n.Timings = append(n.Timings, Timing{step, time.Since(since)})
	n.log.Info("node: "+step, zap.Duration("took", time.Since(since)))
}

func freePort() (int, error) {
	l, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// hostIP returns the IPv4 address of the interface of the default route
// (the node's InternalIP).
func hostIP() (net.IP, error) {
	c, err := net.Dial("udp4", "192.0.2.1:9")
	if err == nil {
		defer c.Close()
		return c.LocalAddr().(*net.UDPAddr).IP, nil
	}
	addrs, err := net.InterfaceAddrs()
	if err != nil {
		return nil, err
	}
	for _, a := range addrs {
		if ipn, ok := a.(*net.IPNet); ok && ipn.IP.To4() != nil && !ipn.IP.IsLoopback() && !strings.HasPrefix(ipn.IP.String(), "10.244.") {
			return ipn.IP, nil
		}
	}
	return nil, errors.New("no IPv4 address for the node")
}

// cgroupHierarchies returns the mount points of every cgroup hierarchy
// (v1 controllers and the v2 mount).
func cgroupHierarchies() ([]string, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var out []string
	s := bufio.NewScanner(f)
	for s.Scan() {
		fields := strings.Fields(s.Text())
		sep := slices.Index(fields, "-")
		if sep < 0 || sep+1 >= len(fields) {
			continue
		}
		if fs := fields[sep+1]; fs == "cgroup" || fs == "cgroup2" {
			if !slices.Contains(out, fields[4]) {
				out = append(out, fields[4])
			}
		}
	}
	return out, s.Err()
}

// Cgroup2Mount returns the cgroup v2 mount point.
func Cgroup2Mount() (string, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return "", err
	}
	defer f.Close()
	s := bufio.NewScanner(f)
	for s.Scan() {
		fields := strings.Fields(s.Text())
		sep := slices.Index(fields, "-")
		if sep >= 0 && sep+1 < len(fields) && fields[sep+1] == "cgroup2" {
			return fields[4], nil
		}
	}
	return "", errors.New("no cgroup2 mount")
}

// Start brings the node up: etcd, the API server, the controller manager
// and the scheduler, containerd, the kubelet, until the Node is Ready.
// On failure what was started is stopped again.
func Start(ctx context.Context, opts Options) (n *Node, err error) {
	node := &Node{opts: opts, log: opts.Log, CgroupRoot: opts.Name, KubepodsDir: filepath.Join(opts.Name, "kubepods")}
	if opts.Systemd() {
		node.CgroupRoot, node.KubepodsDir = "", "kubepods.slice"
	}
	n = node
	defer func() {
		if err != nil {
			if serr := node.Stop(); serr != nil {
				err = fmt.Errorf("%w (and cleaning up: %v)", err, serr)
			}
			n = nil
		}
	}()
	if n.claim, err = claimName(ctx, opts.Name, opts.Log); err != nil {
		return nil, err
	}
	if err := cleanStale(opts.Name); err != nil {
		return nil, err
	}
	dir := opts.Dir
	n.etcdDir = etcdDataDir(opts.Name, dir)
	if err := os.RemoveAll(n.etcdDir); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(n.etcdDir, 0o700); err != nil {
		return nil, err
	}
	for _, d := range []string{"certs", "containerd/root", "containerd/state", "containerd/opt", "cni/conf", "cni/ipam", "kubelet/root", "kubelet/logs", "kubelet/certs"} {
		if err := os.MkdirAll(filepath.Join(dir, d), 0o755); err != nil {
			return nil, err
		}
	}
	ip, err := hostIP()
	if err != nil {
		return nil, err
	}
	if n.iptablesBefore, err = iptablesChains(); err != nil {
		return nil, err
	}
	n.tablesBefore = netfilterTables()
	if data, err := os.ReadFile("/proc/sys/net/ipv4/ip_forward"); err == nil {
		n.ipForward = strings.TrimSpace(string(data))
	}

	// The mount namespace: private to the node, shared inside it (the
	// kubelet's HostToContainer propagation needs shared mounts), with a
	// bpffs of its own and a tmpfs over every host path the kubelet,
	// containerd and the CNI plugins write to whatever their
	// configuration says (/var/lib/kubelet/device-plugins,
	// /var/log/containers, /var/lib/cni, ...) and over /run/sockbypass
	// (the daemon's ownership markers): the host's stay untouched. A
	// directory missing on the host is created for the mount point and
	// removed by Stop.
	if opts.Systemd() {
		// The machine is the node's own: its mount namespace, its bpffs
		// (systemd mounts /sys/fs/bpf), systemd's cgroup tree.
		return n, n.startServices(ctx, ip)
	}
	script := "set -e; mount --make-rshared /; mount -t bpf bpf /sys/fs/bpf; "
	for _, d := range privateDirs {
		if _, err := os.Stat(d); os.IsNotExist(err) {
			if err := os.MkdirAll(d, 0o755); err != nil {
				return nil, err
			}
			n.createdDirs = append(n.createdDirs, d)
		}
		script += "mount -t tmpfs tmpfs " + d + "; "
	}
	ready := filepath.Join(dir, "mountns.ready")
	script += "touch " + ready + "; exec sleep 2147483647"
	if n.holder, err = start(dir, "mountns", 0, nil, "unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-c", script); err != nil {
		return nil, err
	}
	n.procs = append(n.procs, n.holder)
	if err := waitFor(ctx, 10*time.Second, func() error { _, err := os.Stat(ready); return err }); err != nil {
		return nil, fmt.Errorf("mount namespace: %w\n%s", err, n.holder.tail(2000))
	}

	// Cgroups: <root> in every hierarchy (the kubelet requires its cgroup
	// root to exist in each), and <root>/runtime in the v2 one for
	// containerd and its shims.
	hier, err := cgroupHierarchies()
	if err != nil {
		return nil, err
	}
	for _, h := range hier {
		if err := os.MkdirAll(filepath.Join(h, opts.Name), 0o755); err != nil {
			return nil, fmt.Errorf("create the node's cgroup root: %w", err)
		}
	}
	v2, err := Cgroup2Mount()
	if err != nil {
		return nil, err
	}
	runtimeCg := filepath.Join(v2, opts.Name, "runtime")
	if err := os.MkdirAll(runtimeCg, 0o755); err != nil {
		return nil, err
	}

	return n, n.startServices(ctx, ip)
}

// runtimeCgroup is the v2 cgroup of containerd, its shims and the
// kubelet (cgroupfs driver): <v2>/<root>/runtime.
func (n *Node) runtimeCgroup() string {
	v2, _ := Cgroup2Mount()
	return filepath.Join(v2, n.CgroupRoot, "runtime")
}

// startServices starts etcd, the control plane and containerd; ip is
// the node's address.
func (n *Node) startServices(ctx context.Context, ip net.IP) error {
	var err error
	// etcd and the control plane, on loopback.
	dir, opts := n.opts.Dir, n.opts
	t := time.Now()
	if err := writeCerts(filepath.Join(dir, "certs"), []net.IP{net.ParseIP("127.0.0.1"), net.ParseIP(ServiceIP), ip}); err != nil {
		return err
	}
	clientPort, err := freePort()
	if err != nil {
		return err
	}
	peerPort, err := freePort()
	if err != nil {
		return err
	}
	etcdURL := fmt.Sprintf("http://127.0.0.1:%d", clientPort)
	peerURL := fmt.Sprintf("http://127.0.0.1:%d", peerPort)
	if n.etcd, err = start(dir, "etcd", 0, nil, opts.Binaries.Etcd,
		"--data-dir", n.etcdDir,
		"--listen-client-urls", etcdURL, "--advertise-client-urls", etcdURL,
		"--listen-peer-urls", peerURL, "--initial-advertise-peer-urls", peerURL,
		"--initial-cluster", "default="+peerURL); err != nil {
		return err
	}
	n.procs = append(n.procs, n.etcd)
	token := "admin-" + rand.Text()
	if err := os.WriteFile(filepath.Join(dir, "certs", "tokens.csv"), []byte(token+",admin,admin,system:masters\n"), 0o600); err != nil {
		return err
	}
	// The API server's address: ServiceIP on the node's bridge.
	if out, err := exec.Command("ip", "link", "add", Bridge, "type", "bridge").CombinedOutput(); err != nil {
		return fmt.Errorf("ip link add %s: %v: %s", Bridge, err, out)
	}
	// The pods' gateway first: the bridge plugin (v1.10) accepts a bridge
	// whose first IPv4 address is its gateway, and refuses any other.
	for _, args := range [][]string{{"addr", "add", PodGateway, "dev", Bridge}, {"addr", "add", ServiceIP + "/32", "dev", Bridge}, {"link", "set", Bridge, "up"}} {
		if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
			return fmt.Errorf("ip %s: %v: %s", strings.Join(args, " "), err, out)
		}
	}
	certs := filepath.Join(dir, "certs")
	if n.apiserver, err = start(dir, "kube-apiserver", 0, nil, opts.Binaries.APIServer,
		"--etcd-servers", etcdURL,
		"--bind-address", ServiceIP, "--advertise-address", ServiceIP,
		"--secure-port", "443",
		"--tls-cert-file", filepath.Join(certs, "apiserver.crt"), "--tls-private-key-file", filepath.Join(certs, "apiserver.key"),
		"--token-auth-file", filepath.Join(certs, "tokens.csv"),
		"--authorization-mode", "Node,RBAC",
		"--service-account-issuer", "https://kubernetes.default.svc",
		"--service-account-key-file", filepath.Join(certs, "sa.key"),
		"--service-account-signing-key-file", filepath.Join(certs, "sa.key"),
		"--service-cluster-ip-range", ServiceCIDR,
		"--endpoint-reconciler-type", "none",
		"--allow-privileged=true",
	); err != nil {
		return err
	}
	n.procs = append(n.procs, n.apiserver)
	host := "https://" + ServiceIP + ":443"
	n.Config = &rest.Config{Host: host, BearerToken: token, TLSClientConfig: rest.TLSClientConfig{CAFile: filepath.Join(certs, "ca.crt")}, QPS: 100, Burst: 200}
	if n.Admin, err = kubernetes.NewForConfig(n.Config); err != nil {
		return err
	}
	if err := waitFor(ctx, opts.scaled(90*time.Second), func() error {
		body, err := n.Admin.Discovery().RESTClient().Get().AbsPath("/readyz").DoRaw(ctx)
		if err != nil {
			return fmt.Errorf("%v %s", err, body)
		}
		return nil
	}); err != nil {
		return fmt.Errorf("kube-apiserver not ready: %w\n%s", err, n.apiserver.tail(3000))
	}
	n.Kubeconfig = filepath.Join(dir, "admin.kubeconfig")
	kc := fmt.Sprintf(`apiVersion: v1
kind: Config
clusters:
- name: node
  cluster: {server: %q, certificate-authority: %q}
users:
- name: admin
  user: {token: %q}
contexts:
- name: node
  context: {cluster: node, user: admin}
current-context: node
`, host, filepath.Join(certs, "ca.crt"), token)
	if err := os.WriteFile(n.Kubeconfig, []byte(kc), 0o600); err != nil {
		return err
	}
	if n.kcm, err = start(dir, "kube-controller-manager", 0, nil, opts.Binaries.ControllerManager,
		"--kubeconfig", n.Kubeconfig, "--leader-elect=false",
		"--bind-address", "127.0.0.1", "--secure-port", "0",
		"--root-ca-file", filepath.Join(certs, "ca.crt"),
		"--service-account-private-key-file", filepath.Join(certs, "sa.key"),
		"--use-service-account-credentials=false",
		"--controllers", "*,-nodeipam,-nodelifecycle,-persistentvolume-binder,-attachdetach",
		"--service-cluster-ip-range", ServiceCIDR,
	); err != nil {
		return err
	}
	n.procs = append(n.procs, n.kcm)
	if n.scheduler, err = start(dir, "kube-scheduler", 0, nil, opts.Binaries.Scheduler,
		"--kubeconfig", n.Kubeconfig, "--leader-elect=false",
		"--bind-address", "127.0.0.1", "--secure-port", "0",
	); err != nil {
		return err
	}
	n.procs = append(n.procs, n.scheduler)
	n.timed("control plane up (etcd, kube-apiserver ready; controller manager, scheduler started)", t)

	// containerd.
	t = time.Now()
	if err := n.writeCNIConfig(); err != nil {
		return err
	}
	n.ContainerdSock = filepath.Join(dir, "containerd", "containerd.sock")
	cfgPath := filepath.Join(dir, "containerd", "config.toml")
	if err := os.WriteFile(cfgPath, []byte(n.containerdConfig()), 0o644); err != nil {
		return err
	}
	env := []string{"PATH=" + filepath.Dir(opts.Binaries.Shim) + ":" + os.Getenv("PATH")}
	if opts.Systemd() {
		// containerd and its shims stay in the cgroup of the unit that
		// runs the test; runc asks systemd for each container's scope.
		n.ctrd, err = start(dir, "containerd", 0, env, opts.Binaries.Containerd, "--config", cfgPath)
	} else {
		// containerd and its shims live in <root>/runtime (v2): Stop finds them there.
		n.ctrd, err = start(dir, "containerd", n.holder.pid(), env, "/bin/sh", "-c",
			"echo $$ > "+filepath.Join(n.runtimeCgroup(), "cgroup.procs")+" && exec "+opts.Binaries.Containerd+" --config "+cfgPath)
	}
	if err != nil {
		return err
	}
	n.procs = append(n.procs, n.ctrd)
	if err := waitFor(ctx, opts.scaled(30*time.Second), func() error {
		return n.Ctr(ctx, nil, "version")
	}); err != nil {
		return fmt.Errorf("containerd: %w\n%s", err, n.ctrd.tail(3000))
	}
	n.timed("containerd up", t)
	return nil
}

// StartKubelet starts the kubelet (after the images are imported) and
// waits for the Node to be Ready.
func (n *Node) StartKubelet(ctx context.Context) error {
	t := time.Now()
	dir := n.opts.Dir
	port, err := freePort()
	if err != nil {
		return err
	}
	healthz, err := freePort()
	if err != nil {
		return err
	}
	cfg := fmt.Sprintf(`apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: 127.0.0.1
port: %d
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: %d
authentication:
  anonymous: {enabled: true}
  webhook: {enabled: false}
authorization: {mode: AlwaysAllow}
%scgroupsPerQOS: true
failSwapOn: false
# No KUBE-* iptables chains on the shared host (no kube-proxy here uses them).
makeIPTablesUtilChains: false
containerRuntimeEndpoint: unix://%s
podLogsDir: %s
resolvConf: /etc/resolv.conf
evictionHard: {memory.available: "100Mi", nodefs.available: "1%%", imagefs.available: "1%%", nodefs.inodesFree: "1%%"}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
maxPods: 30
serializeImagePulls: false
syncFrequency: 10s
fileCheckFrequency: 10s
nodeStatusUpdateFrequency: 5s
`, port, healthz, n.kubeletCgroupConfig(), n.ContainerdSock, filepath.Join(dir, "kubelet", "logs"))
	cfgPath := filepath.Join(dir, "kubelet", "config.yaml")
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o644); err != nil {
		return err
	}
	ip, err := hostIP()
	if err != nil {
		return err
	}
	args := []string{
		"--config", cfgPath,
		"--kubeconfig", n.Kubeconfig,
		"--root-dir", filepath.Join(dir, "kubelet", "root"),
		"--cert-dir", filepath.Join(dir, "kubelet", "certs"),
		"--hostname-override", n.opts.Name,
		"--node-ip", ip.String(),
		"--v", "2",
	}
	if n.opts.Systemd() {
		n.kubelet, err = start(dir, "kubelet", 0, nil, n.opts.Binaries.Kubelet, args...)
	} else {
		n.kubelet, err = start(dir, "kubelet", n.holder.pid(), nil, "/bin/sh", "-c",
			"echo $$ > "+filepath.Join(n.runtimeCgroup(), "cgroup.procs")+" && exec "+n.opts.Binaries.Kubelet+" "+strings.Join(args, " "))
	}
	if err != nil {
		return err
	}
	n.procs = append(n.procs, n.kubelet)
	if err := waitFor(ctx, n.opts.scaled(120*time.Second), func() error {
		if !n.kubelet.running() {
			return errKubeletExited
		}
		node, err := n.Admin.CoreV1().Nodes().Get(ctx, n.opts.Name, metav1.GetOptions{})
		if err != nil {
			return err
		}
		for _, c := range node.Status.Conditions {
			if c.Type == corev1.NodeReady {
				if c.Status == corev1.ConditionTrue {
					return nil
				}
				return fmt.Errorf("node not ready: %s: %s", c.Reason, c.Message)
			}
		}
		return errors.New("node has no Ready condition yet")
	}); err != nil {
		return fmt.Errorf("kubelet: %w\n%s", err, n.kubelet.tail(4000))
	}
	n.timed("kubelet up, node Ready", t)
	return nil
}

var errKubeletExited = errors.New("the kubelet exited")

// kubeletCgroupConfig is the cgroup part of the kubelet's configuration.
func (n *Node) kubeletCgroupConfig() string {
	if n.opts.Systemd() {
		// What real nodes run: the default cgroup root (/, pods in
		// kubepods.slice) and failCgroupV1 at its default, true.
		return "cgroupDriver: systemd\n"
	}
	// This host mounts cgroup v2 in hybrid mode (controllers on v1):
	// the kubelet of 1.35 and later refuses v1 unless told not to.
	return fmt.Sprintf("cgroupDriver: cgroupfs\ncgroupRoot: /%s\nfailCgroupV1: false\n", n.CgroupRoot)
}

// PodLogsDir is the kubelet's podLogsDirectory.
func (n *Node) PodLogsDir() string { return filepath.Join(n.opts.Dir, "kubelet", "logs") }

// KubeletLog returns the end of the kubelet's log.
func (n *Node) KubeletLog(max int) string {
	if n.kubelet == nil {
		return ""
	}
	return n.kubelet.tail(max)
}

// Logs returns the end of every process's log.
func (n *Node) Logs(max int) string {
	var b strings.Builder
	for _, p := range n.procs {
		fmt.Fprintf(&b, "==== %s (%s)\n%s\n", p.name, p.log, p.tail(max))
	}
	return b.String()
}

func (n *Node) writeCNIConfig() error {
	conf := fmt.Sprintf(`{
  "cniVersion": "1.0.0",
  "name": "sockbypass-node-e2e",
  "plugins": [
    {
      "type": "bridge",
      "bridge": %q,
      "isGateway": true,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "ranges": [[{"subnet": %q}]],
        "dataDir": %q
      }
    }
  ]
}
`, Bridge, PodCIDR, filepath.Join(n.opts.Dir, "cni", "ipam"))
	return os.WriteFile(filepath.Join(n.opts.Dir, "cni", "conf", "10-bridge.conflist"), []byte(conf), 0o644)
}

// PauseImage is the sandbox image the node's containerd uses; the test
// imports it.
const PauseImage = "localhost/sockbypass-e2e/pause:1"

func (n *Node) containerdConfig() string {
	dir := filepath.Join(n.opts.Dir, "containerd")
	return fmt.Sprintf(`version = 3
root = %q
state = %q
[grpc]
  address = %q
[ttrpc]
  address = %q
[plugins]
  [plugins.'io.containerd.internal.v1.opt']
    path = %q
  [plugins.'io.containerd.nri.v1.nri']
    disable = true
  [plugins.'io.containerd.cri.v1.images']
    snapshotter = 'overlayfs'
    [plugins.'io.containerd.cri.v1.images'.pinned_images]
      sandbox = %q
  [plugins.'io.containerd.cri.v1.runtime']
    enable_cdi = false
    # This host's root has no CAP_SYS_RESOURCE: no process may lower its
    # oom_score_adj (the sandbox's -998, a Guaranteed container's -997).
    restrict_oom_score_adj = %v
    [plugins.'io.containerd.cri.v1.runtime'.containerd]
      default_runtime_name = 'runc'
      [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
        runtime_type = 'io.containerd.runc.v2'
        [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
          BinaryName = %q
          SystemdCgroup = %v
    [plugins.'io.containerd.cri.v1.runtime'.cni]
      bin_dirs = [%q]
      conf_dir = %q
      max_conf_num = 1
`, filepath.Join(dir, "root"), filepath.Join(dir, "state"), filepath.Join(dir, "containerd.sock"), filepath.Join(dir, "containerd.sock.ttrpc"),
		filepath.Join(dir, "opt"), PauseImage, !hasCap(capSysResource), n.opts.Binaries.Runc, n.opts.Systemd(), n.opts.Binaries.CNIDir, filepath.Join(n.opts.Dir, "cni", "conf"))
}

const capSysResource = 24

// hasCap reports whether this process has capability c in its bounding
// set (a sandboxed host may lack some: then no container can have it).
func hasCap(c uint) bool {
	data, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return false
	}
	for _, line := range strings.Split(string(data), "\n") {
		if v, ok := strings.CutPrefix(line, "CapBnd:"); ok {
			mask, err := strconv.ParseUint(strings.TrimSpace(v), 16, 64)
			return err == nil && mask&(1<<c) != 0
		}
	}
	return false
}

// HasCapSysResource reports whether the node's processes may have
// CAP_SYS_RESOURCE.
func HasCapSysResource() bool { return hasCap(capSysResource) }

// Ctr runs ctr against the node's containerd, in the node's mount
// namespace, in the k8s.io namespace.
func (n *Node) Ctr(ctx context.Context, out *string, args ...string) error {
	full := append([]string{"--address", n.ContainerdSock, "-n", "k8s.io"}, args...)
	b, err := n.inMountNS(ctx, n.opts.Binaries.Ctr, full...).CombinedOutput()
	if out != nil {
		*out = string(b)
	}
	if err != nil {
		return fmt.Errorf("ctr %s: %v: %s", strings.Join(args, " "), err, b)
	}
	return nil
}

// InMountNS runs a command in the node's mount namespace (where the
// node's bpffs is /sys/fs/bpf) and returns its output.
func (n *Node) InMountNS(ctx context.Context, name string, args ...string) ([]byte, error) {
	return n.inMountNS(ctx, name, args...).Output()
}

// inMountNS is the command that runs name in the node's mount namespace
// (the machine's own with the systemd driver).
func (n *Node) inMountNS(ctx context.Context, name string, args ...string) *exec.Cmd {
	if n.holder == nil {
		return exec.CommandContext(ctx, name, args...)
	}
	full := append([]string{"--mount=/proc/" + strconv.Itoa(n.holder.pid()) + "/ns/mnt", "--", name}, args...)
	return exec.CommandContext(ctx, "nsenter", full...)
}

// HolderPID is the PID of the process that holds the node's mount
// namespace (0 with the systemd driver: the machine's own).
func (n *Node) HolderPID() int {
	if n.holder == nil {
		return 0
	}
	return n.holder.pid()
}

func waitFor(ctx context.Context, timeout time.Duration, f func() error) error {
	deadline := time.Now().Add(timeout)
	for {
		err := f()
		if err == nil {
			return nil
		}
		if errors.Is(err, errKubeletExited) || time.Now().After(deadline) {
			return err
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(250 * time.Millisecond):
		}
	}
}

// WaitFor calls f every 250 ms until it returns nil or timeout passes.
func WaitFor(ctx context.Context, timeout time.Duration, f func() error) error {
	return waitFor(ctx, timeout, f)
}

// iptablesChains returns each table's chains.
func iptablesChains() (map[string][]string, error) {
	out := map[string][]string{}
	for _, table := range []string{"filter", "nat", "mangle"} {
		b, err := exec.Command("iptables", "-t", table, "-S").Output()
		if err != nil {
			return nil, fmt.Errorf("iptables -t %s -S: %w", table, err)
		}
		for _, line := range strings.Split(string(b), "\n") {
			if f := strings.Fields(line); len(f) >= 2 && (f[0] == "-N" || f[0] == "-P") {
				out[table] = append(out[table], f[1])
			}
		}
	}
	return out, nil
}

// cleanStale removes what a node of this name left behind when its test
// process was killed before Stop ran (the control plane, containerd and
// the kubelet die with it; the containers, the shims, the cgroups, the
// bridge do not): processes in the node's cgroups are killed by PID, the
// cgroups, the bridge and (older runs) DNAT rules removed.
func cleanStale(name string) error {
	hier, err := cgroupHierarchies()
	if err != nil {
		return err
	}
	// The shims name the old node's state directory (-address
	// <dir>/containerd/containerd.sock): it goes too, once they are dead.
	var stateDirs []string
	// Killed processes stay in cgroup.procs until init reaps them.
	for round := 0; round < 300; round++ {
		var pids []int
		for _, h := range hier {
			pids = append(pids, pidsIn(filepath.Join(h, name))...)
		}
		if len(pids) == 0 {
			break
		}
		for _, pid := range pids {
			cmdline, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
			args := strings.Split(string(cmdline), "\x00")
			if i := slices.Index(args, "-address"); i >= 0 && i+1 < len(args) && strings.HasSuffix(args[i+1], "/containerd/containerd.sock") {
				if d := filepath.Dir(filepath.Dir(args[i+1])); !slices.Contains(stateDirs, d) {
					stateDirs = append(stateDirs, d)
				}
			}
			syscall.Kill(pid, syscall.SIGKILL)
		}
		time.Sleep(100 * time.Millisecond)
	}
	for _, h := range hier {
		if err := removeCgroupTree(filepath.Join(h, name)); err != nil {
			return fmt.Errorf("a previous run's cgroups: %w", err)
		}
	}
	for _, d := range stateDirs {
		// Only a node state directory: it holds mountns.ready.
		if _, err := os.Stat(filepath.Join(d, "mountns.ready")); err == nil {
			os.RemoveAll(d)
		}
	}
	if _, err := net.InterfaceByName(Bridge); err == nil {
		exec.Command("ip", "link", "del", Bridge).Run()
	}
	// The chains a killed run's kubelet added, when no other kubelet runs
	// here (they would be its own).
	if out, _ := exec.Command("pgrep", "-x", "kubelet").Output(); len(strings.TrimSpace(string(out))) == 0 {
		for _, table := range []string{"filter", "nat", "mangle"} {
			for _, c := range kubeletChains {
				if exec.Command("iptables", "-t", table, "-S", c).Run() == nil {
					deleteChain(table, c)
				}
			}
		}
	}
	rules, _ := exec.Command("iptables", "-t", "nat", "-S", "OUTPUT").Output()
	for _, r := range strings.Split(string(rules), "\n") {
		if strings.HasPrefix(r, "-A OUTPUT ") && strings.Contains(r, "sockbypass-node-e2e "+name) {
			// -S quotes the comment: split it back into arguments.
			args := []string{"-t", "nat", "-D"}
			for _, f := range splitQuoted(r[len("-A "):]) {
				args = append(args, f)
			}
			exec.Command("iptables", args...).Run()
		}
	}
	return nil
}

// netfilterTables returns the iptables tables of the host's namespace,
// "ip nat", "ip6 filter", ... (as iptables-save and ip6tables-save list
// them).
func netfilterTables() []string {
	var out []string
	for _, fam := range []struct{ cmd, name string }{{"iptables-save", "ip"}, {"ip6tables-save", "ip6"}} {
		b, err := exec.Command(fam.cmd).Output()
		if err != nil {
			continue
		}
		for _, line := range strings.Split(string(b), "\n") {
			if t, ok := strings.CutPrefix(line, "*"); ok {
				out = append(out, fam.name+" "+strings.TrimSpace(t))
			}
		}
	}
	return out
}

// kubeletChains are the iptables chains a kubelet adds.
var kubeletChains = []string{"KUBE-FIREWALL", "KUBE-KUBELET-CANARY", "KUBE-IPTABLES-HINT"}

// deleteChain removes the rules that jump to chain c, flushes it and
// deletes it.
func deleteChain(table, c string) error {
	rules, _ := exec.Command("iptables", "-t", table, "-S").Output()
	for _, r := range strings.Split(string(rules), "\n") {
		if strings.HasPrefix(r, "-A ") && strings.HasSuffix(r, " -j "+c) {
			args := append([]string{"-t", table, "-D"}, splitQuoted(r[len("-A "):])...)
			exec.Command("iptables", args...).Run()
		}
	}
	exec.Command("iptables", "-t", table, "-F", c).Run()
	if out, err := exec.Command("iptables", "-t", table, "-X", c).CombinedOutput(); err != nil {
		return fmt.Errorf("iptables -t %s -X %s: %v: %s", table, c, err, out)
	}
	return nil
}

// splitQuoted splits an iptables -S line into its arguments, "a b" as one.
func splitQuoted(s string) []string {
	var out []string
	var cur strings.Builder
	quoted, any := false, false
	for _, r := range s {
		switch {
		case r == '"':
			quoted, any = !quoted, true
		case r == ' ' && !quoted:
			if any {
				out = append(out, cur.String())
				cur.Reset()
				any = false
			}
		default:
			cur.WriteRune(r)
			any = true
		}
	}
	if any {
		out = append(out, cur.String())
	}
	return out
}

// Stop stops everything the node started and removes what it made. It
// returns what it could not undo.
func (n *Node) Stop() error {
	var problems []string
	// The kubelet first, so it restarts nothing; then every container and
	// shim in the node's cgroups (SIGKILL by PID), then containerd and the
	// control plane.
	if n.kubelet != nil {
		n.kubelet.stop(15 * time.Second)
	}
	v2, _ := Cgroup2Mount()
	hier, _ := cgroupHierarchies()
	for round := 0; round < 300; round++ {
		var pids []int
		for _, h := range hier {
			pids = append(pids, pidsIn(filepath.Join(h, n.KubepodsDir))...)
		}
		if len(pids) == 0 {
			break
		}
		for _, pid := range pids {
			syscall.Kill(pid, syscall.SIGKILL)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if n.ctrd != nil {
		n.ctrd.stop(10 * time.Second)
	}
	if n.opts.Systemd() {
		// The shims, in the test's own cgroup with containerd: found by
		// the socket they name. kubepods.slice is systemd's to remove.
		for round := 0; round < 300; round++ {
			pids := n.shimPIDs()
			if len(pids) == 0 {
				break
			}
			for _, pid := range pids {
				syscall.Kill(pid, syscall.SIGKILL)
			}
			time.Sleep(100 * time.Millisecond)
		}
		if pids := n.shimPIDs(); len(pids) > 0 {
			problems = append(problems, fmt.Sprintf("containerd shims left: %v", pids))
		}
		if out, err := exec.Command("systemctl", "stop", "kubepods.slice").CombinedOutput(); err != nil {
			problems = append(problems, fmt.Sprintf("systemctl stop kubepods.slice: %v: %s", err, out))
		}
		// No mount namespace goes away with the node here: the mounts of
		// killed containers (rootfs overlays, shm) and of the kubelet's
		// pod volumes stay until unmounted.
		if err := unmountUnder(n.opts.Dir); err != nil {
			problems = append(problems, err.Error())
		}
	} else if v2 != "" {
		// The shims (containerd moved them into <root>/runtime with itself).
		for round := 0; round < 300; round++ {
			pids := pidsIn(filepath.Join(v2, n.CgroupRoot))
			if len(pids) == 0 {
				break
			}
			for _, pid := range pids {
				syscall.Kill(pid, syscall.SIGKILL)
			}
			time.Sleep(100 * time.Millisecond)
		}
		if pids := pidsIn(filepath.Join(v2, n.CgroupRoot)); len(pids) > 0 {
			problems = append(problems, fmt.Sprintf("processes left in the node's cgroups: %v", pids))
		}
	}
	for i := len(n.procs) - 1; i >= 0; i-- {
		n.procs[i].stop(10 * time.Second)
	}
	if n.etcdDir != "" && (n.etcd == nil || !n.etcd.running()) {
		if err := os.RemoveAll(n.etcdDir); err != nil {
			problems = append(problems, fmt.Sprintf("etcd's data: %v", err))
		}
	}
	// The mount namespace is gone with its last process: its bpffs (the
	// DaemonSet's pins), netns and container mounts with it.
	for _, h := range hier {
		if n.opts.Systemd() {
			break // no cgroup root of the node's own
		}
		if err := removeCgroupTree(filepath.Join(h, n.CgroupRoot)); err != nil {
			problems = append(problems, err.Error())
		}
	}
	if _, err := net.InterfaceByName(Bridge); err == nil {
		if out, err := exec.Command("ip", "link", "del", Bridge).CombinedOutput(); err != nil {
			problems = append(problems, fmt.Sprintf("ip link del %s: %v: %s", Bridge, err, out))
		}
	}
	if n.iptablesBefore != nil {
		now, err := iptablesChains()
		if err != nil {
			problems = append(problems, err.Error())
		}
		for table, chains := range now {
			for _, c := range chains {
				if slices.Contains(n.iptablesBefore[table], c) {
					continue
				}
				// A chain the kubelet added (KUBE-KUBELET-CANARY, ...).
				if err := deleteChain(table, c); err != nil {
					problems = append(problems, err.Error())
				}
			}
		}
	}
	// A netfilter table that appeared (a nat table hooks connection
	// tracking into every connection of the host's namespace): removed
	// when empty and nft is there to remove it, else reported.
	if n.tablesBefore != nil {
		for _, tb := range netfilterTables() {
			if slices.Contains(n.tablesBefore, tb) {
				continue
			}
			if out, err := exec.Command("nft", "delete", "table", tb).CombinedOutput(); err != nil {
				problems = append(problems, fmt.Sprintf("netfilter table %q appeared during the run and could not be removed: %v: %s", tb, err, out))
			}
		}
	}
	if n.ipForward != "" {
		os.WriteFile("/proc/sys/net/ipv4/ip_forward", []byte(n.ipForward), 0o644)
	}
	// Deepest first: a created parent goes after its children.
	for i := len(n.createdDirs) - 1; i >= 0; i-- {
		if err := os.Remove(n.createdDirs[i]); err != nil && !os.IsNotExist(err) {
			problems = append(problems, err.Error())
		}
	}
	if n.claim != nil {
		releaseClaim(n.claim)
		n.claim = nil
	}
	if len(problems) > 0 {
		return errors.New("node cleanup: " + strings.Join(problems, "; "))
	}
	return nil
}

// unmountUnder unmounts (lazily, deepest first) every mount below dir.
func unmountUnder(dir string) error {
	data, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return err
	}
	var points []string
	for _, line := range strings.Split(string(data), "\n") {
		f := strings.Fields(line)
		if len(f) > 4 && strings.HasPrefix(f[4], dir+"/") {
			points = append(points, f[4])
		}
	}
	slices.SortFunc(points, func(a, b string) int { return len(b) - len(a) })
	var failed []string
	for _, p := range points {
		if err := syscall.Unmount(p, syscall.MNT_DETACH); err != nil && !errors.Is(err, syscall.EINVAL) && !errors.Is(err, syscall.ENOENT) {
			failed = append(failed, fmt.Sprintf("%s: %v", p, err))
		}
	}
	if len(failed) > 0 {
		return fmt.Errorf("unmount under %s: %s", dir, strings.Join(failed, "; "))
	}
	return nil
}

// shimPIDs returns the PIDs of the containerd shims of the node's
// containerd (their -address names its socket).
func (n *Node) shimPIDs() []int {
	if n.ContainerdSock == "" {
		return nil
	}
	entries, _ := os.ReadDir("/proc")
	var out []int
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		cmdline, _ := os.ReadFile("/proc/" + e.Name() + "/cmdline")
		args := strings.Split(string(cmdline), "\x00")
		if i := slices.Index(args, "-address"); i >= 0 && i+1 < len(args) && args[i+1] == n.ContainerdSock && strings.HasSuffix(args[0], "containerd-shim-runc-v2") {
			out = append(out, pid)
		}
	}
	return out
}

// Healthz answers whether url returns 200 (for probes from the test).
func Healthz(url string) error {
	c := &http.Client{Timeout: 5 * time.Second} // the chart's probe timeout
	resp, err := c.Get(url)
	if err != nil {
		return err
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("%s: %s", url, resp.Status)
	}
	return nil
}
