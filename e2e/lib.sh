# Sourced by the e2e scripts that take arguments, first thing after their
# header comment and `set -euo pipefail`:
#
#   . "$(dirname "$0")/lib.sh" "$@"
#
# With no argument, -h or --help, it prints the calling script's header
# comment (its usage) and exits 2. Otherwise it moves to the repository
# root and puts Go on PATH.
if [ $# -lt 1 ] || [ "$1" = "-h" ] || [ "$1" = "--help" ]; then
	sed -n '2,/^[^#]/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
	exit 2
fi
cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/local/go/bin"
