// Package suite is the end-to-end benchmark and acceptance suite of
// sockbypass: it builds its own topologies (one network namespace over
// loopback, and two namespaces joined by a veth pair), drives real programs
// plain and accelerated side by side: the accelerated workloads
// (e2e/cmd/epollpingpong, an epoll ping-pong with non-blocking sockets; wrk
// against nginx; redis-benchmark against redis-server), short connections
// (mostly left plain) and the controls, whose blocking sockets are left
// plain (sockperf, iperf3); it verifies the content of every application
// run, and writes results.json, results.md (accelerated rows first, each
// with its kind) and PNG charts.
//
// Plain runs put both ends in a cgroup that is not enabled; accelerated runs
// put both ends in an enabled cgroup. Runs alternate between the two modes
// and every metric is the median of the runs, with its spread. Timings are
// reported, never asserted; what the counters saw is: a case fails when a
// blocking workload was accelerated, or when any other one redirected less
// than its MinRedirected share of its payload (TC accounts the stack on
// every device of both topologies).
package suite
