#!/usr/bin/env bash
# The kernel matrix: boots Debian's own cloud kernels (Debian 12's 6.1 and
# 6.12, Debian 13's 6.12, unstable's newest) under qemu (TCG, no KVM
# needed) and runs sockbypass on each: enable (with TC on lo, else --no-tc),
# status, a sha256-checked 4 MiB echo inside the enabled cgroup with the
# redirected bytes from `stats --json`, doctor --json, uninstall and a check
# that nothing stays pinned; plus kernel probes (tcx and sockmap links,
# tp_btf sock_recv_length, fentry, FIONREAD and signal behaviour on sockhash
# members, kernel TLS on plain sockets and sockhash members) from
# e2e/kernels/guest.
#
#   e2e/kernels/run.sh [KERNEL...]
#
#   KERNEL       package (the newest version apt knows)       apt sources
#   6.1          linux-image-6.1.0-*-cloud-amd64-unsigned       the host's
#   6.12         linux-image-6.12.*+deb12-cloud-amd64-unsigned  the host's
#   6.12-trixie  linux-image-6.12.*+deb13-cloud-amd64-unsigned  private: trixie, trixie-security
#   sid          linux-image-*-cloud-amd64-unsigned, or         private: sid
#                linux-binary-unsigned-*-cloud-amd64 with its
#                linux-modules-* and linux-base-* (sid splits
#                the kernel package in three since 7.x)
#   (default: all four, in this order)
#
# Needs root (apt, mknod). Installs with apt what is missing: qemu-system-x86,
# busybox-static, cpio, xz-utils, zstd. Kernel packages are fetched with
# `apt-get download` and unpacked with `dpkg -x`: never installed. 6.1 and
# 6.12 come from the host's apt sources; when no 6.12 package is known to apt,
# bookworm-backports is added to /etc/apt/sources.list.d (only if no source
# names it yet). 6.12-trixie and sid come from private apt configurations
# under $KMATRIX_CACHE/apt/<suite>/ (own sources.list, lists, cache and an
# empty dpkg status, signatures checked with
# /usr/share/keyrings/debian-archive-keyring.gpg): trixie and sid are never
# added to the host's sources, so the host's apt never installs from them.
# `apt-get update` runs only when a needed package or kernel is missing (for
# a private configuration: not known yet, or not downloaded yet). A private
# suite's InRelease past its Valid-Until (a stale mirror, which apt takes
# only when the host's apt configuration turns Acquire::Check-Valid-Until
# off) gets a WARNING.
#
# Everything made at run time lives under $KMATRIX_CACHE
# (default /var/cache/sockbypass-kernels): kernels, binaries, initramfs, and
# per run runs/<kernel>/{console.log,results.txt}.
#
# The measured results are compared with e2e/kernels/expected.txt (what was
# measured when the harness was written: enable fails on 6.1). Any
# difference exits 1; a step expected "ok" that fails is a REGRESSION.
# KMATRIX_UPDATE=1 writes the measured results into expected.txt instead.
#
# Environment: KMATRIX_CACHE, KMATRIX_TIMEOUT (seconds per kernel, default
# 300), KMATRIX_UPDATE, KMATRIX_PKG_6_1 / KMATRIX_PKG_6_12 /
# KMATRIX_PKG_6_12_trixie / KMATRIX_PKG_sid (an exact kernel package name
# instead of the newest; for sid's split packages, the
# linux-binary-unsigned-* one: its linux-modules-* and linux-base-* follow).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
CACHE=${KMATRIX_CACHE:-/var/cache/sockbypass-kernels}
TIMEOUT=${KMATRIX_TIMEOUT:-300}
EXPECTED=${KMATRIX_EXPECTED:-$HERE/expected.txt}
export PATH="$PATH:/usr/local/go/bin"

log() { printf '== %s\n' "$*" >&2; }
die() { printf 'kernels/run.sh: %s\n' "$*" >&2; exit 2; }

