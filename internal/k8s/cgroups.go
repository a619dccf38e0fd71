package k8s

import (
	"os"
	"path"
	"path/filepath"
	"strings"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/types"
)

// PodCgroup returns the pod-level cgroup (relative to the cgroup v2 mount)
// that a kubelet whose pod cgroups live under kubepods puts a pod of the
// given UID and QoS class in. The driver is told by kubepods: a systemd
// slice ("kubepods.slice", "kubelet.slice/kubelet-kubepods.slice" with
// --cgroup-root=/kubelet.slice) or a cgroupfs directory ("kubepods",
// "kubelet/kubepods").
//
//	systemd:  <kp>/<p>-burstable.slice/<p>-burstable-pod<uid_with_underscores>.slice
//	          <kp>/<p>-pod<uid_with_underscores>.slice          (Guaranteed)
//	cgroupfs: <kp>/burstable/pod<uid>, <kp>/besteffort/pod<uid>
//	          <kp>/pod<uid>                                      (Guaranteed)
//
// where <p> is the kubepods slice's name without ".slice".
func PodCgroup(kubepods string, uid types.UID, qos corev1.PodQOSClass) string {
	base := path.Base(kubepods)
	if prefix, ok := strings.CutSuffix(base, ".slice"); ok {
		id := strings.ReplaceAll(string(uid), "-", "_")
		if qos == corev1.PodQOSGuaranteed {
			return path.Join(kubepods, prefix+"-pod"+id+".slice")
		}
		q := prefix + "-" + strings.ToLower(string(qos))
		return path.Join(kubepods, q+".slice", q+"-pod"+id+".slice")
	}
	if qos == corev1.PodQOSGuaranteed {
		return path.Join(kubepods, "pod"+string(uid))
	}
	return path.Join(kubepods, strings.ToLower(string(qos)), "pod"+string(uid))
}

// qosClasses are tried in this order when a pod's status has no QoS class
// yet.
var qosClasses = []corev1.PodQOSClass{corev1.PodQOSBurstable, corev1.PodQOSBestEffort, corev1.PodQOSGuaranteed}

// PodCgroupCandidates returns where the pod's cgroup can be, for each
// kubepods directory: the one of its QoS class first, then (only when
// the class is not known yet) the other classes'.
func PodCgroupCandidates(kubepods []string, uid types.UID, qos corev1.PodQOSClass) []string {
	var out []string
	for _, kp := range kubepods {
		if qos != "" {
			out = append(out, PodCgroup(kp, uid, qos))
			continue
		}
		for _, q := range qosClasses {
			out = append(out, PodCgroup(kp, uid, q))
		}
	}
	return out
}

// isKubepods reports whether a cgroup directory name is a kubelet's pod
// root: "kubepods" (cgroupfs) or "kubepods.slice", "<root>-kubepods.slice"
// (systemd).
func isKubepods(name string) bool {
	return name == "kubepods" || name == "kubepods.slice" || strings.HasSuffix(name, "-kubepods.slice")
}

// FindKubepods returns the kubelet pod roots under the cgroup v2 mount
// root, relative to it, looking maxDepth levels down (the default
// --cgroup-root "/" puts them at the top; kind and others use a root such
// as /kubelet or /kubelet.slice, one level down). Service and scope
// cgroups are not entered. An unreadable root is an error; unreadable
// directories below it are skipped.
func FindKubepods(root string, maxDepth int) ([]string, error) {
	if _, err := os.ReadDir(root); err != nil {
		return nil, err
	}
	var out []string
	var walk func(rel string, depth int)
	walk = func(rel string, depth int) {
		entries, err := os.ReadDir(filepath.Join(root, rel))
		if err != nil {
			return
		}
		for _, e := range entries {
			name := e.Name()
			if !e.IsDir() || strings.HasSuffix(name, ".scope") || strings.HasSuffix(name, ".service") {
				continue
			}
			child := path.Join(rel, name)
			if isKubepods(name) {
				out = append(out, child)
				continue
			}
			if depth < maxDepth {
				walk(child, depth+1)
			}
		}
	}
	walk("", 1)
	return out, nil
}
