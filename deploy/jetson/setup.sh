#!/usr/bin/env bash
# Install the gapcast edge agent on an NVIDIA Jetson (JetPack 6.x on Orin, JetPack 7.x on Thor) as a service.
#
#   sudo deploy/jetson/setup.sh --bundle /path/to/bundle --key /path/to/signing.pub [--config my-edge.toml]
#
# What it does, in order (each step is idempotent: running it again upgrades in place):
#   1. apt packages from JetPack: TensorRT's Python bindings (python3-libnvinfer), the venv module, Mosquitto
#      clients for debugging (a broker on this machine: see deploy/mosquitto/mosquitto.conf's install notes);
#   2. a system user `gapcast` (added to the groups video and render where they exist, for the GPU device nodes)
#      and the folders /opt/gapcast, /etc/gapcast, /var/lib/gapcast, /var/cache/gapcast;
#   3. a venv at /opt/gapcast/venv created with --system-site-packages, so it sees JetPack's TensorRT, then
#      gapcast[edge] from THIS checkout, or from a wheel built from it (--wheel FILE; `pip wheel --no-deps . -w
#      dist/`). gapcast itself is never fetched from a package index (no release is published there); its
#      dependencies (numpy, onnxruntime, paho-mqtt, cryptography) come from pip's configured index;
#   4. the bundle into /var/lib/gapcast/bundles/current, the trusted key to /etc/gapcast/release.pub and
#      /etc/gapcast/edge.toml (deploy/edge.example.toml, whose paths are these, unless --config);
#   5. `gapcast edge check` (config + signature + hashes), then `gapcast edge build-engine --trusted-key
#      /etc/gapcast/release.pub`: the TensorRT engine is compiled on this device (engines are specific to the GPU
#      and the TensorRT version), from a bundle whose signature was verified, and cached;
#   6. the systemd unit deploy/systemd/gapcast-edge.service plus a drop-in generated for this board
#      (/etc/systemd/system/gapcast-edge.service.d/10-board.conf, by deploy/jetson/unit-dropin.sh):
#      SupplementaryGroups= the GPU groups that exist here, MemoryMax= 60 % of MemTotal (--memory-percent,
#      --memory-max VALUE|none); enabled and started. Your own overrides go in another drop-in
#      (`systemctl edit gapcast-edge`), which setup.sh never touches.
#
# Python: the TensorRT bindings JetPack ships are built for the system Python (3.10 on JetPack 6 / Ubuntu 22.04,
# 3.12 on JetPack 7 / Ubuntu 24.04). The gateway side of gapcast (gapcast[edge]) runs on Python >= 3.10, so the
# default, the system python3, sees JetPack's TensorRT on both. --python picks another interpreter (>= 3.10); the
# agent then runs TensorRT only if a matching TensorRT wheel is given with --tensorrt-wheel FILE, else onnxruntime.
# JetPack 5 (Xavier; Ubuntu 20.04, Python 3.8) is not supported: README, "Supported JetPack releases".
set -euo pipefail

PREFIX=/opt/gapcast
CONF_DIR=/etc/gapcast
STATE_DIR=/var/lib/gapcast
CACHE_DIR=/var/cache/gapcast
SERVICE_USER=gapcast
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"

PYTHON=python3
WHEEL=""
BUNDLE=""
KEY=""
CONFIG=""
TRT_WHEEL=""
START=1
PRECISION=fp16
MEMORY_ARGS=(--memory-percent 60)

usage() {
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
    cat <<'EOF'
Options:
  --bundle PATH          signed model bundle (directory or .tar) from `gapcast export`
  --key PATH             Ed25519 public key (PEM) the bundle signature must verify under
  --config PATH          your edge.toml (default: deploy/edge.example.toml, edit it afterwards)
  --wheel FILE           a gapcast wheel built from this checkout (default: install this checkout itself)
  --python EXE           Python for the venv (default python3; must be >= 3.10)
  --tensorrt-wheel FILE  TensorRT Python wheel for --python when JetPack's bindings do not match it
  --precision P          TensorRT engine precision: fp16 (default), int8 (the bundle's QDQ variant) or fp32
  --memory-percent N     the unit's MemoryMax as N % of this board's MemTotal (default 60)
  --memory-max VALUE     the unit's MemoryMax as given (2G, 1536M) or "none" (no cap)
  --no-start             install everything but do not enable/start the service
EOF
}

while [ $# -gt 0 ]; do
    case "$1" in
        --bundle) BUNDLE="$2"; shift 2 ;;
        --key) KEY="$2"; shift 2 ;;
        --config) CONFIG="$2"; shift 2 ;;
        --wheel) WHEEL="$2"; shift 2 ;;
        --source) echo "setup.sh: --source was removed: run from a checkout, or pass --wheel FILE built from one" >&2
                  exit 2 ;;
        --memory-percent) MEMORY_ARGS=(--memory-percent "$2"); shift 2 ;;
        --memory-max) MEMORY_ARGS=(--memory-max "$2"); shift 2 ;;
        --python) PYTHON="$2"; shift 2 ;;
        --tensorrt-wheel) TRT_WHEEL="$2"; shift 2 ;;
        --precision) PRECISION="$2"; shift 2 ;;
        --no-start) START=0; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "setup.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done