[ "$(id -u)" = 0 ] || die "run as root (apt-get, mknod, kernel packages)"
command -v go >/dev/null || die "go not found (PATH=$PATH)"

KERNELS=("$@")
[ ${#KERNELS[@]} -gt 0 ] || KERNELS=(6.1 6.12 6.12-trixie sid)
for k in "${KERNELS[@]}"; do
	case $k in 6.1 | 6.12 | 6.12-trixie | sid) ;; *) die "unknown kernel $k: use 6.1, 6.12, 6.12-trixie or sid" ;; esac
done

# --- apt: the host's sources, or a private configuration per suite ----------

# kernel_suite K: "host" for a kernel of the host's apt sources, else the
# suite whose private apt configuration carries it.
kernel_suite() {
	case $1 in
	6.12-trixie) echo trixie ;;
	sid) echo sid ;;
	*) echo host ;;
	esac
}

KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg

# suite_sources SUITE: the sources.list of a private configuration.
suite_sources() {
	local opts="[arch=amd64 signed-by=$KEYRING]"
	case $1 in
	trixie)
		echo "deb $opts http://deb.debian.org/debian trixie main"
		echo "deb $opts http://deb.debian.org/debian-security trixie-security main"
		;;
	sid) echo "deb $opts http://deb.debian.org/debian sid main" ;;
	esac
}

# apt_setup K: sets SUITE and APTO, the options that point apt-get and
# apt-cache at K's suite: none for the host's sources; for trixie and sid a
# private configuration under $CACHE/apt/<suite>/ (sources.list, lists,
# cache, an empty dpkg status, no host sources or preferences). Nothing is
# ever installed with it: only `apt-get download`.
SUITE=host
APTO=()
apt_setup() {
	SUITE=$(kernel_suite "$1")
	APTO=()
	[ "$SUITE" = host ] && return 0
	local d=$CACHE/apt/$SUITE
	mkdir -p "$d/lists/partial" "$d/cache/archives/partial"
	suite_sources "$SUITE" >"$d/sources.list.new"
	if cmp -s "$d/sources.list.new" "$d/sources.list"; then
		rm -f "$d/sources.list.new"
	else
		mv "$d/sources.list.new" "$d/sources.list"
	fi
	: >"$d/status"
	APTO=(
		-o "Dir::Etc::SourceList=$d/sources.list" -o Dir::Etc::SourceParts=/dev/null
		-o Dir::Etc::Preferences=/dev/null -o Dir::Etc::PreferencesParts=/dev/null
		-o "Dir::State=$d" -o "Dir::State::Lists=$d/lists" -o "Dir::State::status=$d/status"
		-o "Dir::State::extended_states=$d/extended_states" -o "Dir::Cache=$d/cache"
		-o Debug::NoLocking=1 -o APT::Sandbox::User=root
	)
}

# apt_update_once: `apt-get update` of SUITE's configuration, once a run.
declare -A APT_UPDATED
apt_update_once() {
	[ -z "${APT_UPDATED[$SUITE]:-}" ] || return 0
	if [ "$SUITE" = host ]; then
		log "apt-get update"
		apt-get update -qq
	else
		log "apt-get update of the private $SUITE configuration ($CACHE/apt/$SUITE)"
		# apt refuses (exit 100) a Release file whose signature it cannot
		# verify with $KEYRING: the run stops here, nothing is downloaded.
		apt-get "${APTO[@]}" update -qq ||
			die "apt-get update of the private $SUITE configuration failed (see above)"
	fi
	APT_UPDATED[$SUITE]=1
}

