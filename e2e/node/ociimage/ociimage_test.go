package ociimage

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"io"
	"testing"
)

func sha(b []byte) string {
	s := sha256.Sum256(b)
	return "sha256:" + hex.EncodeToString(s[:])
}

// TestWriteIsAValidLayout reads the tarball back as ctr import does:
// index -> manifest -> config and layer, every digest and size checked,
// the file inside the layer, the image name annotated.
func TestWriteIsAValidLayout(t *testing.T) {
	im := Image{Name: "localhost/x/y:1", Files: []File{{Path: "/bin/app", Data: []byte("#!hello"), Mode: 0o755}},
		Entrypoint: []string{"/bin/app"}, Dirs: []string{"/tmp"}}
	var buf bytes.Buffer
	mdigest, err := im.Write(&buf)
	if err != nil {
		t.Fatal(err)
	}
	files := map[string][]byte{}
	tr := tar.NewReader(&buf)
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		files[h.Name], _ = io.ReadAll(tr)
	}
	blob := func(d string) []byte {
		b, ok := files["blobs/sha256/"+d[len("sha256:"):]]
		if !ok {
			t.Fatalf("no blob %s", d)
		}
		if sha(b) != d {
			t.Fatalf("blob %s has digest %s", d, sha(b))
		}
		return b
	}
	var index struct {
		Manifests []descriptor `json:"manifests"`
	}
	if err := json.Unmarshal(files["index.json"], &index); err != nil || len(index.Manifests) != 1 {
		t.Fatalf("index.json: %v %s", err, files["index.json"])
	}
	md := index.Manifests[0]
	if md.Digest != mdigest || md.Annotations["io.containerd.image.name"] != im.Name {
		t.Fatalf("manifest descriptor %+v, want digest %s and the name", md, mdigest)
	}
	var manifest struct {
		Config descriptor   `json:"config"`
		Layers []descriptor `json:"layers"`
	}
	if err := json.Unmarshal(blob(md.Digest), &manifest); err != nil || len(manifest.Layers) != 1 {
		t.Fatalf("manifest: %v", err)
	}
	var config struct {
		Config struct{ Entrypoint []string }
		RootFS struct {
			DiffIDs []string `json:"diff_ids"`
		} `json:"rootfs"`
	}
	if err := json.Unmarshal(blob(manifest.Config.Digest), &config); err != nil {
		t.Fatal(err)
	}
	zr, err := gzip.NewReader(bytes.NewReader(blob(manifest.Layers[0].Digest)))
	if err != nil {
		t.Fatal(err)
	}
	raw, _ := io.ReadAll(zr)
	if len(config.RootFS.DiffIDs) != 1 || config.RootFS.DiffIDs[0] != sha(raw) {
		t.Fatalf("diff_ids %v, layer is %s", config.RootFS.DiffIDs, sha(raw))
	}
	if len(config.Config.Entrypoint) != 1 || config.Config.Entrypoint[0] != "/bin/app" {
		t.Errorf("entrypoint %v", config.Config.Entrypoint)
	}
	lr := tar.NewReader(bytes.NewReader(raw))
	found := map[string]bool{}
	for {
		h, err := lr.Next()
		if err != nil {
			break
		}
		found[h.Name] = true
		if h.Name == "bin/app" {
			data, _ := io.ReadAll(lr)
			if string(data) != "#!hello" || h.Mode != 0o755 {
				t.Errorf("bin/app: %q mode %o", data, h.Mode)
			}
		}
	}
	for _, want := range []string{"bin/", "bin/app", "tmp/"} {
		if !found[want] {
			t.Errorf("layer lacks %s (has %v)", want, found)
		}
	}
}
