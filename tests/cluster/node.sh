# shellcheck shell=bash
# shellcheck disable=SC2154 # dir, here, pki and kubeconfig belong to up.sh (and dir to down.sh)
# A real node for the throwaway cluster: containerd and runc (Debian's packages), the pinned
# kubelet and kube-proxy, pod networking on a bridge (the CNI bridge and host-local plugins),
# a plain-HTTP registry the node pulls from, and the kube-scheduler. Sourced by up.sh (when
# asked for --node) and by down.sh; not meant to be run on its own.
#
# Everything of the node lives in DIR/node and in a network namespace of its own, so that
# several clusters can run on one machine (e.g. two test runs at once) without sharing
# iptables rules, bridges or ports:
#
#   host network namespace                  node network namespace (DIR/node/netns)
#   etcd, kube-apiserver, controller-        containerd, kubelet, kube-proxy (iptables);
#   manager, scheduler, the registry         bridge cni0 with the pods (POD_CIDR)
#   fixitynodeN  HOST_IP/30  <-- veth -->    eth0  NODE_IP/30, default route via HOST_IP
#
# The API server and the registry listen on HOST_IP, which the host, the kubelet and the pods
# all reach. The host routes the Service range and the pod range to NODE_IP, so the API
# server reaches a webhook's Service the way it does on a real cluster: it dials the
# ClusterIP and kube-proxy's rules in the node's namespace send it to a pod. Each cluster
# takes a free /22 out of 10.200.0.0/14 for its Services (first /24), pods (second) and link
# (third), chosen under a lock so that parallel clusters never pick the same one.
#
# The processes share the host's mount namespace (nsenter --net only), so the kubelet's
# volume mounts and containerd's root filesystems are ordinary mounts under DIR/node, which
# down.sh removes. Pod cgroups go under /<cgroup root> (the kubelet's cgroupRoot, named after
# DIR) in each cgroup v1 hierarchy: the CI machines have cgroup v1, which kubelet 1.36 runs
# on only with failCgroupV1: false and the cgroupfs driver.
#
# containerd 1.6 has no RuntimeConfig CRI call, so the kubelet falls back to its own
# cgroupDriver setting (it logs "RuntimeConfig from runtime service failed"). A later kubelet
# drops that fallback and will need containerd 2.

node_name=fixity-node

# innet CMD...: runs CMD in the node's network namespace (and nothing else: same mounts).
innet() { nsenter --net="$dir/node/netns" -- "$@"; }