# warn_stale: warns when a Release file of SUITE's private lists is past
# its Valid-Until (a stale mirror): apt takes such a file only when
# Acquire::Check-Valid-Until is off in the host's apt configuration. Its
# signature was checked all the same.
warn_stale() {
	local f vu date
	[ "$SUITE" != host ] || return 0
	for f in "$CACHE/apt/$SUITE/lists/"*_InRelease; do
		[ -f "$f" ] || continue
		vu=$(sed -n 's/^Valid-Until: //p' "$f" | head -n 1)
		date=$(sed -n 's/^Date: //p' "$f" | head -n 1)
		[ -n "$vu" ] || continue
		if [ "$(date -d "$vu" +%s)" -lt "$(date +%s)" ]; then
			log "WARNING: $(basename "$f") (Date: $date) expired on $vu: the mirror's $SUITE is stale, so its newest kernel may not be Debian's newest (apt took it because this host's apt configuration sets Acquire::Check-Valid-Until $(apt-config dump Acquire::Check-Valid-Until | sed -n 's/^Acquire::Check-Valid-Until "\(.*\)";/\1/p'))"
		fi
	done
}

# --- host packages ---------------------------------------------------------

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }

ensure_packages() {
	local missing=() p
	for p in qemu-system-x86 busybox-static cpio xz-utils zstd; do
		installed "$p" || missing+=("$p")
	done
	[ ${#missing[@]} -eq 0 ] && return 0
	for p in "${missing[@]}"; do
		if ! apt-cache policy "$p" 2>/dev/null | grep -q 'Candidate: [0-9]'; then
			apt_update_once
			break
		fi
	done
	log "apt-get install ${missing[*]}"
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

BACKPORTS_FILE=/etc/apt/sources.list.d/sockbypass-kernels-bookworm-backports.sources
ensure_backports() {
	if grep -rqs --include='*.list' --include='*.sources' 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
		return 1 # already a source: nothing added
	fi
	log "adding bookworm-backports to $BACKPORTS_FILE"
	cat >"$BACKPORTS_FILE" <<'EOF'
# Added by sockbypass e2e/kernels/run.sh (the kernel matrix): bookworm-backports
# carries Debian 12's 6.12 kernel (linux-image-6.12.*+deb12-cloud-amd64-unsigned),
# which the matrix fetches with `apt-get download` and boots under qemu. Nothing
# is installed from it (backports are never chosen by default). Safe to remove.
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
	return 0
}

# --- kernel packages -----------------------------------------------------------

kernel_regex() {
	case $1 in
	6.1) echo '^linux-image-6\.1\.0-[0-9]+-cloud-amd64-unsigned$' ;;
	6.12) echo '^linux-image-6\.12\.[0-9]+\+deb12-cloud-amd64-unsigned$' ;;
	6.12-trixie) echo '^linux-image-6\.12\.[0-9]+\+deb13(\.[0-9]+)?-cloud-amd64-unsigned$' ;;
	# sid: the classic image package, or (7.x) the unsigned image of the
	# split packages (kernel_parts adds its modules and base files).
	sid) echo '^linux-(image-[0-9]+\.[0-9]+[^ ]*-cloud-amd64-unsigned|binary-unsigned-[0-9]+\.[0-9]+[^ ]*-cloud-amd64)$' ;;
	esac
}

# newest_kernel_pkg K: the package matching K's regex whose candidate
# version is the highest (dpkg's order), from SUITE's lists.
newest_kernel_pkg() {
	local names best='' bestv='' p v
	mapfile -t names < <(apt-cache "${APTO[@]}" search --names-only "$(kernel_regex "$1")" 2>/dev/null | awk '{print $1}')
	[ ${#names[@]} -gt 0 ] || return 0
	while read -r p v; do
		if [ -z "$best" ] || dpkg --compare-versions "$v" gt "$bestv"; then
			best=$p
			bestv=$v
		fi
	done < <(apt-cache "${APTO[@]}" policy "${names[@]}" 2>/dev/null |
		awk '/^[^ ]/ { p = $1; sub(/:$/, "", p) } /^  Candidate:/ && $2 != "(none)" { print p, $2 }')
	echo "$best"
}

# kernel_parts PKG: the packages that together hold PKG's kernel image,
# modules and modules.builtin. Since 7.x sid splits a kernel into
# linux-binary-unsigned-ABI (vmlinuz.unsigned), linux-modules-ABI and
# linux-base-ABI (System.map, config, modules.builtin), all of one version.
kernel_parts() {
	case $1 in
	linux-binary-unsigned-*) echo "$1 linux-modules-${1#linux-binary-unsigned-} linux-base-${1#linux-binary-unsigned-}" ;;
	*) echo "$1" ;;
	esac
}

