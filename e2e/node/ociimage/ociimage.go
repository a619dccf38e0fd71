// Package ociimage writes container images as OCI image layout tarballs,
// with no registry and no container engine: one layer made of the files
// given (static binaries), a config and a manifest, the layout that
// `ctr images import` reads. The node e2e test (e2e/node) builds its
// sockbypass, pause and workload images with it.
package ociimage

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path"
	"runtime"
	"sort"
	"time"
)

// Media types of the OCI image specification.
const (
	mediaIndex    = "application/vnd.oci.image.index.v1+json"
	mediaManifest = "application/vnd.oci.image.manifest.v1+json"
	mediaConfig   = "application/vnd.oci.image.config.v1+json"
	mediaLayer    = "application/vnd.oci.image.layer.v1.tar+gzip"
)

// File is one file of the image's only layer.
type File struct {
	// Path inside the image, absolute ("/sockbypass").
	Path string
	// Source is the file on this host to copy, or "" for Data.
	Source string
	Data   []byte
	Mode   int64
}

// Image describes an image to write.
type Image struct {
	// Name is the full reference containerd stores the image under
	// ("localhost/sockbypass-e2e/pause:1").
	Name       string
	Files      []File
	Entrypoint []string
	Cmd        []string
	Env        []string
	// Dirs are empty directories to create (mount points: "/tmp").
	Dirs []string
}

type descriptor struct {
	MediaType   string            `json:"mediaType"`
	Digest      string            `json:"digest"`
	Size        int64             `json:"size"`
	Annotations map[string]string `json:"annotations,omitempty"`
	Platform    *platform         `json:"platform,omitempty"`
}

type platform struct {
	Architecture string `json:"architecture"`
	OS           string `json:"os"`
}

// epoch keeps the layer reproducible: the same files give the same digest.
var epoch = time.Unix(0, 0).UTC()

// layer returns the uncompressed tar of the image's files.
func (im *Image) layer() ([]byte, error) {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	dirs := map[string]bool{}
	var addDir func(d string) error
	addDir = func(d string) error {
		if d == "/" || d == "." || dirs[d] {
			return nil
		}
		if err := addDir(path.Dir(d)); err != nil {
			return err
		}
		dirs[d] = true
		return tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: d[1:] + "/", Mode: 0o755, ModTime: epoch})
	}
	for _, d := range im.Dirs {
		if err := addDir(path.Clean(d)); err != nil {
			return nil, err
		}
	}
	files := append([]File(nil), im.Files...)
	sort.Slice(files, func(i, j int) bool { return files[i].Path < files[j].Path })
	for _, f := range files {
		p := path.Clean(f.Path)
		if !path.IsAbs(p) {
			return nil, fmt.Errorf("image %s: file path %q is not absolute", im.Name, f.Path)
		}
		data := f.Data
		if f.Source != "" {
			var err error
			if data, err = os.ReadFile(f.Source); err != nil {
				return nil, fmt.Errorf("image %s: %w", im.Name, err)
			}
		}
		if err := addDir(path.Dir(p)); err != nil {
			return nil, err
		}
		mode := f.Mode
		if mode == 0 {
			mode = 0o644
		}
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: p[1:], Mode: mode, Size: int64(len(data)), ModTime: epoch}); err != nil {
			return nil, err
		}
		if _, err := tw.Write(data); err != nil {
			return nil, err
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

func digest(b []byte) string {
	sum := sha256.Sum256(b)
	return "sha256:" + hex.EncodeToString(sum[:])
}

// Write writes the image as an OCI image layout tarball to w, for
// `ctr images import`, and returns the manifest's digest.
func (im *Image) Write(w io.Writer) (string, error) {
	raw, err := im.layer()
	if err != nil {
		return "", err
	}
	var gz bytes.Buffer
	zw, _ := gzip.NewWriterLevel(&gz, gzip.BestSpeed)
	zw.ModTime = epoch
	if _, err := zw.Write(raw); err != nil {
		return "", err
	}
	if err := zw.Close(); err != nil {
		return "", err
	}
	plat := platform{Architecture: runtime.GOARCH, OS: "linux"}
	config, err := json.Marshal(map[string]any{
		"architecture": plat.Architecture,
		"os":           plat.OS,
		"created":      epoch.Format(time.RFC3339),
		"config": map[string]any{
			"Entrypoint": im.Entrypoint,
			"Cmd":        im.Cmd,
			"Env":        append([]string{"PATH=/usr/local/bin:/usr/bin:/bin:/"}, im.Env...),
		},
		"rootfs": map[string]any{"type": "layers", "diff_ids": []string{digest(raw)}},
	})
	if err != nil {
		return "", err
	}
	layerDesc := descriptor{MediaType: mediaLayer, Digest: digest(gz.Bytes()), Size: int64(gz.Len())}
	configDesc := descriptor{MediaType: mediaConfig, Digest: digest(config), Size: int64(len(config))}
	manifest, err := json.Marshal(map[string]any{
		"schemaVersion": 2,
		"mediaType":     mediaManifest,
		"config":        configDesc,
		"layers":        []descriptor{layerDesc},
	})
	if err != nil {
		return "", err
	}
	manifestDesc := descriptor{
		MediaType: mediaManifest, Digest: digest(manifest), Size: int64(len(manifest)), Platform: &plat,
		Annotations: map[string]string{
			// ctr import names the image after this annotation.
			"io.containerd.image.name":          im.Name,
			"org.opencontainers.image.ref.name": im.Name,
		},
	}
	index, err := json.Marshal(map[string]any{
		"schemaVersion": 2,
		"mediaType":     mediaIndex,
		"manifests":     []descriptor{manifestDesc},
	})
	if err != nil {
		return "", err
	}
	tw := tar.NewWriter(w)
	put := func(name string, data []byte) error {
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: name, Mode: 0o644, Size: int64(len(data)), ModTime: epoch}); err != nil {
			return err
		}
		_, err := tw.Write(data)
		return err
	}
	blob := func(data []byte) error { return put("blobs/sha256/"+digest(data)[len("sha256:"):], data) }
	for _, step := range []func() error{
		func() error { return put("oci-layout", []byte(`{"imageLayoutVersion":"1.0.0"}`)) },
		func() error { return put("index.json", index) },
		func() error { return blob(manifest) },
		func() error { return blob(config) },
		func() error { return blob(gz.Bytes()) },
		tw.Close,
	} {
		if err := step(); err != nil {
			return "", err
		}
	}
	return manifestDesc.Digest, nil
}

// WriteFile writes the image's tarball to file (see Write).
func (im *Image) WriteFile(file string) (string, error) {
	f, err := os.Create(file)
	if err != nil {
		return "", err
	}
	d, err := im.Write(f)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return d, err
}