# ---- the network (before the API server starts: it listens on HOST_IP) ------------------
node_network() {
  local nd=$dir/node
  mkdir -p "$nd"
  for tool in nsenter unshare ip iptables containerd runc /usr/lib/cni/bridge; do
    command -v "$tool" >/dev/null || { log "error: the node needs '$tool' (.ci/run installs it)"; return 1; }
  done
  ((EUID == 0)) || { log "error: the node needs root (network namespace, mounts, cgroups)"; return 1; }

  local lock_dir=/run/lock
  [[ -d $lock_dir ]] || lock_dir=/tmp
  local lock_fd
  exec {lock_fd}>"$lock_dir/fixity-test-node-network.lock"
  flock "$lock_fd"
  local block
  block=$(python3 - <<'PY'
import ipaddress, json, random, subprocess

def ip(*args):
    out = subprocess.run(["ip", "-j", *args], capture_output=True, text=True, check=True).stdout
    return json.loads(out or "[]")

used = []
for route in ip("-4", "route", "show", "table", "all"):
    dst = route.get("dst", "default")
    if dst != "default":
        used.append(ipaddress.ip_network(dst, strict=False))
for link in ip("-4", "addr", "show"):
    for a in link.get("addr_info", []):
        used.append(ipaddress.ip_network(f"{a['local']}/{a['prefixlen']}", strict=False))
names = {link["ifname"] for link in ip("link", "show")}
blocks = list(range(256))
random.shuffle(blocks)
for i in blocks:
    net = ipaddress.ip_network(f"10.{200 + i // 64}.{i % 64 * 4}.0/22")
    if f"fixitynode{i}" not in names and not any(net.overlaps(u) for u in used):
        print(i)
        break
PY
  )
  if [[ -z $block ]]; then
    flock -u "$lock_fd"
    log "error: no free /22 in 10.200.0.0/14 for the node's network"
    return 1
  fi
  local a=10.$((200 + block / 64)) b=$((block % 64 * 4))
  node_veth=fixitynode$block
  service_cidr=$a.$b.0/24
  kubernetes_ip=$a.$b.1
  pod_cidr=$a.$((b + 1)).0/24
  host_ip=$a.$((b + 2)).1
  node_ip=$a.$((b + 2)).2
  # Written first, so that down.sh removes whatever of this gets made.
  printf '%s=%q\n' node_veth "$node_veth" node_ip "$node_ip" host_ip "$host_ip" \
    pod_cidr "$pod_cidr" service_cidr "$service_cidr" >"$nd/network.env"

  touch "$nd/netns"
  unshare --net="$nd/netns" true
  innet ip link set lo up
  # $$ is up.sh, in the host's namespace: the veth's other end goes there.
  innet ip link add eth0 type veth peer name "$node_veth" netns $$
  ip addr add "$host_ip/30" dev "$node_veth"
  ip link set "$node_veth" up
  innet ip addr add "$node_ip/30" dev eth0
  innet ip link set eth0 up
  innet ip route add default via "$host_ip"
  ip route add "$service_cidr" via "$node_ip" dev "$node_veth"
  ip route add "$pod_cidr" via "$node_ip" dev "$node_veth"
  flock -u "$lock_fd"
  exec {lock_fd}>&-
  # Both per network namespace: forwarding between eth0 and the bridge, and iptables on
  # bridged traffic (kube-proxy's rules for pod-to-Service traffic on the same bridge).
  innet sh -c 'echo 1 >/proc/sys/net/ipv4/ip_forward; echo 1 >/proc/sys/net/bridge/bridge-nf-call-iptables'
}

# ---- certificates and kubeconfigs of the node's components (after up.sh's CA) -----------
node_pki() {
  cat >>"$pki/openssl.cnf" <<EOF
[kubelet_serving]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = DNS:$node_name,IP:$node_ip
authorityKeyIdentifier = keyid
EOF
  issue kubelet-serving "/CN=$node_name" kubelet_serving
  # The Node authorizer and NodeRestriction know a kubelet by this name and group.
  issue kubelet "/O=system:nodes/CN=system:node:$node_name" client
  # Bootstrap RBAC binds these users to the roles kube-proxy and the scheduler need.
  issue kube-proxy "/CN=system:kube-proxy" client
  issue kube-scheduler "/CN=system:kube-scheduler" client
  # The API server's identity towards the kubelet (exec, logs, port-forward).
  issue apiserver-kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client" client
  write_kubeconfig "$dir/node/kubelet.kubeconfig" kubelet
  write_kubeconfig "$dir/node/kube-proxy.kubeconfig" kube-proxy
  write_kubeconfig "$dir/kube-scheduler.kubeconfig" kube-scheduler
}

# The API server's flags for a cluster with a node.
node_apiserver_flags() {
  printf '%s\n' \
    --authorization-mode=Node,RBAC \
    --enable-admission-plugins=NodeRestriction \
    --kubelet-client-certificate="$pki/apiserver-kubelet-client.crt" \
    --kubelet-client-key="$pki/apiserver-kubelet-client.key" \
    --kubelet-certificate-authority="$pki/ca.crt" \
    --kubelet-preferred-address-types=InternalIP
}

# The controllers a Deployment needs (and the rest of what the tests touch): ReplicaSets and
# their pods, Service endpoints for kube-proxy, the kube-root-ca.crt ConfigMap every pod's
# token volume mounts, the node lifecycle (it lifts the not-ready taint a new node starts
# with), PodDisruptionBudget status, garbage collection of what a deleted owner leaves.
# shellcheck disable=SC2034 # read by up.sh
node_controllers=serviceaccount-controller,namespace-controller,deployment-controller,replicaset-controller,endpoints-controller,endpointslice-controller,root-ca-certificate-publisher-controller,node-lifecycle-controller,disruption-controller,garbage-collector-controller,pod-garbage-collector-controller,job-controller,cronjob-controller