deb_path() { echo "$CACHE/debs/${1}_${2//:/%3a}_amd64.deb"; }

# kernel_pkg K: sets KPKG, the package name to use for kernel K.
kernel_pkg() {
	local k=$1 var
	var=KMATRIX_PKG_${k//[.-]/_}
	if [ -n "${!var:-}" ]; then
		KPKG=${!var}
		return
	fi
	KPKG=$(newest_kernel_pkg "$k")
	if [ -z "$KPKG" ]; then
		if [ "$k" = 6.12 ]; then ensure_backports || true; fi
		apt_update_once
		KPKG=$(newest_kernel_pkg "$k")
	fi
	[ -n "$KPKG" ] || die "no package matches $(kernel_regex "$k") in apt's lists ($SUITE)"
}

# kernel_version: sets KPKGVER, KPKG's candidate version, and KPARTS.
kernel_version() {
	KPKGVER=$(apt-cache "${APTO[@]}" policy "$KPKG" | awk '/Candidate:/ {print $2}')
	if [ -z "$KPKGVER" ] || [ "$KPKGVER" = "(none)" ]; then
		apt_update_once
		KPKGVER=$(apt-cache "${APTO[@]}" policy "$KPKG" | awk '/Candidate:/ {print $2}')
	fi
	[ -n "$KPKGVER" ] && [ "$KPKGVER" != "(none)" ] || die "$KPKG has no candidate version ($SUITE)"
	read -r -a KPARTS <<<"$(kernel_parts "$KPKG")"
}

# downloaded: whether every part of KPKG=KPKGVER is in $CACHE/debs.
downloaded() {
	local p
	for p in "${KPARTS[@]}"; do [ -s "$(deb_path "$p" "$KPKGVER")" ] || return 1; done
}

# fetch_kernel K: downloads and unpacks K's kernel package(s); sets SUITE,
# APTO, KDIR, KVER, MODDIR, VMLINUZ, KPKG, KPKGVER, KPARTS.
fetch_kernel() {
	local k=$1 deb p d
	apt_setup "$k"
	kernel_pkg "$k"
	kernel_version
	if [ "$SUITE" != host ] && ! downloaded && [ -z "${APT_UPDATED[$SUITE]:-}" ]; then
		# Not downloaded yet: fresh lists first (the newest kernel, and a
		# file the mirror still has), then choose again.
		apt_update_once
		kernel_pkg "$k"
		kernel_version
	fi
	warn_stale
	mkdir -p "$CACHE/debs"
	for p in "${KPARTS[@]}"; do
		deb=$(deb_path "$p" "$KPKGVER")
		if [ ! -s "$deb" ]; then
			log "apt-get download $p=$KPKGVER ($SUITE)"
			(cd "$CACHE/debs" && apt-get "${APTO[@]}" download -qq -o APT::Sandbox::User=root "$p=$KPKGVER")
			[ -s "$deb" ] || die "apt-get download did not leave $deb"
		fi
	done
	KDIR=$CACHE/unpacked/$(basename "$(deb_path "$KPKG" "$KPKGVER")" .deb)
	if [ ! -e "$KDIR/.unpacked" ]; then
		rm -rf "$KDIR"
		mkdir -p "$KDIR"
		for p in "${KPARTS[@]}"; do dpkg -x "$(deb_path "$p" "$KPKGVER")" "$KDIR"; done
		touch "$KDIR/.unpacked"
	fi
	# Debian 12 ships /lib/modules, Debian 13 and later /usr/lib/modules.
	MODDIR=
	for d in "$KDIR/lib/modules" "$KDIR/usr/lib/modules"; do
		if [ -d "$d" ] && [ ! -L "$d" ]; then
			KVER=$(ls "$d")
			MODDIR=$d/$KVER
			break
		fi
	done
	[ -n "$MODDIR" ] && [ -d "$MODDIR" ] || die "no lib/modules/<release> in ${KPARTS[*]}"
	VMLINUZ=
	for p in "$KDIR/boot/vmlinuz-$KVER" "$MODDIR/vmlinuz" "$MODDIR/vmlinuz.unsigned"; do
		if [ -f "$p" ]; then
			VMLINUZ=$p
			break
		fi
	done
	[ -n "$VMLINUZ" ] || die "no vmlinuz for $KVER in ${KPARTS[*]}"
}

# --- guest binaries and initramfs -------------------------------------------

build_binaries() {
	mkdir -p "$CACHE/bin"
	log "go build (static): sockbypass, kguest"
	(cd "$ROOT" &&
		CGO_ENABLED=0 go build -ldflags '-s -w' -o "$CACHE/bin/sockbypass" ./cmd/sockbypass &&
		CGO_ENABLED=0 go build -ldflags '-s -w' -o "$CACHE/bin/kguest" ./e2e/kernels/guest)
}

MODULES=(sch_ingress cls_bpf veth)
# Socket diagnostics for TCP (tcp_diag over inet_diag): `sockbypass stats`
# lists the live sockets with them to add their stack bytes (the guest has
# no modprobe, so a dump would find no handler and fail with ENOENT).
MODULES+=(tcp_diag)
# Kernel TLS with AES-GCM for the ktls_* probes: tls (TCP_ULP "tls") and
# the crypto templates its TLS_TX asks for, "gcm(aes)" = gcm over ctr(aes)
# and ghash (the guest has no modprobe, so request_module finds nothing:
# what TLS_TX needs must be loaded first). aes itself is built in
# (aes_generic, 7.x: aes); ctr is built in on 6.12, a module on 6.1 and
# 7.x; gcm pulls crypto_null on 6.12. OPTIONAL_MODULES may be absent:
# ghash-generic (with gf128mul) is a module up to 6.12, gone in 7.x, where
# gcm calls the built-in GHASH library (CONFIG_CRYPTO_LIB_GF128HASH).
MODULES+=(tls gcm ctr)
OPTIONAL_MODULES=(ghash_generic)

# module_cat KO: a module, decompressed (.ko, .ko.xz, .ko.zst, .ko.gz).
module_cat() {
	case $1 in
	*.xz) xz -dc "$1" ;;
	*.zst) zstd -dcq "$1" ;;
	*.gz) gzip -dc "$1" ;;
	*) cat "$1" ;;
	esac
}

