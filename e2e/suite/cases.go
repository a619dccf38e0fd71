package suite

import (
	"fmt"
	"regexp"
)

// FullCases is the whole suite, on both topologies: the accelerated
// workloads first (epoll ping-pong at 64 B and 16 KiB on one CPU and on
// two), then the controls: sockperf ping-pong at 64 B, 1 KiB and 16 KiB
// on one CPU and on two; iperf3 with 1 KiB, 16 KiB and 128 KiB writes
// (both block: sockbypass leaves them plain); then short connections per
// second; redis-benchmark with and without pipelining; wrk against nginx
// with 1 KiB and 100 KiB bodies, sendfile on and off.
func FullCases() []Case {
	var cases []Case
	for _, topo := range []string{TopoLoopback, TopoVeth} {
		for _, cpus := range []cpuPlacement{OneCPU, TwoCPU} {
			for _, size := range []int{64, 16 << 10} {
				cases = append(cases, epollCase(topo, size, cpus))
			}
		}
		for _, cpus := range []cpuPlacement{OneCPU, TwoCPU} {
			for _, size := range []int{64, 1 << 10, 16 << 10} {
				cases = append(cases, sockperfCase(topo, size, cpus))
			}
		}
		for _, size := range []int{1 << 10, 16 << 10, 128 << 10} {
			cases = append(cases, iperfCase(topo, size))
		}
		cases = append(cases, connRateCase(topo))
		for _, p := range []int{1, 16} {
			cases = append(cases, redisCase(topo, p))
		}
		for _, size := range []int{1 << 10, 100 << 10} {
			for _, sf := range []bool{true, false} {
				cases = append(cases, nginxCase(topo, size, sf))
			}
		}
	}
	return cases
}

// QuickCases is a subset of FullCases for make bench-quick: every workload
// over loopback, a few sizes, and two cases of the veth topology.
func QuickCases() []Case {
	return []Case{
		epollCase(TopoLoopback, 64, OneCPU),
		sockperfCase(TopoLoopback, 64, OneCPU),
		sockperfCase(TopoLoopback, 64, TwoCPU),
		sockperfCase(TopoLoopback, 16<<10, TwoCPU),
		iperfCase(TopoLoopback, 16<<10),
		iperfCase(TopoLoopback, 128<<10),
		connRateCase(TopoLoopback),
		redisCase(TopoLoopback, 1),
		redisCase(TopoLoopback, 16),
		nginxCase(TopoLoopback, 1<<10, true),
		nginxCase(TopoLoopback, 100<<10, false),
		epollCase(TopoVeth, 64, OneCPU),
		sockperfCase(TopoVeth, 64, TwoCPU),
		iperfCase(TopoVeth, 128<<10),
	}
}

// SmokeCases is the CI subset: one case of every workload over loopback,
// and pod to pod over the veth a blocking one, long connections and short
// ones. Non-blocking workloads must redirect on both topologies.
func SmokeCases() []Case {
	return []Case{
		epollCase(TopoLoopback, 64, TwoCPU),
		sockperfCase(TopoLoopback, 1<<10, TwoCPU),
		iperfCase(TopoLoopback, 16<<10),
		connRateCase(TopoLoopback),
		redisCase(TopoLoopback, 16),
		nginxCase(TopoLoopback, 100<<10, true),
		epollCase(TopoVeth, 64, OneCPU),
		iperfCase(TopoVeth, 16<<10),
		redisCase(TopoVeth, 16),
		connRateCase(TopoVeth),
	}
}

// minRedirected is the share of their payload the workloads that do not
// block (nginx, redis, sockperf, iperf3) must redirect, on both
// topologies: redirected / (redirected + TCP payload TC saw leave through
// the stack). Measured on the 2-core development VM (kernel 6.18,
// 2026-11-28): 100.000%, not one payload byte through the stack, in every
// accelerated run of the 14 cases (2 runs of 1 s each) and of the smoke
// subset; a pair redirects from its first byte and every connection of
// these programs pairs. The 1% margin leaves room for a rare pair given
// up under load (pairs_abandoned); in the keep-alive
// cases (16 to 20 connections per run) one connection that does not pair
// carries more than 1% of the bytes and fails the case.
const minRedirected = 0.99

// MinShortLived is the smallest share of a short-connection case's
// accelerated connections that must stay plain as short-lived: after the
// first 8, one in 64 is still paired as a probe (about 98%).
const MinShortLived = 0.85

// AllCases is every case the suite knows, full and smoke, without
// duplicates, for selection by name.
func AllCases() []Case {
	seen := map[string]bool{}
	var all []Case
	for _, list := range [][]Case{FullCases(), QuickCases(), SmokeCases()} {
		for _, c := range list {
			if !seen[c.Name] {
				seen[c.Name] = true
				all = append(all, c)
			}
		}
	}
	return all
}

// Select returns the cases whose name matches the regular expression
// pattern.
func Select(cases []Case, pattern string) ([]Case, error) {
	re, err := regexp.Compile(pattern)
	if err != nil {
		return nil, fmt.Errorf("case pattern: %w", err)
	}
	var out []Case
	for _, c := range cases {
		if re.MatchString(c.Name) {
			out = append(out, c)
		}
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("no case matches %q", pattern)
	}
	return out, nil
}