# ---- the node's processes (after the control plane) ----------------------------------------
node_start() {
  local nd=$dir/node t_start
  t_start=$(date +%s%N)
  # since: milliseconds since node_start began.
  since() { echo $((($(date +%s%N) - t_start) / 1000000)); }
  mkdir -p "$nd/registry" "$nd/cni/net.d" "$nd/cni/ipam" "$nd/containerd/certs.d" \
    "$nd/kubelet" "$nd/pod-logs"

  # The registry: pods (fixity checking signatures) and containerd both reach HOST_IP.
  start registry crane registry serve --address "$host_ip:0" --disk "$nd/registry"
  local port='' i
  for ((i = 0; i < 100; i++)); do
    port=$(sed -n 's/.*serving on port \([0-9]*\).*/\1/p' "$dir/registry.log")
    [[ -n $port ]] && break
    sleep 0.1
  done
  [[ -n $port ]] || { log "error: the registry did not start"; return 1; }
  registry=$host_ip:$port
  # Plain HTTP for the test registry. Docker Hub, which the tests' made-up references such as
  # nginx@sha256:0123... name, is sent to a closed port: those pulls fail at once instead of
  # waiting on a resolver the node cannot reach (containerd 1.6 has no catch-all entry).
  # (For docker.io containerd 1.6 ignores a bare `server` line: the host entry is needed.)
  local name url
  for name in "$registry" docker.io; do
    url=http://$registry
    [[ $name == docker.io ]] && url=http://127.0.0.1:9
    mkdir -p "$nd/containerd/certs.d/$name"
    printf 'server = "%s"\n\n[host."%s"]\n  capabilities = ["pull", "resolve"]\n' "$url" "$url" \
      >"$nd/containerd/certs.d/$name/hosts.toml"
  done

  # The sandbox ("pause") image: busybox sleeping; containerd kills it with SIGKILL.
  local pause
  pause=$("$here/image.sh" busybox "$registry/fixity-test/pause" /bin/sleep 2147483647)
  local t_images t_containerd t_node
  t_images=$(since)

  cat >"$nd/cni/net.d/10-fixity.conflist" <<EOF
{
  "cniVersion": "1.0.0",
  "name": "fixity-test",
  "plugins": [{
    "type": "bridge",
    "bridge": "cni0",
    "isGateway": true,
    "ipMasq": true,
    "hairpinMode": true,
    "ipam": {
      "type": "host-local",
      "ranges": [[{"subnet": "$pod_cidr"}]],
      "routes": [{"dst": "0.0.0.0/0"}],
      "dataDir": "$nd/cni/ipam"
    }
  }]
}
EOF

  # Every path containerd would otherwise take from /var/lib, /run or /opt is under DIR.
  local sock=$nd/containerd/containerd.sock
  cat >"$nd/containerd.toml" <<EOF
version = 2
root = "$nd/containerd/root"
state = "$nd/containerd/state"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs"]

[grpc]
  address = "$sock"

[plugins."io.containerd.internal.v1.opt"]
  path = "$nd/containerd/opt"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$pause"
  netns_mounts_under_state_dir = true
  # The kubelet asks for oom_score_adj -998 for sandboxes and down to -997 for containers;
  # lowering it needs CAP_SYS_RESOURCE, which some machines (this CI's VMs) keep out of
  # even root's bounding set, and runc then fails to start anything. Restricted, a
  # container gets no lower a score than containerd's own.
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "$nd/containerd/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$nd/cni/net.d"
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "$nd/containerd/certs.d"
EOF
  start containerd nsenter --net="$nd/netns" -- containerd --config "$nd/containerd.toml"
  wait_for containerd ctr --address "$sock" version
  t_containerd=$(since)

  # The kubelet's cgroup root, in every cgroup v1 hierarchy (it must exist beforehand).
  node_cgroup=/$(basename "$dir")
  echo "node_cgroup=$node_cgroup" >>"$nd/network.env"
  local h
  for h in /sys/fs/cgroup/*/; do
    [[ -e ${h}cgroup.procs && ${h} != */unified/ ]] || continue
    mkdir -p "${h%/}$node_cgroup"
    if [[ -e ${h}cpuset.cpus ]]; then
      cat "${h}cpuset.cpus" >"${h%/}$node_cgroup/cpuset.cpus"
      cat "${h}cpuset.mems" >"${h%/}$node_cgroup/cpuset.mems"
    fi
  done

  cat >"$nd/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
