package main

import (
	"bytes"
	"crypto/aes"
	"crypto/cipher"
	"encoding/binary"
	"fmt"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// Kernel TLS (include/uapi/linux/tls.h): TLS 1.2 with AES-GCM-128.
const (
	tlsTX              = 1      // TLS_TX, level SOL_TLS
	tls12Version       = 0x0303 // TLS_1_2_VERSION
	tlsCipherAESGCM128 = 51     // TLS_CIPHER_AES_GCM_128
	tlsAppData         = 23     // record type application_data
)

// tls12CryptoInfoAESGCM128 is struct tls12_crypto_info_aes_gcm_128 (40 bytes).
type tls12CryptoInfoAESGCM128 struct {
	Version    uint16
	CipherType uint16
	IV         [8]byte
	Key        [16]byte
	Salt       [4]byte
	RecSeq     [8]byte
}

// ktlsInfo is the fixed key material of every kTLS probe.
var ktlsInfo = tls12CryptoInfoAESGCM128{
	Version:    tls12Version,
	CipherType: tlsCipherAESGCM128,
	IV:         [8]byte{1, 2, 3, 4, 5, 6, 7, 8},
	Key:        [16]byte{'k', 'm', 'a', 't', 'r', 'i', 'x', '-', 'k', 't', 'l', 's', '-', 'k', 'e', 'y'},
	Salt:       [4]byte{9, 10, 11, 12},
	RecSeq:     [8]byte{},
}

const ktlsPlaintext = "hello"

// ktlsRecordLen is the TLS 1.2 AES-GCM record of ktlsPlaintext: a 5-byte
// header, the 8-byte explicit nonce, the ciphertext and the 16-byte tag.
const ktlsRecordLen = 5 + 8 + len(ktlsPlaintext) + 16

func (c *tls12CryptoInfoAESGCM128) bytes() []byte {
	var b bytes.Buffer
	binary.Write(&b, binary.NativeEndian, c)
	return b.Bytes()
}

// ktlsSetULP sets TCP_ULP "tls" on fd.
func ktlsSetULP(fd int) error {
	return unix.SetsockoptString(fd, unix.SOL_TCP, unix.TCP_ULP, "tls")
}

// ktlsSetTX sets TLS_TX with ktlsInfo on fd.
func ktlsSetTX(fd int) error {
	return unix.SetsockoptString(fd, unix.SOL_TLS, tlsTX, string(ktlsInfo.bytes()))
}

func stepResult(err error) string {
	if err != nil {
		return errnoName(err)
	}
	return "ok"
}

// ktlsProbeSteps are what a kTLS probe does before the client's TCP_ULP
// (beforeULP) and between its TCP_ULP and its TLS_TX (between); each is
// reported with its result.
type ktlsProbeSteps struct {
	beforeULP func() error
	between   func() error
}

// ktlsExchange runs TCP_ULP "tls" and TLS_TX on client, writes
// ktlsPlaintext (whether TLS_TX worked or not), and reports each step and
// what read (the server's end) returns: "ulp=ok tls_tx=ok write=5
// record=34 bytes type=23 decrypted="hello"", or the errno of a step.
func ktlsExchange(client int, read func([]byte) (int, error), steps ktlsProbeSteps) string {
	var parts []string
	if steps.beforeULP != nil {
		parts = append(parts, "delete_before_ulp="+stepResult(steps.beforeULP()))
	}
	ulpErr := ktlsSetULP(client)
	parts = append(parts, "ulp="+stepResult(ulpErr))
	if steps.between != nil {
		parts = append(parts, "delete_before_tls_tx="+stepResult(steps.between()))
	}
	if ulpErr == nil {
		parts = append(parts, "tls_tx="+stepResult(ktlsSetTX(client)))
	}
	n, err := unix.Write(client, []byte(ktlsPlaintext))
	if err != nil {
		return strings.Join(append(parts, "write="+errnoName(err)), " ")
	}
	parts = append(parts, fmt.Sprintf("write=%d", n))
	return strings.Join(append(parts, ktlsDescribe(read)), " ")
}

// ktlsDescribe reads what arrived (up to ktlsRecordLen bytes, 3 s at
// most) and tells a TLS record (decrypted with ktlsInfo) from plaintext.
func ktlsDescribe(read func([]byte) (int, error)) string {
	buf := make([]byte, 256)
	got := 0
	deadline := time.Now().Add(3 * time.Second)
	var rerr error
	for got < ktlsRecordLen && time.Now().Before(deadline) {
		n, err := read(buf[got:])
		if err != nil {
			rerr = err
			break
		}
		if n == 0 {
			rerr = fmt.Errorf("EOF")
			break
		}
		got += n
		if string(buf[:got]) == ktlsPlaintext {
			break // plaintext: a record never starts with 'h'
		}
	}
	data := buf[:got]
	var desc string
	switch {
	case got == 0 && rerr != nil:
		return "read=" + errnoName(rerr)
	case string(data) == ktlsPlaintext:
		desc = fmt.Sprintf("read=%d bytes plaintext=%q", got, ktlsPlaintext)
	case got >= 5:
		desc = fmt.Sprintf("record=%d bytes type=%d", got, data[0])
		if plain, err := ktlsOpen(data); err != nil {
			desc += " decrypt=" + err.Error()
		} else {
			desc += fmt.Sprintf(" decrypted=%q", plain)
		}
	default:
		desc = fmt.Sprintf("read=%d bytes %x", got, data)
	}
	if rerr != nil && got < ktlsRecordLen && string(data) != ktlsPlaintext {
		desc += " then " + errnoName(rerr)
	}
	return desc
}

// ktlsOpen checks and decrypts the first TLS 1.2 AES-GCM record of rec
// (sequence number 0, the key and salt of ktlsInfo).
func ktlsOpen(rec []byte) (string, error) {
	if len(rec) < 5 {
		return "", fmt.Errorf("short")
	}
	typ, ver, n := rec[0], binary.BigEndian.Uint16(rec[1:3]), int(binary.BigEndian.Uint16(rec[3:5]))
	if ver != tls12Version {
		return "", fmt.Errorf("version_%04x", ver)
	}
	if len(rec) < 5+n || n < 8+16 {
		return "", fmt.Errorf("length_%d_of_%d", n, len(rec)-5)
	}
	body := rec[5 : 5+n]
	block, err := aes.NewCipher(ktlsInfo.Key[:])
	if err != nil {
		return "", err
	}
	gcm, err := cipher.NewGCM(block)
	if err != nil {
		return "", err
	}
	nonce := append(append([]byte{}, ktlsInfo.Salt[:]...), body[:8]...)
	ct := body[8:]
	aad := make([]byte, 13)
	copy(aad, ktlsInfo.RecSeq[:])
	aad[8] = typ
	binary.BigEndian.PutUint16(aad[9:], tls12Version)
	binary.BigEndian.PutUint16(aad[11:], uint16(len(ct)-16))
	plain, err := gcm.Open(nil, nonce, ct, aad)
	if err != nil {
		return "", fmt.Errorf("failed")
	}
	return string(plain), nil
}

// fdReader reads fd once it is readable, waiting at most 3 s (ETIMEDOUT).
func fdReader(fd int) func([]byte) (int, error) {
	return func(b []byte) (int, error) {
		fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
		n, err := unix.Poll(fds, 3000)
		if err != nil {
			return 0, err
		}
		if n == 0 {
			return 0, unix.ETIMEDOUT
		}
		return unix.Read(fd, b)
	}
}

// ktlsPlainProbe: kTLS on a plain loopback pair.
func ktlsPlainProbe() string {
	client, server, err := tcpPair()
	if err != nil {
		return "error: " + err.Error()
	}
	defer unix.Close(client)
	defer unix.Close(server)
	return ktlsExchange(client, fdReader(server), ktlsProbeSteps{})
}

// ktlsMemberProbe: kTLS on the client of a sockhash member pair (kind's
// sk_msg program); with deleteBetween, both sockets are deleted from the
// sockhash between TCP_ULP and TLS_TX; with deleteBefore, before TCP_ULP.
func ktlsMemberProbe(kind progKind, deleteBefore, deleteBetween bool) string {
	client, server, m, closeAll, err := memberPairMap(kind)
	if err != nil {
		return "error: " + err.Error()
	}
	defer closeAll()
	del := func() error {
		if err := m.Delete(uint32(0)); err != nil {
			return err
		}
		return m.Delete(uint32(1))
	}
	var steps ktlsProbeSteps
	if deleteBefore {
		steps.beforeULP = del
	}
	if deleteBetween {
		steps.between = del
	}
	return ktlsExchange(client, fdReader(server), steps)
}
