# Sourced by scripts/demo, scripts/test and scripts/bench: make $REPO/.venv and install into it.
# Usage: ensure_venv [EXTRAS]   (EXTRAS like "test"; empty for the runtime only)

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$REPO/.venv"

ensure_venv() {
    local extras="${1:-}"
    local py="${PYTHON:-}"
    if [ -z "$py" ]; then
        for candidate in python3.11 python3.12 python3.13 python3; do
            if command -v "$candidate" >/dev/null 2>&1; then py="$candidate"; break; fi
        done
    fi
    if [ -z "$py" ]; then
        echo "error: no python3 found; install Python 3.11 or newer (apt-get install python3 python3-venv)" >&2
        return 1
    fi
    if ! "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
        echo "error: $py is $("$py" -V 2>&1); cached needs Python 3.11 or newer" >&2
        return 1
    fi
    if [ ! -x "$VENV/bin/python" ]; then
        if ! "$py" -m venv "$VENV" 2>/dev/null; then
            rm -rf "$VENV"
            # Debian splits ensurepip into python3-venv; install it when we are allowed to.
            if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
                echo "installing python3-venv (Debian ships venv separately)" >&2
                apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
                "$py" -m venv "$VENV"
            else
                echo "error: '$py -m venv' failed; on Debian run: sudo apt-get install python3-venv" >&2
                return 1
            fi
        fi
    fi
    local spec="$REPO"
    [ -n "$extras" ] && spec="$REPO[$extras]"
    # Reinstall only when the project's metadata changed since the last install.
    local stamp="$VENV/.installed-${extras:-runtime}"
    if [ ! -f "$stamp" ] || [ "$REPO/pyproject.toml" -nt "$stamp" ]; then
        echo "installing cached${extras:+ with [$extras]} into $VENV ..." >&2
        local log="$VENV/pip-install.log"
        if ! { "$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip \
               && "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e "$spec"; } >"$log" 2>&1; then
            echo "error: pip install failed; its output:" >&2
            grep -v "is ignored" "$log" >&2
            return 1
        fi
        touch "$stamp"
    fi
}