failCgroupV1: false
cgroupDriver: cgroupfs
cgroupRoot: $node_cgroup
containerRuntimeEndpoint: unix://$sock
address: $node_ip
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
tlsCertFile: $pki/kubelet-serving.crt
tlsPrivateKeyFile: $pki/kubelet-serving.key
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $pki/ca.crt}
authorization:
  mode: Webhook
podLogsDir: $nd/pod-logs
volumePluginDir: $nd/kubelet/volume-plugins
# No cluster DNS here, and pods need none (fixity reaches the API server by IP): an empty
# resolv.conf keeps them from trying the host's resolver.
resolvConf: ""
# A shared CI disk must not make the kubelet evict the tests' pods.
evictionHard: {nodefs.available: 1%, imagefs.available: 1%, memory.available: 100Mi}
imageGCHighThresholdPercent: 100
serializeImagePulls: false
shutdownGracePeriod: 0s
EOF
  start kubelet nsenter --net="$nd/netns" -- kubelet \
    --config "$nd/kubelet.yaml" \
    --kubeconfig "$nd/kubelet.kubeconfig" \
    --root-dir "$nd/kubelet" \
    --hostname-override "$node_name" \
    --node-ip "$node_ip"

  cat >"$nd/kube-proxy.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: iptables
clientConnection:
  kubeconfig: $nd/kube-proxy.kubeconfig
hostnameOverride: $node_name
clusterCIDR: $pod_cidr
# The conntrack table size and timeouts are the host's business, not a test node's.
conntrack:
  maxPerCore: 0
  min: 0
  tcpEstablishedTimeout: 0s
  tcpCloseWaitTimeout: 0s
EOF
  start kube-proxy nsenter --net="$nd/netns" -- kube-proxy --config "$nd/kube-proxy.yaml"

  start kube-scheduler kube-scheduler \
    --kubeconfig "$dir/kube-scheduler.kubeconfig" \
    --leader-elect=false \
    --secure-port 0

  # Ready for pods: the node is Ready and schedulable (the node lifecycle controller lifts
  # the not-ready taint), and kube-proxy sends the kubernetes Service to the API server.
  # shellcheck disable=SC2317 # called through wait_for
  node_ready() {
    local state
    state=$(kubectl --kubeconfig "$kubeconfig" get node "$node_name" -o \
      jsonpath='{.status.conditions[?(@.type=="Ready")].status}/{.spec.taints}' 2>/dev/null)
    [[ $state == True/ ]]
  }
  wait_for kubelet node_ready
  t_node=$(since)
  # shellcheck disable=SC2317 # called through wait_for
  service_ready() { innet curl -fsS -m 2 --cacert "$pki/ca.crt" "https://$kubernetes_ip/readyz"; }
  wait_for kube-proxy service_ready
  log "node: registry and sandbox image in ${t_images} ms, containerd ${t_containerd} ms, node Ready ${t_node} ms, Services routed $(since) ms"
}

# ---- teardown (down.sh) ------------------------------------------------------------------
# node_stop_containers: the kubelet first (so it restarts nothing), then every container and
# sandbox through containerd, which also ends their shims. Runs before down.sh stops the
# remaining processes.
node_stop_containers() {
  local sock=$dir/node/containerd/containerd.sock
  stop_entry kubelet
  [[ -S $sock ]] || return 0
  local c=(ctr --address "$sock" --namespace k8s.io) id
  for id in $("${c[@]}" tasks ls -q 2>/dev/null); do
    "${c[@]}" tasks kill --all --signal SIGKILL "$id" >/dev/null 2>&1 || true
  done
  for id in $("${c[@]}" tasks ls -q 2>/dev/null); do
    "${c[@]}" tasks delete --force "$id" >/dev/null 2>&1 || true
  done
  for id in $("${c[@]}" containers ls -q 2>/dev/null); do
    "${c[@]}" containers delete "$id" >/dev/null 2>&1 || true
  done
}

