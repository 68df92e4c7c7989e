#!/usr/bin/env bash
# Manual check of cluster/local.yaml: `ray up` and `ray submit` against this machine (127.0.0.1)
# over SSH, as a laptop would drive an on-prem head. Not part of the test suite: it runs the
# YAML's setup commands here (sudo apt-get, a venv in ~/venv with this repository installed,
# lines appended to ~/.bashrc), `ray stop`s every Ray process on the machine and starts sshd; it
# takes about 3 minutes on a fresh machine. Cleans up after itself (but ~/venv and ~/src).
#   bash scripts/check_ray_up_local.sh
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
. "$ROOT/scripts/setup.sh"
need_debian_packages openssh-server rsync sudo
WORK="$(mktemp -d)"
cp ~/.bashrc "$WORK/bashrc" 2>/dev/null || touch "$WORK/bashrc"
mkdir -p ~/.ssh /run/sshd && touch ~/.ssh/authorized_keys && cp ~/.ssh/authorized_keys "$WORK/authorized_keys"
cleanup() {
    ray down -y "$WORK/local.yaml" >/dev/null 2>&1 || true
    { [ -x ~/venv/bin/ray ] && ~/venv/bin/ray stop --force; } >/dev/null 2>&1 || true
    cp "$WORK/bashrc" ~/.bashrc && cp "$WORK/authorized_keys" ~/.ssh/authorized_keys
    [ -f "$WORK/sshd.pid" ] && kill "$(cat "$WORK/sshd.pid")" 2>/dev/null || true
}
trap cleanup EXIT

ssh-keygen -q -t ed25519 -N "" -f "$WORK/key"
cat "$WORK/key.pub" >> ~/.ssh/authorized_keys
sudo /usr/sbin/sshd -o PidFile="$WORK/sshd.pid"
[ -f ~/.ray/auth_token ] || ray get-auth-token --generate >/dev/null
python - "$WORK" <<'EOF'
import sys, yaml
work = sys.argv[1]
config = yaml.safe_load(open("cluster/local.yaml"))
config["provider"].update(head_ip="127.0.0.1", worker_ips=[])
config["auth"] = {"ssh_user": __import__("getpass").getuser(), "ssh_private_key": f"{work}/key"}
yaml.safe_dump(config, open(f"{work}/local.yaml", "w"), sort_keys=False)
EOF
cd "$ROOT"
time ray up -y "$WORK/local.yaml"
time ray submit "$WORK/local.yaml" train.py -- --config tests/configs/digits.yaml \
    --storage-path "$WORK/runs" --name submitted --output-json "$WORK/summary.json"
python -c "import json, sys; m = json.load(open(sys.argv[1]))['metrics']; print('ray up + ray submit: knn_top1', m['knn_top1_trained'])" "$WORK/summary.json"
