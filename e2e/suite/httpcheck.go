package suite

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"net/http"
	"os"
	"time"
)

// httpChecksums fetches path n times over one keep-alive connection made
// by dialAs and compares the sha256 of every body with that of the file
// expected.
func httpChecksums(rc *runContext, port int, path, expected string, n int) (string, error) {
	want, err := os.ReadFile(expected)
	if err != nil {
		return "", err
	}
	wantSum := sha256.Sum256(want)
	conn, err := dialAs(rc, serverAddr(rc, port))
	if err != nil {
		return "", err
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	br := bufio.NewReader(conn)
	for i := 0; i < n; i++ {
		req, err := http.NewRequest(http.MethodGet, "http://"+serverAddr(rc, port)+path, nil)
		if err != nil {
			return "", err
		}
		if err := req.Write(conn); err != nil {
			return "", fmt.Errorf("GET %s: %w", path, err)
		}
		resp, err := http.ReadResponse(br, req)
		if err != nil {
			return "", fmt.Errorf("GET %s: %w", path, err)
		}
		h := sha256.New()
		_, err = io.Copy(h, resp.Body)
		resp.Body.Close()
		if err != nil {
			return "", fmt.Errorf("GET %s body: %w", path, err)
		}
		if resp.StatusCode != http.StatusOK {
			return "", fmt.Errorf("GET %s: status %s", path, resp.Status)
		}
		if got := h.Sum(nil); !bytes.Equal(got, wantSum[:]) {
			return "", fmt.Errorf("GET %s: body sha256 %s, want %s", path, hex.EncodeToString(got), hex.EncodeToString(wantSum[:]))
		}
	}
	return fmt.Sprintf("sha256 of %s matched on %d GETs per run", path, n), nil
}