# node_cleanup: after every process of the cluster is stopped, whatever is left of the node:
# stray processes (a shim, a container containerd lost track of), mounts under DIR, the pod
# cgroups, the network, the kubelet's log links. Reports anything it could not remove and
# then fails.
node_cleanup() {
  local nd=$dir/node leftovers=()
  local node_veth='' node_cgroup=''
  # shellcheck disable=SC1091 # written by node_network
  [[ -f $nd/network.env ]] && . "$nd/network.env"

  # Processes: those in the pod cgroups, and containerd's shims (their command line names
  # containerd's socket).
  local pids=() pid sock=$nd/containerd/containerd.sock
  for _ in 1 2 3 4 5; do
    pids=()
    if [[ -n $node_cgroup ]]; then
      mapfile -t pids < <(for h in /sys/fs/cgroup/*"$node_cgroup"; do
        find "$h" -name cgroup.procs -exec cat {} + 2>/dev/null
      done | sort -u)
    fi
    for pid in /proc/[0-9]*; do
      pid=${pid#/proc/}
      if tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline" | grep -qF -- "-address $sock"; then
        pids+=("$pid")
      fi
    done
    ((${#pids[@]})) || break
    kill -KILL "${pids[@]}" 2>/dev/null || true
    sleep 0.2
  done
  ((${#pids[@]} == 0)) || leftovers+=("processes ${pids[*]}")

  # Shim sockets live in containerd's fixed /run/containerd/s; each shim's bundle names its own.
  local address socket
  for address in "$nd"/containerd/state/io.containerd.runtime.v2.task/*/*/address; do
    [[ -f $address ]] || continue
    socket=$(<"$address"); socket=${socket#unix://}
    [[ $socket == /run/containerd/s/* ]] && rm -f "$socket"
  done

  # Mounts under DIR (container root filesystems, sandbox netns and shm, kubelet volumes,
  # the node's netns), deepest first.
  local mounts=() m
  for _ in 1 2 3; do
    mapfile -t mounts < <(awk -v d="$dir/" 'index($5, d) == 1 { print $5 }' /proc/self/mountinfo \
      | awk '{ print length, $0 }' | sort -rn | cut -d' ' -f2-)
    ((${#mounts[@]})) || break
    for m in "${mounts[@]}"; do umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true; done
  done
  ((${#mounts[@]} == 0)) || leftovers+=("mounts ${mounts[*]}")

  # Pod cgroups, innermost first, in every hierarchy.
  if [[ -n $node_cgroup ]]; then
    local h
    for h in /sys/fs/cgroup/*/; do
      [[ -d ${h%/}$node_cgroup ]] || continue
      find "${h%/}$node_cgroup" -depth -type d -exec rmdir {} + 2>/dev/null || true
      if [[ -d ${h%/}$node_cgroup ]]; then leftovers+=("cgroup ${h%/}$node_cgroup"); fi
    done
  fi

  # The veth pair (its routes go with it); the namespace itself went with its mount. The
  # kernel removes a pair whose other end's namespace is gone on its own, at its own pace, so
  # the link can vanish between the look and the delete: only one still there is left behind.
  if [[ -n $node_veth ]]; then
    for _ in 1 2 3 4 5; do
      ip link show "$node_veth" >/dev/null 2>&1 || break
      ip link del "$node_veth" 2>/dev/null || sleep 0.2
    done
    if ip link show "$node_veth" >/dev/null 2>&1; then leftovers+=("interface $node_veth"); fi
  fi

  # The kubelet links each container's log into /var/log/containers (a fixed path).
  if [[ -d /var/log/containers ]]; then
    find /var/log/containers -maxdepth 1 -type l -lname "$nd/*" -delete 2>/dev/null || true
  fi

  if ((${#leftovers[@]})); then
    log "error: the node left behind: ${leftovers[*]}"
    return 1
  fi
}