say() { printf '\n==> %s\n' "$*"; }
die() { printf 'setup.sh: error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run as root (sudo): it installs packages, a user and a systemd service"
if [ -r /etc/nv_tegra_release ]; then
    say "Jetson: $(head -n1 /etc/nv_tegra_release)"
else
    echo "warning: /etc/nv_tegra_release not found: this does not look like a Jetson; TensorRT may be absent" >&2
fi
[ -z "$BUNDLE" ] || [ -e "$BUNDLE" ] || die "--bundle $BUNDLE does not exist"
[ -z "$KEY" ] || [ -f "$KEY" ] || die "--key $KEY does not exist"
if [ -n "$BUNDLE" ] && [ -z "$KEY" ]; then die "--bundle needs --key (bundles are always verified)"; fi
if [ -n "$WHEEL" ]; then
    if [ ! -f "$WHEEL" ] || [ "${WHEEL%.whl}" = "$WHEEL" ]; then die "--wheel $WHEEL is not a .whl file"; fi
    WHEEL="$(cd "$(dirname "$WHEEL")" && pwd)/$(basename "$WHEEL")"
elif [ ! -f "$REPO/pyproject.toml" ]; then
    die "$REPO is not a gapcast checkout (no pyproject.toml): run setup.sh from one, or pass --wheel FILE"
fi

# ---------------------------------------------------------------------------------------------- 1. apt packages
say "apt packages (JetPack's TensorRT Python bindings, venv, Mosquitto clients)"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
PKGS=(python3-venv python3-pip mosquitto-clients ca-certificates)
# python3-libnvinfer: TensorRT's Python bindings for the system Python (JetPack's repository). Optional so that a
# non-Jetson test machine still completes; the agent then uses onnxruntime.
if apt-cache show python3-libnvinfer >/dev/null 2>&1; then
    PKGS+=(python3-libnvinfer libnvinfer-bin)
else
    echo "warning: python3-libnvinfer is not in the apt sources (JetPack repository missing?): no TensorRT" >&2
fi
if [ "$PYTHON" != python3 ]; then
    PKGS+=("$PYTHON" "$PYTHON-venv")
fi
apt-get install -y -qq "${PKGS[@]}" >/dev/null

"$PYTHON" - <<'EOF' || die "$PYTHON is older than 3.10: the gateway needs Python >= 3.10 (JetPack 6 or 7; see the header)"
import sys
sys.exit(0 if sys.version_info >= (3, 10) else 1)
EOF

# ---------------------------------------------------------------------------------------------- 2. user, folders
say "user $SERVICE_USER and folders"
if ! id "$SERVICE_USER" >/dev/null 2>&1; then
    useradd --system --home-dir "$STATE_DIR" --no-create-home --shell /usr/sbin/nologin "$SERVICE_USER"
fi
for g in video render; do  # only groups this board has (the unit's drop-in names the same ones, step 6)
    if getent group "$g" >/dev/null; then usermod -a -G "$g" "$SERVICE_USER"; else echo "note: no group $g here"; fi
done
install -d -m 0755 "$PREFIX"
install -d -m 0750 -o root -g "$SERVICE_USER" "$CONF_DIR"
install -d -m 0750 -o "$SERVICE_USER" -g "$SERVICE_USER" "$STATE_DIR" "$CACHE_DIR" "$CACHE_DIR/engines"

# ---------------------------------------------------------------------------------------------- 3. venv + gapcast
say "venv $PREFIX/venv (--system-site-packages: sees JetPack's TensorRT)"
[ -x "$PREFIX/venv/bin/python" ] || "$PYTHON" -m venv --system-site-packages "$PREFIX/venv"
"$PREFIX/venv/bin/python" -m pip install --quiet --upgrade pip
# gapcast from the checkout or the wheel only; never resolved against an index (a same-named project there is not
# this one). --no-deps first pins the local artifact, the second pass brings the edge extra's dependencies.
if [ -n "$WHEEL" ]; then SOURCE="$WHEEL"; else SOURCE="$REPO"; fi
"$PREFIX/venv/bin/python" -m pip install --quiet --upgrade --force-reinstall --no-deps "$SOURCE"
"$PREFIX/venv/bin/python" -m pip install --quiet "${SOURCE}[edge]"
[ -z "$TRT_WHEEL" ] || "$PREFIX/venv/bin/python" -m pip install --quiet "$TRT_WHEEL"
if "$PREFIX/venv/bin/python" -c 'import tensorrt; print("TensorRT", tensorrt.__version__)'; then
    BACKEND_NOTE="TensorRT"
else
    BACKEND_NOTE="onnxruntime (TensorRT's Python bindings are not importable from $PYTHON)"
    echo "warning: the agent will use $BACKEND_NOTE" >&2
fi

# ---------------------------------------------------------------------------------------------- 4. config, bundle
# The paths of deploy/edge.example.toml: the bundle lives in the state folder (the fleet updater replaces it there),
# the trusted release key and the config in /etc/gapcast (read-only for the service).
say "bundle in $STATE_DIR/bundles/current, trusted key and edge.toml in $CONF_DIR"
if [ -n "$BUNDLE" ]; then
    install -d -m 0750 -o "$SERVICE_USER" -g "$SERVICE_USER" "$STATE_DIR/bundles"
    rm -rf "$STATE_DIR/bundles/current.new"
    cp -r "$BUNDLE" "$STATE_DIR/bundles/current.new"
    rm -rf "$STATE_DIR/bundles/current" && mv "$STATE_DIR/bundles/current.new" "$STATE_DIR/bundles/current"
    chown -R "$SERVICE_USER:$SERVICE_USER" "$STATE_DIR/bundles"
    install -m 0644 "$KEY" "$CONF_DIR/release.pub"
fi
if [ -n "$CONFIG" ]; then
    install -m 0640 -o root -g "$SERVICE_USER" "$CONFIG" "$CONF_DIR/edge.toml"
elif [ ! -f "$CONF_DIR/edge.toml" ]; then
    install -m 0640 -o root -g "$SERVICE_USER" "$REPO/deploy/edge.example.toml" "$CONF_DIR/edge.toml"
    echo "wrote $CONF_DIR/edge.toml from the example: set gateway.id, mqtt.host and stations.names before production"
fi
chown -R root:"$SERVICE_USER" "$CONF_DIR" && chmod -R g+rX,o-rwx "$CONF_DIR"

# ---------------------------------------------------------------------------------------------- 5. check, engine
GAPCAST="$PREFIX/venv/bin/gapcast"
cd "$STATE_DIR"   # the service user cannot read root's working directory
BUNDLE_PATH="$(sed -n 's/^bundle *= *"\([^"]*\)".*/\1/p' "$CONF_DIR/edge.toml" | head -n1)"
BUNDLE_PATH="${BUNDLE_PATH:-$STATE_DIR/bundles/current}"
if [ ! -e "$BUNDLE_PATH" ]; then
    echo "warning: no bundle at $BUNDLE_PATH yet: run again with --bundle and --key; the service is not started" >&2
    START=0
else
    say "gapcast edge check"
    runuser -u "$SERVICE_USER" -- "$GAPCAST" edge check --config "$CONF_DIR/edge.toml"
    if [ "$BACKEND_NOTE" = TensorRT ]; then
        say "TensorRT engine build on this device (minutes on first run; cached in $CACHE_DIR/engines)"
        # The agent finds the engine in the same cache: the unit sets GAPCAST_ENGINE_CACHE to this folder.
        # --trusted-key: the engine is built only from a bundle whose signature verifies (the key of step 4).
        [ -f "$CONF_DIR/release.pub" ] || die "no trusted key at $CONF_DIR/release.pub: run again with --key"
        runuser -u "$SERVICE_USER" -- env GAPCAST_ENGINE_CACHE="$CACHE_DIR/engines" \
            "$GAPCAST" edge build-engine "$BUNDLE_PATH" --precision "$PRECISION" --trusted-key "$CONF_DIR/release.pub"
    fi
fi

# ---------------------------------------------------------------------------------------------- 6. service
say "systemd unit gapcast-edge.service"
install -m 0644 "$REPO/deploy/systemd/gapcast-edge.service" /etc/systemd/system/gapcast-edge.service
# This board's groups and memory cap as a drop-in (the unit names neither: a missing group fails with 216/GROUP).
install -d -m 0755 /etc/systemd/system/gapcast-edge.service.d
bash "$HERE/unit-dropin.sh" "${MEMORY_ARGS[@]}" > /etc/systemd/system/gapcast-edge.service.d/10-board.conf.new
mv /etc/systemd/system/gapcast-edge.service.d/10-board.conf.new /etc/systemd/system/gapcast-edge.service.d/10-board.conf
sed -n 's/^\(SupplementaryGroups\|MemoryMax\)=/  &/p' /etc/systemd/system/gapcast-edge.service.d/10-board.conf
systemctl daemon-reload
if [ "$START" -eq 1 ]; then
    systemctl enable --now gapcast-edge.service
    systemctl --no-pager --lines=5 status gapcast-edge.service || true
fi
say "done: backend $BACKEND_NOTE. Logs: journalctl -u gapcast-edge -f"
