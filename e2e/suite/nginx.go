package suite

import (
	"context"
	"crypto/rand"
	"fmt"
	"os"
	"path/filepath"
	"text/template"
)

// nginxConf is the configuration of one nginx instance: a static server on
// the topology's server address, with its pid, logs and temporary files in
// its own directory.
var nginxConf = template.Must(template.New("nginx.conf").Parse(`daemon off;
worker_processes 1;
pid {{.Dir}}/nginx.pid;
error_log {{.Dir}}/error.log warn;
events { worker_connections 4096; }
http {
	access_log off;
	sendfile {{if .Sendfile}}on{{else}}off{{end}};
	keepalive_requests 1000000000;
	keepalive_timeout 75s;
	client_body_temp_path {{.Dir}}/client_body;
	proxy_temp_path {{.Dir}}/proxy;
	fastcgi_temp_path {{.Dir}}/fastcgi;
	uwsgi_temp_path {{.Dir}}/uwsgi;
	scgi_temp_path {{.Dir}}/scgi;
	default_type application/octet-stream;
	server {
		listen {{.Addr}};
		root {{.Dir}}/www;
		location = /close { return 200 "ok\n"; }
	}
}
`))

// closeBody is what /close answers.
const closeBody = "ok\n"

// nginxServer is a running nginx and the files it serves.
type nginxServer struct {
	proc *proc
	port int
	// bodies maps a URL path to the file with its expected content.
	bodies map[string]string
}

// startNginx writes a configuration and a random body of bodySize bytes
// (served at /body) into rc.dir and starts nginx on a free port.
func startNginx(ctx context.Context, rc *runContext, bodySize int, sendfile bool) (*nginxServer, error) {
	port, err := freePort(rc.topo.Server, rc.topo.ServerIP)
	if err != nil {
		return nil, err
	}
	www := filepath.Join(rc.dir, "www")
	if err := os.MkdirAll(www, 0o755); err != nil {
		return nil, err
	}
	srv := &nginxServer{port: port, bodies: map[string]string{}}
	if bodySize > 0 {
		body := make([]byte, bodySize)
		rand.Read(body)
		path := filepath.Join(www, "body")
		if err := os.WriteFile(path, body, 0o644); err != nil {
			return nil, err
		}
		srv.bodies["/body"] = path
	}
	closePath := filepath.Join(rc.dir, "close.expected")
	if err := os.WriteFile(closePath, []byte(closeBody), 0o644); err != nil {
		return nil, err
	}
	srv.bodies["/close"] = closePath
	conf := filepath.Join(rc.dir, "nginx.conf")
	f, err := os.Create(conf)
	if err != nil {
		return nil, err
	}
	err = nginxConf.Execute(f, map[string]any{"Dir": rc.dir, "Sendfile": sendfile, "Addr": serverAddr(rc, port)})
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return nil, err
	}
	p, err := startListening(ctx, procSpec{
		args:  []string{"nginx", "-c", conf, "-p", rc.dir, "-e", filepath.Join(rc.dir, "error.log")},
		netns: rc.topo.Server, mode: rc.mode, dir: rc.dir,
	}, port)
	if err != nil {
		errLog, _ := os.ReadFile(filepath.Join(rc.dir, "error.log"))
		return nil, fmt.Errorf("%w; error.log: %s", err, tail(string(errLog), 2000))
	}
	srv.proc = p
	return srv, nil
}

// url is the address of path on this server.
func (s *nginxServer) url(rc *runContext, path string) string {
	return "http://" + serverAddr(rc, s.port) + path
}

// stop stops nginx (SIGTERM to its master, which stops its worker).
func (s *nginxServer) stop() error { return s.proc.stop() }
