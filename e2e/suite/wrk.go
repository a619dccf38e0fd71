package suite

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"time"
)

// wrkResult is what one wrk run printed.
type wrkResult struct {
	requests    float64
	reqPerSec   float64
	p50, p99    float64 // microseconds
	non2xx      int
	socketError string
}

// wrkOptions are the client options of one run.
type wrkOptions struct {
	url string
	// close sends Connection: close, so that every request is a new
	// connection.
	close bool
	// script is a Lua script for wrk -s.
	script string
	// duration is rounded up to whole seconds (wrk takes no less).
	seconds int
}

// runWrk runs wrk with one thread and 16 connections from the client side
// of rc and parses its summary.
func runWrk(ctx context.Context, rc *runContext, o wrkOptions) (wrkResult, string, error) {
	args := []string{"wrk", "-t1", "-c16", "-d" + strconv.Itoa(o.seconds) + "s", "--latency"}
	if o.close {
		args = append(args, "-H", "Connection: close")
	}
	if o.script != "" {
		args = append(args, "-s", o.script)
	}
	args = append(args, o.url)
	out, err := runProc(ctx, procSpec{args: args, netns: rc.topo.Client, mode: rc.mode, dir: rc.dir},
		time.Duration(o.seconds)*time.Second+30*time.Second)
	if err != nil {
		return wrkResult{}, out, err
	}
	r, err := parseWrk(out)
	return r, out, err
}

var (
	wrkRequests = regexp.MustCompile(`(\d+) requests in`)
	wrkRPS      = regexp.MustCompile(`Requests/sec:\s+([0-9.]+)`)
	wrkNon2xx   = regexp.MustCompile(`Non-2xx or 3xx responses: (\d+)`)
	wrkSockErr  = regexp.MustCompile(`Socket errors: (.*)`)
	wrkPct      = regexp.MustCompile(`(?m)^\s+(50|99)\.000%\s+([0-9.]+)(us|ms|s)\s*$`)
	wrkPctShort = regexp.MustCompile(`(?m)^\s+(50|99)%\s+([0-9.]+)(us|ms|s)\s*$`)
)

// parseWrk reads wrk's summary; requests must have been answered and
// none with an error status.
func parseWrk(out string) (wrkResult, error) {
	var r wrkResult
	m := wrkRPS.FindStringSubmatch(out)
	n := wrkRequests.FindStringSubmatch(out)
	if m == nil || n == nil {
		return r, fmt.Errorf("wrk printed no summary:\n%s", tail(out, 2000))
	}
	r.reqPerSec, _ = strconv.ParseFloat(m[1], 64)
	r.requests, _ = strconv.ParseFloat(n[1], 64)
	if m := wrkNon2xx.FindStringSubmatch(out); m != nil {
		r.non2xx, _ = strconv.Atoi(m[1])
	}
	if m := wrkSockErr.FindStringSubmatch(out); m != nil {
		r.socketError = strings.TrimSpace(m[1])
	}
	pcts := wrkPct.FindAllStringSubmatch(out, -1)
	if len(pcts) == 0 {
		pcts = wrkPctShort.FindAllStringSubmatch(out, -1)
	}
	for _, p := range pcts {
		v, _ := strconv.ParseFloat(p[2], 64)
		switch p[3] {
		case "ms":
			v *= 1e3
		case "s":
			v *= 1e6
		}
		if p[1] == "50" {
			r.p50 = v
		} else {
			r.p99 = v
		}
	}
	switch {
	case r.requests == 0:
		return r, fmt.Errorf("wrk completed no request:\n%s", tail(out, 2000))
	case r.non2xx != 0:
		return r, fmt.Errorf("wrk: %d responses with an error status", r.non2xx)
	case r.socketError != "":
		return r, fmt.Errorf("wrk: socket errors: %s", r.socketError)
	}
	return r, nil
}

// wrkVerifyScript compares every response body with a file, byte for
// byte, and prints the counts.
const wrkVerifyScript = `local expected
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args)
	ok = 0
	bad = 0
	local f = assert(io.open(%q, "rb"))
	expected = f:read("*a")
	f:close()
end
function response(status, headers, body)
	if status == 200 and body == expected then ok = ok + 1 else bad = bad + 1 end
end
function done(summary, latency, requests)
	local o, b = 0, 0
	for _, t in ipairs(threads) do
		o = o + t:get("ok")
		b = b + t:get("bad")
	end
	io.write(string.format("SOCKBYPASS-VERIFY ok=%%d bad=%%d\n", o, b))
end
`

var wrkVerifyLine = regexp.MustCompile(`SOCKBYPASS-VERIFY ok=(\d+) bad=(\d+)`)

// wrkVerify runs wrk for one second with a script that compares every
// body with the file expected, through the client side of rc.
func wrkVerify(ctx context.Context, rc *runContext, url, expected string, close bool) (string, error) {
	script := filepath.Join(rc.dir, "verify.lua")
	if err := os.WriteFile(script, []byte(fmt.Sprintf(wrkVerifyScript, expected)), 0o644); err != nil {
		return "", err
	}
	_, out, err := runWrk(ctx, rc, wrkOptions{url: url, close: close, script: script, seconds: 1})
	if err != nil {
		return "", err
	}
	m := wrkVerifyLine.FindStringSubmatch(out)
	if m == nil {
		return "", fmt.Errorf("wrk verification printed no counts:\n%s", tail(out, 2000))
	}
	ok, _ := strconv.Atoi(m[1])
	bad, _ := strconv.Atoi(m[2])
	if bad != 0 || ok == 0 {
		return "", fmt.Errorf("wrk verification: %d bodies matched, %d did not", ok, bad)
	}
	return fmt.Sprintf("wrk compared %d bodies byte for byte", ok), nil
}