# modinfo_depends KO: the depends= field of a module.
modinfo_depends() {
	module_cat "$1" | tr '\0' '\n' | sed -n 's/^depends=//p' | tr ',' ' '
}

# add_module NAME [optional]: copies NAME.ko (decompressed) after its
# dependencies; nothing for a module built into the kernel, nor for an
# optional one the kernel does not have.
add_module() {
	local name=$1 alt=${1//_/-} src dep
	grep -qx "$name" "$STAGE/lib/modules/order" 2>/dev/null && return 0
	src=$(find "$MODDIR" \( -name "$name.ko" -o -name "$name.ko.*" -o -name "$alt.ko" -o -name "$alt.ko.*" \) | head -n 1)
	if [ -z "$src" ]; then
		grep -qE "/($name|$alt)\.ko\$" "$MODDIR/modules.builtin" 2>/dev/null && return 0
		[ "${2:-}" = optional ] && return 0
		die "module $name not found for $KVER (neither a file under $MODDIR nor in its modules.builtin)"
	fi
	for dep in $(modinfo_depends "$src"); do add_module "$dep"; done
	module_cat "$src" >"$STAGE/lib/modules/$name.ko"
	echo "$name" >>"$STAGE/lib/modules/order"
}

# build_initramfs K: $CACHE/initramfs/<kver>.cpio.gz with busybox, the two
# static binaries, the modules and /init.
build_initramfs() {
	STAGE=$CACHE/initramfs/$KVER.d
	INITRD=$CACHE/initramfs/$KVER.cpio.gz
	rm -rf "$STAGE"
	mkdir -p "$STAGE"/{bin,dev,proc,sys,run,tmp,root,lib/modules}
	cp /bin/busybox "$STAGE/bin/busybox"
	cp "$CACHE/bin/sockbypass" "$CACHE/bin/kguest" "$STAGE/bin/"
	install -m 0755 "$HERE/init.sh" "$STAGE/init"
	mknod -m 600 "$STAGE/dev/console" c 5 1
	mknod -m 666 "$STAGE/dev/null" c 1 3
	: >"$STAGE/lib/modules/order"
	local m
	for m in "${MODULES[@]}"; do add_module "$m"; done
	for m in "${OPTIONAL_MODULES[@]}"; do add_module "$m" optional; done
	(cd "$STAGE" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --quiet -R 0:0) | gzip -1 >"$INITRD"
}

# --- boot and read back -------------------------------------------------------

# boot K: runs the VM; sets RUNDIR, WALL, QEMU_RC.
boot() {
	local k=$1 t0 t1
	RUNDIR=$CACHE/runs/$k
	rm -rf "$RUNDIR"
	mkdir -p "$RUNDIR"
	log "booting $KPKG $KPKGVER under qemu (timeout ${TIMEOUT}s)"
	t0=$(date +%s.%N)
	set +e
	timeout -k 10 "$TIMEOUT" qemu-system-x86_64 -machine q35 -cpu max -smp 2 -m 2048 \
		-kernel "$VMLINUZ" -initrd "$INITRD" \
		-append "console=ttyS0 panic=-1 quiet" \
		-nographic -no-reboot -nic none </dev/null >"$RUNDIR/console.log" 2>&1
	QEMU_RC=$?
	set -e
	t1=$(date +%s.%N)
	WALL=$(awk "BEGIN { printf \"%.1f\", $t1 - $t0 }")
}

# STEPS in the order of init.sh; enable_no_tc only runs when enable fails.
STEPS=(modules probes enable enable_no_tc status transfer doctor uninstall pins)

# parse LOG: prints results ("key value", compared with expected.txt) and
# timings ("time.key value", not compared).
parse() {
	# The console log has CRs and qemu's terminal escapes.
	tr -d '\r' <"$1" | sed 's/\x1b\[[0-9;?]*[A-Za-z]//g; s/\x1bc//g' | awk -v steps="${STEPS[*]}" '
	function val(s, key,   i) { i = index(s, key "="); if (!i) return ""; s = substr(s, i + length(key) + 1); sub(/ .*/, "", s); return s }
	function rest(s, key,   i) { i = index(s, key "="); return i ? substr(s, i + length(key) + 1) : "" }
	/^KMATRIX begin step=/ { cur = val($0, "step"); seen[cur] = 1; next }
	/^KMATRIX end step=/ {
		s = val($0, "step"); rc[s] = val($0, "rc"); secs[s] = val($0, "secs"); cur = ""; next
	}
	/^KMATRIX doctor-json-begin/ { injson = 1; next }
	/^KMATRIX doctor-json-end/ { injson = 0; next }
	/^KMATRIX probe=/ { p = val($0, "probe"); probe[p] = rest($0, "value"); porder[++np] = p }
	/^KMATRIX transfer / {
		if ($0 ~ / sha256=/) { tr_sha = val($0, "sha256"); tr_bytes = val($0, "received"); tr_secs = val($0, "secs") }
		if ($0 ~ / redirected_bytes=/) { tr_redir = val($0, "redirected_bytes"); tr_stack = val($0, "stack_egress_bytes"); tr_pass = val($0, "passed_bytes"); tr_ins = val($0, "sockets_inserted"); tr_ab = val($0, "pairs_abandoned") }
		if ($0 ~ / stats=unavailable/) tr_redir = "n/a"
	}
	/^KMATRIX doctor mode=/ { dm[val($0, "mode")] = val($0, "verdicts"); dmorder[++ndm] = val($0, "mode") }
	/^KMATRIX doctor broken=/ { dbroken = val($0, "broken") }
	/^KMATRIX doctor verdicts=unavailable/ { dunavail = 1 }
	/^KMATRIX pins_left=/ { pins = val($0, "pins_left") }
	/^KMATRIX kernel_warnings=/ { kw = val($0, "kernel_warnings") }
	/^KMATRIX done/ { done = 1 }
	/^KMATRIX/ { next }
	cur != "" && !injson {
		line = $0; sub(/[ \t]+$/, "", line)
		if (line == "") next
		if (!(cur in firsterr) && line ~ /^(sockbypass [a-z_-]+|kguest|insmod .*failed|Error|error)[: ]/) firsterr[cur] = line
		lastline[cur] = line
	}
	END {
		n = split(steps, st, " ")
		for (i = 1; i <= n; i++) {
			s = st[i]
			if (s == "enable_no_tc" && rc["enable"] == "0") continue
			if (!(s in seen)) r = "missing (never started: the VM stopped or timed out before)"
			else if (!(s in rc)) r = "missing (did not finish: the VM stopped or timed out)"
			else if (rc[s] == "0") r = "ok"
			else {
				e = (s in firsterr) ? firsterr[s] : lastline[s]
				r = "fail rc=" rc[s] ": " e
			}
			print "step." s " " r
			if (s in secs) print "time.step." s " " secs[s]
		}
		for (i = 1; i <= np; i++) if (porder[i] != "kernel") print "probe." porder[i] " " probe[porder[i]]
		if (tr_sha != "") print "transfer.sha256 " tr_sha " (" tr_bytes " bytes back)"
		if (tr_redir != "") print "transfer.redirected_bytes " tr_redir
		if (tr_redir != "" && tr_redir != "n/a") print "transfer.counters stack_egress_bytes=" tr_stack " passed_bytes=" tr_pass " sockets_inserted=" tr_ins " pairs_abandoned=" tr_ab
		if (tr_secs != "") print "time.transfer.echo " tr_secs
		for (i = 1; i <= ndm; i++) print "doctor." dmorder[i] " " dm[dmorder[i]]
		if (dunavail) print "doctor.verdicts unavailable (no JSON document)"
		if (dbroken != "") print "doctor.broken " dbroken
		if (pins != "") print "pins_left " pins
		if (kw != "") print "kernel_warnings " kw
		print "vm.completed " (done ? "yes" : "no")
	}'
}

# --- summary and comparison ----------------------------------------------------

FAILED=0
UPDATED_LINES=()

summarize() {
	local k=$1 res=$2
	echo
	echo "=== kernel $k: $KPKG $KPKGVER ($KVER)"
	[ ${#KPARTS[@]} -le 1 ] || echo "    packages: ${KPARTS[*]} ($KPKGVER)"
	echo "    wall ${WALL}s (qemu exit $QEMU_RC$([ "$QEMU_RC" = 124 ] && echo ', TIMED OUT')), log $RUNDIR/console.log"
	printf '    %-40s %-8s %s\n' STEP SECS RESULT
	local key v
	while read -r key v; do
		case $key in
		step.*)
			printf '    %-40s %-8s %s\n' "${key#step.}" "$(sed -n "s/^time\.$key //p" "$res")" "$v"
			;;
		esac
	done <"$res"
	echo "    -- transfer, doctor, pins"
	grep -E '^(transfer|doctor|pins_left|kernel_warnings|vm)\.?' "$res" | sed 's/^/    /'
	echo "    -- probes"
	grep -E '^probe\.' "$res" | sed 's/^probe\./    /'
}

# compare K RESULTS: every "K key value" line of expected.txt must match.
compare() {
	local k=$1 res=$2 key want got n=0
	if [ ! -f "$EXPECTED" ]; then
		echo "    (no $EXPECTED: nothing compared)"
		return
	fi
	while IFS= read -r line; do
		case $line in '' | '#'*) continue ;; esac
		[ "${line%% *}" = "$k" ] || continue
		line=${line#* }
		key=${line%% *}
		want=${line#* }
		got=$(awk -v k="$key" '$1 == k { sub(/^[^ ]+ /, ""); print; exit }' "$res")
		n=$((n + 1))
		if [ "$got" != "$want" ]; then
			FAILED=1
			if [[ $key == step.* ]] && [ "$want" = ok ]; then
				echo "    REGRESSION $key: expected ok, got: ${got:-(nothing)}"
			else
				echo "    CHANGED $key"
				echo "        expected: $want"
				echo "        measured: ${got:-(nothing)}"
			fi
		fi
	done <"$EXPECTED"
	echo "    compared $n expected results for $k with $EXPECTED"
}

# update_expected K RESULTS: replaces K's lines of expected.txt.
update_expected() {
	local k=$1 res=$2 tmp
	tmp=$(mktemp)
	# The comment block first, then every kernel's lines, kernels in order.
	if [ -f "$EXPECTED" ]; then
		awk '/^#/ || /^$/' "$EXPECTED" >"$tmp"
	fi
	{
		[ -f "$EXPECTED" ] && awk -v k="$k" '!/^#/ && !/^$/ && $1 != k' "$EXPECTED"
		grep -v '^time\.' "$res" | sed "s/^/$k /"
	} | sort -s -V -k1,1 >>"$tmp"
	cat "$tmp" >"$EXPECTED"
	rm -f "$tmp"
	echo "    wrote $k's results into $EXPECTED"
}

# --- main -------------------------------------------------------------------------

# Sourced (e2e/node/guest/run.sh reuses fetch_kernel, add_module and
# ensure_packages): the functions only, no run.
if [ "${BASH_SOURCE[0]}" != "$0" ]; then
	return 0
fi

ensure_packages
build_binaries
declare -A WALLS
for k in "${KERNELS[@]}"; do
	fetch_kernel "$k"
	build_initramfs
	boot "$k"
	# A kernel that panics before our init starts (seen once with sid's
	# 7.2 under TCG: an int3 in sched_clock_cpu while static keys were
	# patched) never ran anything of ours: boot it once more, and say so.
	# A panic after init started is a result and is never retried.
	if ! grep -q 'KMATRIX boot' "$RUNDIR/console.log" && grep -q 'Kernel panic' "$RUNDIR/console.log"; then
		cp "$RUNDIR/console.log" "$CACHE/runs/$k.boot-panic.log"
		log "RETRY: kernel $k panicked before init started (log kept in $CACHE/runs/$k.boot-panic.log); booting once more"
		boot "$k"
	fi
	parse "$RUNDIR/console.log" >"$RUNDIR/results.txt"
	# The kernel release stands in error texts: a newer Debian package of
	# the same kernel must not count as a change.
	rel=$(tr -d '\r' <"$RUNDIR/console.log" | sed -n 's/.*KMATRIX boot kernel=\([^ ]*\).*/\1/p' | head -n 1)
	if [ -n "$rel" ]; then
		rel_re=$(printf '%s' "$rel" | sed 's/[.[\*^$+?(){}|/]/\\&/g')
		sed -i "s/$rel_re/<release>/g" "$RUNDIR/results.txt"
	fi
	echo "time.wall $WALL" >>"$RUNDIR/results.txt"
	WALLS[$k]=$WALL
	summarize "$k" "$RUNDIR/results.txt"
	if [ "${KMATRIX_UPDATE:-}" = 1 ]; then
		update_expected "$k" "$RUNDIR/results.txt"
	else
		compare "$k" "$RUNDIR/results.txt"
	fi
done
echo
for k in "${KERNELS[@]}"; do echo "kernel $k: ${WALLS[$k]}s wall"; done
if [ $FAILED = 1 ]; then
	echo "kernel matrix: results differ from $EXPECTED (see above); if the change is intended, rerun with KMATRIX_UPDATE=1 and commit expected.txt"
	exit 1
fi
echo "kernel matrix: results as expected"
